"""A measured latency target (issue 14): ResNet-20 and MobileNetV2 on Fashion-MNIST pruned to 0.5x the dense
model's measured latency (batch 32, 1 thread) in ONNX Runtime and in eager PyTorch.

For each model and backend, ``ChannelPruner(target="latency", latency=LatencyTarget(backend=...))`` (L1;
by default global allocation with kept widths multiples of 8, ``--allocation``, ``--round-to``) searches the
smallest removal whose measured latency meets ``(1 - 0.5 + tolerance)`` of the dense one: each probe is
compacted, exported to ONNX in memory for ONNX Runtime, and timed interleaved with the dense model (probes
near the goal re-measured). The pruned model is then timed again, from scratch, interleaved with the dense
model (``--final-runs`` runs of ``--repeats`` blocks; the median of the runs' ratios of medians) and must
lie within 10% of the target (0.45x-0.55x).

Why not the shipped uniform allocation with ``round_to=1``: CPU kernels (ONNX Runtime's NCHWc convolutions,
oneDNN's blocked layouts) work on blocks of 8 or 16 channels, and widths off a multiple of 8 measured as slow
as the dense model or slower in ONNX Runtime (ResNet-20, batch 32: 2.2x fewer MACs at 0.97x the dense
latency, 3.1x fewer with widths 8/16/32 at 0.55x; measured at load 4-5, so roughly), so latency falls in
steps too coarse to land within 10% of a target. Kept widths in multiples of 8 make every step a fast one,
and global allocation removes one block at a time (uniform allocation with ``round_to=8`` moves all of
ResNet-20's 16-channel stage at once).

Beside it, a MAC-targeted model of the same latency: ``target="macs"`` at the MAC reduction the latency
search reached (same criterion and allocation), timed the same way, and the naive proxy ``target="macs"`` at
0.5 of the MACs ("half the MACs for half the latency"), timed in both runtimes. Every pruned model gets the
same BatchNorm re-estimation and the same fine-tuning (``--ft-steps`` SGD steps, the same batches), and its
test accuracy is reported.

Dense weights: ``benchmarks/vs_peers.py``'s cache (3 epochs of the 60k training images, lr 0.1, batch 128,
seed 0) when present; otherwise trained here briefly (``--brief-subset`` images, ``--brief-epochs``) and the
JSON says so (``dense_source``).

Timing needs a quiet machine: the script refuses a full run when the 1-minute load average is above
``--max-load`` (1.5) and says so; ``--smoke`` runs a tiny version (small subsets, few repeats, 5 fine-tuning
steps) whose numbers are not results.

Writes ``benchmarks/results/latency_target.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tradeoff as T  # noqa: E402
from secateur.allocation.targets import LatencyTarget  # noqa: E402
from secateur.analysis.backends import LATENCY_BACKENDS, compare_backend  # noqa: E402
from secateur.analysis.counting import count_macs, count_params  # noqa: E402
from secateur.pruners.channel import ChannelPruner  # noqa: E402
from secateur.train import recalibrate_bn  # noqa: E402

MODELS = ("resnet20", "mobilenetv2")
#: benchmarks/vs_peers.py's dense training (its defaults): the cache this script looks for first.
VS_PEERS_DENSE = {"train_subset": 0, "dense_epochs": 3, "dense_lr": 0.1, "batch_size": 128}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load1() -> float:
    return os.getloadavg()[0]


def classifier(model: nn.Module) -> list[str]:
    """The last Linear's name: its outputs are the classes (kept whole)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]


def cached_dense_folder(cache: Path, spec: str, seed: int, cfg: dict[str, Any]) -> Path:
    """The folder ``tradeoff.Bench.dense`` uses for ``spec``/``seed`` under ``cfg`` (the same key)."""
    parts = [spec, seed, cfg["train_subset"], cfg["dense_epochs"], cfg["dense_lr"], cfg["batch_size"]]
    key = json.dumps(parts, sort_keys=True)
    tag = f"{spec.replace(':', '_').replace(',', '_').replace('=', '')}_s{seed}_"
    return cache / (tag + hashlib.sha1(key.encode()).hexdigest()[:10])


