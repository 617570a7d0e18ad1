"""Hidden-dimension pruning (``prune_normalized=True``) vs the default (hidden size frozen by its norms).

For each model: parameters left after removing ``ratio`` of every prunable group (L1 criterion, outputs
kept, oracle on: float64 max abs diff between the masked and the compacted model), once with the
default graph and once with ``prune_normalized=True``, and the wall time of build + prune + oracle.

    python benchmarks/hidden_dim.py --ratio 0.5 --models vit-base bert gpt2 vit llama \
        --out benchmarks/results/hidden_dim.json

``vit-base`` is Hugging Face ViT-base/16 (default config, random init, one 224x224 image); the others are
the tiny configs of ``tests/graph/hf_models.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "graph"))


def _vit_base():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig()).eval(), torch.randn(1, 3, 224, 224)


def build(name: str):
    if name == "vit-base":
        return _vit_base()
    from hf_models import HF_MODELS

    model, x = HF_MODELS[name]()
    return model.eval(), x


def run(name: str, ratio: float, normalized: bool) -> dict:
    from secateur.compact import check_equivalence, mask_model
    from secateur.graph import DependencyGraph
    from secateur.pruners.oneshot import prune_channels

    torch.manual_seed(0)
    model, x = build(name)
    dense = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    # no protect=: classes / vocabulary are kept as model outputs, while protecting the classifier module
    # would also freeze its input dim, the hidden size
    graph = DependencyGraph.build(model, x, prune_normalized=normalized)
    reference = __import__("copy").deepcopy(model)
    pruned, plan = prune_channels(model, x, sparsity=ratio, criterion="l1", graph=graph, verify=False)
    seconds = time.perf_counter() - t0
    diff = check_equivalence(mask_model(reference, plan), pruned, x)
    hidden = getattr(pruned.config, "hidden_size", None)
    return {
        "model": name,
        "prune_normalized": normalized,
        "ratio": ratio,
        "params_dense": dense,
        "params_pruned": sum(p.numel() for p in pruned.parameters()),
        "hidden_size": hidden,
        "oracle_max_abs_diff": diff,
        "build_prune_seconds": round(seconds, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--models", nargs="+", default=["vit-base", "bert", "gpt2", "vit", "llama"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for normalized in (False, True):
            r = run(name, args.ratio, normalized)
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
