"""Random architectures through ``prune_channels(..., verify=True)``: how often it prunes exactly, refuses by
name, or fails (silent mismatch, raw exception).

    python benchmarks/random_architectures.py --models 500 --seed 0

The models come from the generator of the property test (``tests/graph/random_archs.py``: DAGs of conv,
BatchNorm, ReLU, add, mul, concat, chunk, pooling, flatten and linear layers with consistent shapes and at
most 8 channels per conv), drawn from one ``random.Random(seed)`` stream together with each model's ratio
(0.25, 0.5 or 0.75) and criterion (random or L1); model ``i`` is initialised from ``torch.manual_seed(i)``.
Every pruned model is re-checked against its masked original in float64, independently of ``verify``
(:func:`random_archs.check_spec`). Writes ``benchmarks/results/random_architectures.json``: the counts per
outcome, the named refusals by error class and by reason, every failure with its spec (to reproduce it),
the median number of ops per model and the wall time. Exits with status 1 if any model fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "graph"))

from random_archs import check_spec, draw_spec  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "random_architectures.json"


def _reason(detail: str) -> str:
    """A refusal message with its model-specific parts (numbers, names in brackets) blanked, for counting."""
    text = re.sub(r"\[op .*?\]", "[op ...]", detail)
    text = re.sub(r"\d+", "N", text)
    return text[:160]


def run(n_models: int, seed: int) -> dict:
    """Generate and check ``n_models`` models; returns the results dictionary."""
    import random

    rng = random.Random(seed)
    counts: collections.Counter[str] = collections.Counter()
    by_class: collections.Counter[str] = collections.Counter()
    by_reason: collections.Counter[str] = collections.Counter()
    failures, n_ops, times, removed = [], [], [], []
    start = time.perf_counter()
    for i in range(n_models):
        spec = draw_spec(rng.randint)
        ratio = (0.25, 0.5, 0.75)[rng.randint(0, 2)]
        criterion = ("random", "l1")[rng.randint(0, 1)]
        n_ops.append(len(spec["ops"]))
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome, detail = check_spec(spec, ratio, criterion, seed=i)
        times.append(time.perf_counter() - t0)
        counts[outcome] += 1
        if outcome == "passed":
            removed.append(int(detail))
        elif outcome == "refused":
            by_class[detail.split(":")[0]] += 1
            by_reason[_reason(detail)] += 1
        else:
            failures.append(
                {
                    "model": i,
                    "outcome": outcome,
                    "detail": detail,
                    "ratio": ratio,
                    "criterion": criterion,
                    "spec": spec,
                }
            )
    return {
        "command": f"python benchmarks/random_architectures.py --models {n_models} --seed {seed}",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "models": n_models,
        "seed": seed,
        "counts": {k: counts.get(k, 0) for k in ("passed", "refused", "mismatch", "raw")},
        "passed_with_units_removed": sum(1 for r in removed if r > 0),
        "refused_by_class": dict(by_class.most_common()),
        "refused_by_reason": dict(by_reason.most_common(10)),
        "median_ops_per_model": statistics.median(n_ops),
        "max_ops_per_model": max(n_ops),
        "median_units_removed_when_passed": statistics.median(removed) if removed else 0,
        "wall_s": round(time.perf_counter() - start, 2),
        "median_s_per_model": round(statistics.median(times), 4),
        "failures": failures,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    res = run(args.models, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    summary = {k: res[k] for k in ("counts", "refused_by_class", "median_ops_per_model", "wall_s")}
    print(json.dumps(summary, indent=2))
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