class Run:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        base = {
            "test_subset": a.test_subset,
            "cache_dir": a.cache_dir,
            "score_batches": a.bn_batches,
            "ft_steps": a.ft_steps,
            "ft_lr": a.ft_lr,
        }
        self.peers_cfg = {**base, **VS_PEERS_DENSE}
        self.brief_cfg = {
            **base,
            "train_subset": a.brief_subset,
            "dense_epochs": a.brief_epochs,
            "dense_lr": 0.1,
            "batch_size": 128,
        }
        self.bench: dict[str, T.Bench] = {}

    def bench_for(self, cfg: dict[str, Any]) -> T.Bench:
        key = json.dumps(cfg, sort_keys=True)
        if key not in self.bench:
            self.bench[key] = T.Bench(cfg)
        return self.bench[key]

    def dense(self, spec: str) -> tuple[nn.Module, dict[str, Any], T.Bench, str]:
        seed = self.a.seed
        folder = cached_dense_folder(Path(self.a.cache_dir), spec, seed, self.peers_cfg)
        if (folder / "bench.json").exists():
            bench = self.bench_for(self.peers_cfg)
            model, info = bench.dense(spec, seed)
            return model, info, bench, f"vs_peers.py cache ({folder.name}: 3 epochs of 60k images)"
        bench = self.bench_for(self.brief_cfg)
        model, info = bench.dense(spec, seed)
        how = (
            f"trained briefly here: {self.a.brief_epochs} epoch(s) of the first {self.a.brief_subset} "
            f"training images, lr 0.1, batch 128 (no vs_peers.py cache at {folder.name})"
        )
        return model, info, bench, how


def measure_ratio(
    dense: nn.Module, pruned: nn.Module, x: torch.Tensor, backend: str, repeats: int, runs: int
) -> dict[str, Any]:
    """``runs`` fresh interleaved timings of dense and pruned in ``backend`` (1 thread): the median of the
    runs' ratios of medians, and the per-run figures."""
    per_run = []
    for _ in range(runs):
        res = compare_backend({"dense": dense, "pruned": pruned}, x, backend, threads=1, repeats=repeats)
        per_run.append(
            {
                "dense_ms": res["dense"]["median_ms"],
                "pruned_ms": res["pruned"]["median_ms"],
                "dense_iqr_ms": res["dense"]["iqr_ms"],
                "pruned_iqr_ms": res["pruned"]["iqr_ms"],
                "ratio": res["pruned"]["median_ms"] / res["dense"]["median_ms"],
            }
        )
    return {
        "ratio": statistics.median(r["ratio"] for r in per_run),
        "dense_ms": statistics.median(r["dense_ms"] for r in per_run),
        "pruned_ms": statistics.median(r["pruned_ms"] for r in per_run),
        "runs": per_run,
    }


def finish(model: nn.Module, bench: T.Bench, seed: int) -> dict[str, Any]:
    """BatchNorm re-estimated, accuracy before and after the same fine-tuning."""
    batches = bench.score_data(seed)
    recalibrate_bn(model, [x for x, _ in batches])
    one_shot = T.evaluate(model, bench.xte, bench.yte)
    secs = bench.finetune(model, seed)
    return {"accuracy_oneshot": one_shot, "accuracy": T.evaluate(model, bench.xte, bench.yte), "ft_s": secs}


def describe(model: nn.Module, dense_macs: int, example: torch.Tensor) -> dict[str, Any]:
    macs = count_macs(model, example)["macs"]
    return {"macs": macs, "macs_x": dense_macs / macs, "params": count_params(model)["params"]}


def prune_latency(
    dense: nn.Module, example: torch.Tensor, x: torch.Tensor, backend: str, a: argparse.Namespace
) -> tuple[nn.Module, dict[str, Any]]:
    model = copy.deepcopy(dense)
    lt = LatencyTarget(
        backend=backend, inputs=x, threads=1, repeats=a.search_repeats, tolerance=a.tolerance, retries=2
    )
    t0 = time.perf_counter()
    pruner = ChannelPruner(
        model, example, schedule=a.target, criterion="l1", target="latency", latency=lt,
        allocation=a.allocation, round_to=a.round_to, protect=classifier(model),
    )
    removed = pruner.prune_to(a.target)
    pruned = pruner.finalize()
    probe = pruner.latency_probe
    info = {
        "search_s": time.perf_counter() - t0,
        "search_dense_ms": probe.dense_ms,
        "search_measurements": len(probe.log),
        "search_distinct_removals": len(probe.samples),
        "search_log": probe.log,
        "units_removed": int(sum(len(r) for r in removed.values())),
    }
    return pruned, info


