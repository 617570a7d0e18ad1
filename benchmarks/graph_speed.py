"""Graph build + one 50% channel-prune step, secateur vs Torch-Pruning, and the latency a prune buys.

    python benchmarks/graph_speed.py            # all (Torch-Pruning is optional: pip install secateur[peers])
    python benchmarks/graph_speed.py --reps 7 --threads 1 --out benchmarks/results/graph_speed.json

Models: Hugging Face ResNet-50 and ViT-base/16 (random init, default configs, built from the configs: no
download), example input 1x3x224x224, the same for both libraries. Each repetition prunes a fresh deep copy
(the copy is not timed). Both libraries use L1 magnitude importance and a 50% ratio with the classifier
protected, and remove the same parameters: Torch-Pruning prunes ViT's hidden size through its LayerNorms, so
secateur builds that graph with ``prune_normalized=True`` (``PRUNE_NORMALIZED``); ``params_match`` records
that every timed variant ends with the same number of parameters (a mismatch is printed and makes the script
exit with status 1 after writing the results).

Like for like: Torch-Pruning checks nothing after pruning, so the headline secateur time (``"secateur"``,
``speedup_total``) is ``prune_channels(..., verify=False)``, without secateur's equivalence oracle. The same
step *with* the oracle (``verify=True``, the library default: a float64 masked copy of the model, one float32
and two float64 forwards, inside the transaction) is timed as ``"secateur_verified"``
(``speedup_total_verified``); ``--skip-verified`` leaves it out.

Repetitions are interleaved (secateur, Torch-Pruning, secateur with the oracle, then again), after one
warm-up run of each, so that load drifts on a shared machine hit every variant alike. Reported: median over
``--reps`` of wall time (``time.perf_counter``) and of this thread's CPU time (``time.thread_time``: less
sensitive to other jobs on a shared machine), each run's total, and the load averages at start and end.
Then CPU latency (torch.utils.benchmark, batch 32) of the dense vs secateur-pruned ResNet-50 next to the
MACs ratio (torch.utils.flop_counter).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from secateur.graph import DependencyGraph  # noqa: E402
from secateur.pruners.oneshot import prune_channels  # noqa: E402


def build_models() -> dict:
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return {
        "hf-resnet-50": ResNetForImageClassification(ResNetConfig()).eval(),
        "hf-vit-base-16": ViTForImageClassification(ViTConfig()).eval(),
    }


# what Torch-Pruning removes by default: ViT's hidden size too (through LayerNorm), ResNet has no such dims
PRUNE_NORMALIZED = {"hf-resnet-50": False, "hf-vit-base-16": True}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def macs(m: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x)
    return fc.get_total_flops() // 2


def _loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages (other jobs on the machine), for the record."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _times(c0: tuple, c1: tuple, c2: tuple, m: torch.nn.Module) -> dict:
    return {
        "build_s": c1[0] - c0[0],
        "step_s": c2[0] - c1[0],
        "total_s": c2[0] - c0[0],
        "cpu_build_s": c1[1] - c0[1],
        "cpu_step_s": c2[1] - c1[1],
        "cpu_total_s": c2[1] - c0[1],
        "params_after": n_params(m),
    }


def ours_once(
    model: torch.nn.Module, x: torch.Tensor, prune_normalized: bool = False, verify: bool = False
) -> dict:
    m = copy.deepcopy(model)
    c0 = _clocks()
    graph = DependencyGraph.build(m, x, prune_normalized=prune_normalized)
    c1 = _clocks()
    prune_channels(m, x, sparsity=0.5, criterion="l1", graph=graph, verify=verify)
    c2 = _clocks()
    with torch.no_grad():
        m(x)
    return _times(c0, c1, c2, m)


def tp_once(model: torch.nn.Module, x: torch.Tensor) -> dict:
    import torch_pruning as tp

    m = copy.deepcopy(model)
    c0 = _clocks()
    pruner = tp.pruner.MetaPruner(
        m,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=0.5,
        ignored_layers=[m.classifier],
    )
    c1 = _clocks()
    pruner.step()
    c2 = _clocks()
    with torch.no_grad():
        m(x)
    return _times(c0, c1, c2, m)


TIMES = ("build_s", "step_s", "total_s", "cpu_build_s", "cpu_step_s", "cpu_total_s")


def summary(runs: list[dict]) -> dict:
    """Medians of each time over ``runs``, the parameter count left, and every run's total (wall)."""
    out = {k: statistics.median(r[k] for r in runs) for k in TIMES}
    out["params_after"] = runs[-1]["params_after"]
    out["runs_total_s"] = [round(r["total_s"], 4) for r in runs]
    out["runs_cpu_total_s"] = [round(r["cpu_total_s"], 4) for r in runs]
    return out


def interleaved(fns: dict, model: torch.nn.Module, x: torch.Tensor, reps: int, peers: tuple = ()) -> dict:
    """``{name: summary}`` of ``reps`` runs of each ``fn(model, x)``, one of each in turn (after one warm-up
    run of each: imports, allocator), each after a ``gc.collect()`` outside the timed region. A variant
    named in ``peers`` that raises is reported as ``{"error": ...}`` and dropped (a peer's failure is a
    result); secateur's own failures propagate."""
    runs: dict = {k: [] for k in fns}
    errors: dict = {}
    for r in range(reps + 1):
        for k, fn in fns.items():
            if k in errors:
                continue
            gc.collect()  # the previous run's garbage (models and graphs in reference cycles) is freed
            try:  # here, not by a collection inside the next timed call (~20 ms on ResNet-50, either library)
                res = fn(model, x)
            except Exception as e:
                if k not in peers:
                    raise
                errors[k] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                continue
            if r:
                runs[k].append(res)
    return {k: errors.get(k) or summary(runs[k]) for k in fns}


