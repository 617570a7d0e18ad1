"""Which ``--best`` recipe for ``vs_peers.py``: a sweep on one model and target, 3 seeds, same protocol.

Each recipe prunes the cached dense weights of ``vs_peers.py`` (same seeds, same aim: Torch-Pruning
MagnitudePruner's achieved reduction from ``benchmarks/results/vs_peers.json``) through ``vs_peers.point``
as ``secateur-best``, so the step budget (sparse-learning and fine-tuning steps) is the one every method gets;
only the recipe differs. Results: ``benchmarks/results/vs_peers_best_sweep.json`` (appended, one entry per
recipe and seed) and the mean per recipe on stdout.

Caveat, stated in docs/benchmarks.md: the accuracies are on the test split (``vs_peers.py`` has no
validation split), so choosing the recipe here is selection on the test data of this one model and target;
the other models and targets of ``vs_peers.py`` are the out-of-sample check.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_peers_best_sweep.py \\
        --recipes sparse+kd sparse+kd+kd-sparse sparse+kd+kd-sparse+T=2 --target 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

import vs_peers as V  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "vs_peers_best_sweep.json"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", required=True)
    ap.add_argument("--model", default="resnet8:width=0.5,stem_stride=2")
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    a = ap.parse_args(argv)
    peers = json.loads((ROOT / "benchmarks" / "results" / "vs_peers.json").read_text())
    cfg = dict(peers["config"])
    torch.set_num_threads(1)
    data = json.loads(OUT.read_text()) if OUT.exists() else {"command": [], "entries": []}
    data["command"].append("python benchmarks/vs_peers_best_sweep.py " + " ".join(argv or sys.argv[1:]))
    for seed in a.seeds:
        aim = next(
            r["achieved_macs_x"]
            for r in peers["rows"]
            if (r["model"], r["seed"], r["method"], r["target_macs_x"])
            == (a.model, seed, "tp-magnitude", a.target)
        )
        for recipe in a.recipes:
            bench = V.Bench(dict(cfg, best=recipe))
            dense, dinfo = bench.dense(a.model, seed)
            t0 = time.perf_counter()
            row = V.point(bench, dense, dinfo, "secateur-best", a.target, seed, aim)
            entry = {
                "model": a.model,
                "target_macs_x": a.target,
                "recipe": recipe,
                "seed": seed,
                "accuracy": row["accuracy"],
                "achieved_macs_x": row["achieved_macs_x"],
                "seconds": time.perf_counter() - t0,
            }
            data["entries"].append(entry)
            OUT.write_text(json.dumps(data, indent=1) + "\n")
            print(json.dumps(entry), flush=True)
    for recipe in a.recipes:
        accs = [
            e["accuracy"]
            for e in data["entries"]
            if (e["recipe"], e["model"], e["target_macs_x"]) == (recipe, a.model, a.target)
        ]
        print(f"{recipe}: mean {100 * statistics.mean(accs):.2f} over {len(accs)} seeds")


if __name__ == "__main__":
    main()