def prune_macs(dense: nn.Module, example: torch.Tensor, fraction: float, a: argparse.Namespace) -> nn.Module:
    model = copy.deepcopy(dense)
    pruner = ChannelPruner(
        model, example, schedule=fraction, criterion="l1", target="macs", allocation=a.allocation,
        round_to=a.round_to, protect=classifier(model),
    )
    pruner.prune_to(fraction)
    return pruner.finalize()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa
    )


def run_model(r: Run, spec: str, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    a = r.a
    dense, info, bench, how = r.dense(spec)
    dense.eval()
    meta.setdefault("dense_source", {})[spec] = how
    example = bench.example
    x = bench.xte[: a.batch].clone()
    dense_macs = count_macs(dense, example)["macs"]
    base = {"model": spec, "seed": a.seed, "batch": a.batch, "threads": 1, "target_latency_x": 1 - a.target}
    rows.append({**base, "method": "dense", "backend": None, "accuracy": info["accuracy"],
                 **describe(dense, dense_macs, example)})
    finished: list[tuple[nn.Module, dict[str, Any]]] = []

    def accuracy_of(model: nn.Module) -> dict[str, Any]:
        for other, acc in finished:  # the same weights get the same fine-tuning: reuse, say so
            if same_weights(other, model):
                return {**acc, "fine_tune_reused": True}
        trained = copy.deepcopy(model)
        acc = finish(trained, bench, a.seed)
        finished.append((model, acc))
        return acc

    naive = prune_macs(dense, example, a.target, a)
    naive_lat = {b: measure_ratio(dense, naive, x, b, a.repeats, a.final_runs) for b in a.backends}
    for backend in a.backends:
        log(f"{spec} / {backend}: latency search to {1 - a.target:.2f}x dense")
        pruned, search = prune_latency(dense, example, x, backend, a)
        lat = measure_ratio(dense, pruned, x, backend, a.repeats, a.final_runs)
        other = [b for b in a.backends if b != backend]
        also = {b: measure_ratio(dense, pruned, x, b, a.repeats, a.final_runs)["ratio"] for b in other}
        desc = describe(pruned, dense_macs, example)
        target_ratio = 1 - a.target
        log(f"{spec} / {backend}: measured {lat['ratio']:.3f}x dense ({search['search_measurements']} "
            f"timings, {search['search_s']:.0f}s), {desc['macs_x']:.2f}x fewer MACs")
        rows.append({
            **base, "method": "latency-target", "backend": backend, **desc,
            "achieved_latency_x": lat["ratio"], "latency": lat,
            "within_10pct": abs(lat["ratio"] / target_ratio - 1) <= 0.10,
            "latency_x_in_other_backends": also, **search, **accuracy_of(pruned),
        })
        mac_frac = 1 - desc["macs"] / dense_macs
        matched = prune_macs(dense, example, mac_frac, a)
        mlat = measure_ratio(dense, matched, x, backend, a.repeats, a.final_runs)
        rows.append({
            **base, "method": "macs-same-macs", "backend": backend, "macs_target_fraction": mac_frac,
            **describe(matched, dense_macs, example), "achieved_latency_x": mlat["ratio"], "latency": mlat,
            "identical_to_latency_model": same_weights(matched, pruned), **accuracy_of(matched),
        })
    for backend in a.backends:
        rows.append({
            **base, "method": "macs-2x", "backend": backend, "macs_target_fraction": a.target,
            **describe(naive, dense_macs, example), "achieved_latency_x": naive_lat[backend]["ratio"],
            "latency": naive_lat[backend], **accuracy_of(naive),
        })


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model | runtime | method | latency vs dense (target) | within 10% | MACs x | params | "
            "accuracy (one-shot -> fine-tuned) |\n|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in rows:
        if r["method"] == "dense":
            out.append(
                f"| {r['model']} | - | dense | 1.00 | - | 1.00 | {r['params']:,} | {r['accuracy']:.4f} |"
            )
            continue
        tgt = f" ({r['target_latency_x']:.2f})" if r["method"] == "latency-target" else ""
        method = r["method"] + (" (the same model)" if r.get("identical_to_latency_model") else "")
        ok = {True: "yes", False: "NO"}.get(r.get("within_10pct"), "-")
        acc = f"{r['accuracy_oneshot']:.4f} -> {r['accuracy']:.4f}"
        out.append(
            f"| {r['model']} | {r['backend']} | {method} | {r['achieved_latency_x']:.3f}{tgt} | {ok} | "
            f"{r['macs_x']:.2f} | {r['params']:,} | {acc} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "eager"], choices=LATENCY_BACKENDS)
    ap.add_argument("--target", type=float, default=0.5, help="fraction of the dense latency to remove")
    ap.add_argument("--tolerance", type=float, default=0.02, help="LatencyTarget's (fraction of dense)")
    ap.add_argument("--allocation", default="global", choices=["global", "uniform", "isomorphic"])
    ap.add_argument("--round-to", type=int, default=8, help="kept widths are multiples of this")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--search-repeats", type=int, default=15, help="timed blocks per search measurement")
    ap.add_argument("--repeats", type=int, default=31, help="timed blocks per final measurement")
    ap.add_argument("--final-runs", type=int, default=3, help="fresh interleaved runs of the final timing")
    ap.add_argument("--ft-steps", type=int, default=300)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--bn-batches", type=int, default=8)
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--brief-subset", type=int, default=20000)
    ap.add_argument("--brief-epochs", type=int, default=1)
    ap.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "cache"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency_target.json"))
    ap.add_argument("--max-load", type=float, default=1.5, help="refuse a full run above this 1-minute load")
    ap.add_argument("--smoke", action="store_true", help="tiny settings; the numbers are not results")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    load = load1()
    if a.smoke:
        a.search_repeats, a.repeats, a.final_runs, a.ft_steps = 3, 5, 1, 5
        a.test_subset, a.brief_subset, a.bn_batches = 1000, 2000, 2
    elif load > a.max_load:
        print(
            f"1-minute load average {load:.2f} > {a.max_load}: the machine is busy and timings would not be "
            "results. Rerun when it is quiet, or use --smoke for a functional check.",
            file=sys.stderr,
        )
        return 2
    args = argv if argv is not None else sys.argv[1:]
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *args])
    meta: dict[str, Any] = {
        "command": command,
        "smoke": a.smoke,
        "status": (
            f"smoke run (a functional check, 1-minute load {load:.2f}): its numbers are not results"
            if a.smoke
            else "final run"
        ),
        "load_before": os.getloadavg(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "settings": {k: v for k, v in vars(a).items() if k not in ("out", "cache_dir")},
        "protocol": (
            "L1 criterion, allocation and round_to as in settings, classifier kept; latency = median over "
            "blocks, dense and pruned interleaved, 1 thread, batch of test images; achieved = median of "
            "final-runs fresh runs' ratios; every pruned model: BatchNorm re-estimated on bn-batches "
            "training batches, then ft-steps SGD steps (lr ft-lr, batch 128, the same batches for all)"
        ),
    }
    try:
        import onnxruntime

        meta["machine"]["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - the onnx extra is needed for the onnxruntime rows
        pass
    run, rows = Run(a), []
    t0 = time.perf_counter()
    for spec in a.models:
        run_model(run, spec, rows, meta)
    meta["load_after"] = os.getloadavg()
    meta["wall_s"] = time.perf_counter() - t0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1, default=float))
    print(table(rows))
    loads = f"load {meta['load_before'][0]:.2f} -> {meta['load_after'][0]:.2f}"
    print(f"\nwrote {out} ({meta['wall_s']:.0f}s; {loads})")
    misses = [r for r in rows if r["method"] == "latency-target" and not r["within_10pct"]]
    return 1 if misses and not a.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