def fold_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Deployment form, applied alike to dense and pruned: each HF ResNet conv layer's BatchNorm folded into
    its convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``), so no separate pass over activations."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    for mod in model.modules():
        if hasattr(mod, "convolution") and isinstance(
            getattr(mod, "normalization", None), torch.nn.BatchNorm2d
        ):
            mod.convolution = fuse_conv_bn_eval(mod.convolution, mod.normalization)
            mod.normalization = torch.nn.Identity()
    return model


class _Logits(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x).logits


def torchscript_frozen(model: torch.nn.Module) -> torch.nn.Module:
    """The TorchScript CPU deployment path, alike for dense and pruned: trace, freeze,
    ``optimize_for_inference`` (folds BN, fuses conv+ReLU, pre-packs oneDNN weights)."""
    with torch.inference_mode():
        traced = torch.jit.trace(_Logits(copy.deepcopy(model)).eval(), torch.randn(1, 3, 224, 224))
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced))


def latency(model: torch.nn.Module, batch: int, min_run_time: float) -> float:
    from torch.utils import benchmark

    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model(x)  # warm-up
        t = benchmark.Timer("m(x)", globals={"m": model, "x": x}, num_threads=torch.get_num_threads())
        return t.blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--min-run-time", type=float, default=10.0, help="seconds per latency measurement")
    ap.add_argument("--latency-rounds", type=int, default=3, help="interleaved dense/pruned rounds (median)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument(
        "--skip-verified", action="store_true", help="do not time secateur with its oracle (verify=True)"
    )
    ap.add_argument("--out", default="benchmarks/results/graph_speed.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import torch_pruning as tp

        tp_version = getattr(tp, "__version__", "?")
    except ImportError:
        tp = None
        tp_version = None
    x = torch.randn(1, 3, 224, 224)
    result: dict = {
        "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
        "torch": torch.__version__,
        "torch_pruning": tp_version,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "reps": args.reps,
        "interleaved": True,
        "secateur_headline": "prune_channels(..., verify=False): no oracle, as Torch-Pruning has none",
        "secateur_verified": "prune_channels(..., verify=True): with the float64 equivalence oracle",
        "loadavg_1_5_15_at_start": _loadavg(),
        "input": [1, 3, 224, 224],
        "models": {},
    }
    import transformers

    result["transformers"] = transformers.__version__
    mismatches = []
    for name, model in build_models().items():
        pn = PRUNE_NORMALIZED[name]
        row: dict = {"params": n_params(model), "secateur_prune_normalized": pn}
        fns: dict = {"secateur": lambda m, xx, pn=pn: ours_once(m, xx, prune_normalized=pn)}
        if tp is not None:
            fns["torch_pruning"] = tp_once
        if not args.skip_verified:
            fns["secateur_verified"] = lambda m, xx, pn=pn: ours_once(m, xx, prune_normalized=pn, verify=True)
        row.update(interleaved(fns, model, x, args.reps, peers=("torch_pruning",)))
        ours_r, tp_r = row["secateur"], row.get("torch_pruning")
        counts = {k: row[k]["params_after"] for k in fns if "error" not in row[k]}
        row["params_match"] = len(set(counts.values())) == 1
        if not row["params_match"]:
            mismatches.append(f"{name}: {counts}")
        if tp_r is not None and "error" not in tp_r:
            row["speedup_total"] = tp_r["total_s"] / ours_r["total_s"]
            row["speedup_build"] = tp_r["build_s"] / ours_r["build_s"]
            row["speedup_step"] = tp_r["step_s"] / ours_r["step_s"]
            row["speedup_total_cpu"] = tp_r["cpu_total_s"] / ours_r["cpu_total_s"]
            if "secateur_verified" in row:
                row["speedup_total_verified"] = tp_r["total_s"] / row["secateur_verified"]["total_s"]
                row["speedup_total_verified_cpu"] = (
                    tp_r["cpu_total_s"] / row["secateur_verified"]["cpu_total_s"]
                )
        result["models"][name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    if not args.skip_latency:
        dense = build_models()["hf-resnet-50"]
        pruned, _ = prune_channels(copy.deepcopy(dense), x, sparsity=0.5, criterion="l1", verify=False)
        md, mp = macs(dense, x), macs(pruned, x)
        lat: dict = {
            "batch": args.batch,
            "macs_dense": md,
            "macs_pruned": mp,
            "macs_gain": md / mp,
            "params_dense": n_params(dense),
            "params_pruned": n_params(pruned),
        }
        settings = {
            "as_is": (dense, pruned),
            "bn_folded": (fold_bn(dense), fold_bn(pruned)),
            "torchscript_frozen": (torchscript_frozen(dense), torchscript_frozen(pruned)),
        }
        for setting, (dm, pm) in settings.items():
            ld, lp = [], []
            for _ in range(args.latency_rounds):  # interleaved so that load drifts hit both alike
                ld.append(latency(dm, args.batch, args.min_run_time))
                lp.append(latency(pm, args.batch, args.min_run_time))
            row = {"dense_s": statistics.median(ld), "pruned_s": statistics.median(lp)}
            row.update({"dense_rounds_s": ld, "pruned_rounds_s": lp})
            row["latency_gain"] = row["dense_s"] / row["pruned_s"]
            row["latency_gain_over_macs_gain"] = row["latency_gain"] / lat["macs_gain"]
            lat[setting] = row
            print(setting, json.dumps(row), flush=True)
        result["latency_resnet50_50pct"] = lat
        print(json.dumps(lat, indent=1), flush=True)
    result["loadavg_1_5_15_at_end"] = _loadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)
    if mismatches:
        print("parameter counts differ between the libraries:", "; ".join(mismatches), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
