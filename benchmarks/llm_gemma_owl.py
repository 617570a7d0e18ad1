"""Why OWL does not help Gemma 3 270M: its per-block outlier ratios and a λ sweep on calibration text.

``benchmarks/llm_gemma.py`` finds Wanda+OWL (M = 5, λ = 0.08, the paper's settings) worse than uniform
Wanda at every sparsity on this model. This script prunes the same de-quantised model with Wanda at 70%
(per row, as in ``llm_gemma.py``) for each ``M:λ`` given (``λ = 0``: uniform) and records OWL's per-block
outlier ratios ``D_l``, the block sparsities it chose, and the perplexity on *calibration* windows (the
last 32 of the 128 calibration windows; the held-out half is never read, so choosing λ here would not
touch the test text). Results: ``benchmarks/results/llm_gemma_owl.json`` (one entry per configuration).

    nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/llm_gemma_owl.py \\
        --configs 5:0 5:0.02 5:0.05 5:0.08
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "src")]

import llm_gemma as G  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "llm_gemma_owl.json"


def main(argv: list[str] | None = None) -> None:
    from secateur.llm import load_fortunes, perplexity, prune_oneshot
    from secateur.llm.owl import OWL

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["5:0", "5:0.02", "5:0.05", "5:0.08"], help="M:lambda")
    ap.add_argument("--sparsity", type=float, default=0.7)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    dense, encode, bos, info = G._real_model()
    split = load_fortunes(seed=0)
    calib = G._windows(split.calibration, encode, bos, 128, 128)
    batches, select = G._batches(calib, 4), G._batches(calib[96:], 4)
    fresh = {"model": info["name"], "command": [], "entries": []}
    data = json.loads(OUT.read_text()) if OUT.exists() else fresh
    data["command"].append("python benchmarks/llm_gemma_owl.py " + " ".join(argv or sys.argv[1:]))
    for spec in a.configs:
        m, lam = (float(v) for v in spec.split(":"))
        student = copy.deepcopy(dense)
        t0 = time.perf_counter()
        alloc = OWL(m=m, lam=lam) if lam > 0 else "uniform"
        rep = prune_oneshot(student, batches, "wanda", a.sparsity, "row", allocation=alloc, as_masks=False)
        entry = {
            "method": "wanda",
            "sparsity": a.sparsity,
            "m": m,
            "lam": lam,
            "calibration_ppl": perplexity(student, select),
            "outlier_ratios": rep.outlier_ratios,
            "block_sparsities": rep.unit_sparsities,
            "seconds": time.perf_counter() - t0,
        }
        data["entries"].append(entry)
        OUT.write_text(json.dumps(data, indent=1) + "\n")
        print(f"M={m:g} lambda={lam:g}: calibration ppl {entry['calibration_ppl']:.2f}", flush=True)
        del student


if __name__ == "__main__":
    main()
