"""secateur vs Torch-Pruning at equal MACs on Fashion-MNIST (issue 14).

Every method prunes a fresh copy of the same dense weights (trained once per model and seed) to a MAC
target, BatchNorm statistics are re-estimated alike (``recalibrate_bn`` on the same training batches), and
every method gets the same fine-tuning budget (``--ft-steps`` SGD steps, the same batches at a seed). The
two sparse-learning methods (``secateur-sparse``, ``tp-groupnorm``) first train ``--sparse-steps`` steps
with their regulariser, the same number for both; ``secateur-best`` is named by ``--best`` (its recipe is
recorded in every row).

Methods (the ``method`` field of each JSON row):
- ``secateur-default``: ``ChannelPruner`` with its shipped defaults and ``target="macs"``.
- ``secateur-best``: the secateur recipe given by ``--best`` (e.g. ``sparse+kd``: group-sparse training,
  removal, fine-tuning with distillation from the dense model).
- ``secateur-sparse``: GReg's growing regularisation (``secateur.GrowingRegularization``) on the units the
  driver chooses at the target, then their removal.
- ``tp-magnitude``: Torch-Pruning's ``MagnitudePruner`` (L1, one per-layer ratio found by a scan).
- ``tp-groupnorm``: Torch-Pruning's ``GroupNormPruner`` with its sparse learning (``regularize`` after every
  backward, ``reg`` 5e-4, global pruning: the setting of Torch-Pruning's own CIFAR scripts), then a ratio
  scan.

Equal MACs: Torch-Pruning's channel counts move in jumps on small nets, so its MagnitudePruner runs first at
each nominal target and every other method aims at the reduction it achieved (``aimed_macs_x``); the rows
keep the nominal ``target_macs_x``.
- ``random``: secateur's ``random`` group criterion, uniform allocation.

Writes ``benchmarks/results/vs_peers.json`` (rows ``{"model", "target_macs_x", "method", "seed",
"achieved_macs_x", "params", "accuracy", ...}`` and ``"speed"`` from ``graph_speed.py`` when ``--speed``)
and a section of ``docs/benchmarks.md`` with the exact command.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import tradeoff as T  # noqa: E402
from _docs import write_block  # noqa: E402
from secateur.analysis.counting import count_macs, count_params  # noqa: E402
from secateur.data.loader import StepLoader  # noqa: E402
from secateur.pruners.channel import ChannelPruner  # noqa: E402
from secateur.train import Distillation, Trainer, recalibrate_bn  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # pragma: no cover - the peers extra is needed for the tp-* rows
    tp = None

METHODS = ("secateur-default", "secateur-best", "secateur-sparse", "tp-magnitude", "tp-groupnorm", "random")
MODELS = (
    "resnet8:width=0.5,stem_stride=2",
    "vgg_small:width=0.125",
    "resnet20",
    "resnet56",
    "mobilenetv2",
)
TARGETS = (1.5, 2.0, 3.0, 4.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ pieces
def classifier(model: nn.Module) -> list[nn.Module]:
    """The last Linear: kept whole by every method (its outputs are the classes)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]


class Bench(T.Bench):
    """Data, dense weights (cached) and the fine-tuning protocol of ``tradeoff.py``, plus the phases here."""

    def train_steps(self, model: nn.Module, seed: int, steps: int, lr: float, callbacks=()) -> float:
        t0 = time.perf_counter()
        loader = StepLoader(self.loader(2000 + seed), steps)
        Trainer(
            model,
            loader,
            epochs=1,
            lr=lr,
            weight_decay=5e-4,
            callbacks=list(callbacks),
            progress=False,
            log_every=0,
        ).fit()
        return time.perf_counter() - t0

    def sparse_once(self, key: tuple, model: nn.Module, learn: Callable[[nn.Module], None]) -> float:
        """Sparse learning does not depend on the MAC target: run ``learn`` once per key (and model/seed, one
        task per process), then load the learnt weights into ``model`` for every target. Returns the
        seconds the learning took (also for the reuses: the budget is what each model cost)."""
        cache = self.__dict__.setdefault("_sparse", {})
        if key not in cache:
            t0 = time.perf_counter()
            learn(model)
            cache[key] = (copy.deepcopy(model.state_dict()), time.perf_counter() - t0)
        else:
            model.load_state_dict(cache[key][0])
        return cache[key][1]

    def recalibrate(self, model: nn.Module, seed: int) -> None:
        batches = self.score_data(seed)[: self.cfg["bn_batches"]]
        recalibrate_bn(model, [x for x, _ in batches])

    def finetune_kd(self, model: nn.Module, teacher: nn.Module, seed: int) -> float:
        """The same steps, batches and learning rate as ``finetune``, plus distillation from ``teacher``."""
        t0 = time.perf_counter()
        loader = StepLoader(self.loader(1000 + seed), self.cfg["ft_steps"])
        kd = Distillation(teacher, temperature=self.cfg["kd_temperature"], alpha=self.cfg["kd_alpha"])
        Trainer(
            model,
            loader,
            epochs=1,
            lr=self.cfg["ft_lr"],
            weight_decay=5e-4,
            callbacks=[kd],
            progress=False,
            log_every=0,
        ).fit()
        return time.perf_counter() - t0


def secateur_channels(
    model: nn.Module,
    example: torch.Tensor,
    reduction: float,
    criterion: str | None,
    seed: int,
    data=None,
    allocation: str | None = None,
) -> nn.Module:
    """``ChannelPruner`` one-shot to ``1 - 1/reduction`` of the MACs; ``None``: the shipped default."""
    kw: dict[str, Any] = {"target": "macs", "seed": seed}
    if criterion is not None:
        kw["criterion"] = criterion
    if allocation is not None:
        kw["allocation"] = allocation
    if data is not None:
        kw.update(data=data, loss_fn=F.cross_entropy)
    target = closest_target(model, example, reduction, kw)
    cp = ChannelPruner(model, example, schedule=target, **kw)
    cp.prune_to(target)
    return cp.finalize()


def closest_target(model: nn.Module, example: torch.Tensor, aim: float, kw: dict[str, Any]) -> float:
    """secateur's counterpart of Torch-Pruning's ratio scan: the MAC fraction, on a grid of reductions from
    ``aim`` down to 0.8·``aim`` in steps of 0.5%, whose selection's MAC reduction is closest to ``aim`` (log
    scale). ``ChannelPruner`` reaches *at least* its target, and on small nets a step of one channel per
    group jumps, so asking for exactly ``aim`` can overshoot it by 5-10%; both libraries get their closest."""
    cp = ChannelPruner(model, example, schedule=0.5, **kw)
    best, best_err = 1.0 - 1.0 / aim, math.inf
    for k in range(41):
        target = 1.0 - 1.0 / (aim * (1.0 - 0.005 * k))
        if kw.get("criterion") == "random":  # its generator advances per call: the final run's is the first
            cp = ChannelPruner(model, example, schedule=0.5, **kw)
        reached = 1.0 / max(1.0 - cp.cost.state(cp.select(target)).removed_fraction(), 1e-9)
        err = abs(math.log(reached / aim))
        if err < best_err:
            best, best_err = target, err
        if reached < aim / 1.05:
            break
    return best


def tp_scan(model: nn.Module, example: torch.Tensor, reduction: float, make: Callable) -> nn.Module:
    """Torch-Pruning at the ratio whose MACs are closest to the target (``tradeoff._ratio_for``)."""
    goal = count_macs(model, example)["macs"] / reduction

    def apply(m: nn.Module, ratio: float) -> nn.Module:
        make(m, ratio).step()
        return m

    def macs_at(ratio: float) -> float:
        return count_macs(apply(copy.deepcopy(model), ratio), example)["macs"]

    return apply(model, T._ratio_for(macs_at, goal, hi=0.95, step=0.01))


def tp_magnitude(model: nn.Module, ratio: float, example: torch.Tensor) -> Any:
    return tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=classifier(model),
    )


def tp_groupnorm(model: nn.Module, ratio: float, example: torch.Tensor, reg: float) -> Any:
    return tp.pruner.GroupNormPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        reg=reg,
        global_pruning=True,
        ignored_layers=classifier(model),
    )


class _TPRegularizer:
    """Trainer callback: Torch-Pruning's sparse learning (``pruner.regularize`` after every backward)."""

    def __init__(self, pruner: Any, model: nn.Module) -> None:
        self.pruner, self.model = pruner, model

    def on_train_begin(self, trainer: Any) -> None:
        self.pruner.update_regularizer()

    def on_after_backward(self, trainer: Any) -> None:
        self.pruner.regularize(self.model)


def parse_best(spec: str) -> dict[str, Any]:
    """``--best`` = ``+``-joined parts: ``sparse`` (group-sparse training first), ``kd`` (fine-tune with
    distillation), ``kd-sparse`` (distil during the sparse-learning steps too), ``crit=<group criterion>``,
    ``alloc=<allocation>``, and overrides of this recipe's settings: ``T=<kd temperature>``,
    ``alpha=<kd weight>``, ``greg=<GReg penalty increment>`` (the step budget is never changed)."""
    out: dict[str, Any] = {
        "sparse": False,
        "kd": False,
        "kd-sparse": False,
        "criterion": None,
        "allocation": None,
        "overrides": {},
    }
    names = {"T": "kd_temperature", "alpha": "kd_alpha", "greg": "greg_delta"}
    for part in filter(None, spec.split("+")):
        if part in ("sparse", "kd", "kd-sparse"):
            out[part] = True
        elif part.split("=")[0] in names and "=" in part:
            out["overrides"][names[part.split("=")[0]]] = float(part.split("=", 1)[1])
        elif part.startswith("crit="):
            out["criterion"] = part[5:]
        elif part.startswith("alloc="):
            out["allocation"] = part[6:]
        else:
            raise SystemExit(
                f"--best: unknown part {part!r} (sparse, kd, kd-sparse, crit=<name>, alloc=<name>, "
                "T=<x>, alpha=<x>, greg=<x>)"
            )
    return out


# ------------------------------------------------------------------------------------------ a point
def point(
    bench: Bench, dense: nn.Module, dinfo: dict, method: str, target: float, seed: int, aim: float | None
) -> dict:
    """One pruned + fine-tuned model. ``target``: the nominal MAC reduction; ``aim``: the reduction to aim
    at (Torch-Pruning MagnitudePruner's achieved one at this target, or ``target``)."""
    if method == "secateur-best":  # the recipe's own settings, for this point only
        saved = bench.cfg
        bench.cfg = {**saved, **parse_best(saved["best"])["overrides"]}
        try:
            return _point(bench, dense, dinfo, method, target, seed, aim)
        finally:
            bench.cfg = saved
    return _point(bench, dense, dinfo, method, target, seed, aim)


def _point(
    bench: Bench, dense: nn.Module, dinfo: dict, method: str, target: float, seed: int, aim: float | None
) -> dict:
    cfg, example = bench.cfg, bench.example
    reduction = target if aim is None or method == "tp-magnitude" else aim
    model = copy.deepcopy(dense).train()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    sparse_s, kd = 0.0, False
    recipe = ""
    if method == "secateur-default":
        model = secateur_channels(model, example, reduction, None, seed)
        recipe = "ChannelPruner defaults, target='macs'"
    elif method == "random":
        model = secateur_channels(model, example, reduction, "random", seed)
        recipe = "criterion='random', target='macs'"
    elif method in ("secateur-sparse", "secateur-best"):
        best = parse_best(cfg["best"] if method == "secateur-best" else "sparse")
        crit = best["criterion"]
        if best["sparse"]:
            teacher = dense if best["kd-sparse"] else None
            sparse_s, model = secateur_sparse(
                bench, model, reduction, crit, seed, best["allocation"], teacher=teacher
            )
        else:
            model = secateur_channels(model, example, reduction, crit, seed, allocation=best["allocation"])
        kd = bool(best.get("kd"))
        recipe = (
            cfg["best"]
            if method == "secateur-best"
            else "GrowingRegularization (GReg) + ChannelPruner defaults"
        )
    elif method == "tp-magnitude":
        model = tp_scan(model, example, reduction, lambda m, r: tp_magnitude(m, r, example))
        recipe = "MagnitudePruner(MagnitudeImportance(p=1)), per-layer ratio scan"
    elif method == "tp-groupnorm":
        reg = cfg["tp_reg"]

        def learn(m: nn.Module) -> None:
            sl = tp_groupnorm(m, 0.5, example, reg)
            bench.train_steps(m, seed, cfg["sparse_steps"], cfg["sparse_lr"], [_TPRegularizer(sl, m)])

        sparse_s = bench.sparse_once(("tp", reg), model, learn)
        model = tp_scan(model, example, reduction, lambda m, r: tp_groupnorm(m, r, example, reg))
        recipe = (
            f"GroupNormPruner(GroupMagnitudeImportance(p=2), reg={reg}, global), sparse learning, ratio scan"
        )
    else:
        raise SystemExit(f"unknown method {method!r}")
    prune_s = time.perf_counter() - t0 - sparse_s
    bench.recalibrate(model, seed)
    acc_oneshot = T.evaluate(model, bench.xte, bench.yte)
    ft_s = bench.finetune_kd(model, dense, seed) if kd else bench.finetune(model, seed)
    acc = T.evaluate(model, bench.xte, bench.yte)
    macs = count_macs(model, example)["macs"]
    return {
        "model": dinfo["model"],
        "target_macs_x": target,
        "aimed_macs_x": reduction,
        "method": method,
        "seed": seed,
        "achieved_macs_x": dinfo["macs"] / max(macs, 1),
        "params": count_params(model)["params"],
        "accuracy": acc,
        "accuracy_before_finetune": acc_oneshot,
        "dense_accuracy": dinfo["accuracy"],
        "dense_params": dinfo["params"],
        "macs": macs,
        "recipe": recipe,
        "sparse_steps": cfg["sparse_steps"] if sparse_s else 0,
        "finetune_steps": cfg["ft_steps"],
        "distillation": kd,
        "prune_s": round(prune_s, 2),
        "sparse_s": round(sparse_s, 2),
        "finetune_s": round(ft_s, 2),
    }


def secateur_sparse(
    bench: Bench,
    model: nn.Module,
    reduction: float,
    criterion: str | None,
    seed: int,
    allocation: str | None,
    teacher: nn.Module | None = None,
):
    """GReg (Wang et al. 2021, ``secateur.GrowingRegularization``): the driver chooses the units at the MAC
    target first, ``--sparse-steps`` steps grow an L2 penalty on exactly those, then they are removed. With a
    ``teacher``, those steps also distil from it (the same ``Distillation`` as the fine-tuning)."""
    import secateur  # noqa: PLC0415

    cfg = bench.cfg
    kw: dict[str, Any] = {"target": "macs"}
    if criterion is not None:
        kw["criterion"] = criterion
    if allocation is not None:
        kw["allocation"] = allocation
    target = closest_target(model, bench.example, reduction, kw)
    t0 = time.perf_counter()
    reg = secateur.GrowingRegularization(
        model, bench.example, target, delta=cfg["greg_delta"], every=cfg["greg_every"], **kw
    )
    callbacks: list[Any] = [reg]
    if teacher is not None:
        callbacks.append(Distillation(teacher, temperature=cfg["kd_temperature"], alpha=cfg["kd_alpha"]))
    bench.train_steps(model, seed, cfg["sparse_steps"], cfg["sparse_lr"], callbacks)
    sparse_s = time.perf_counter() - t0
    model, _ = reg.finalize()
    return sparse_s, model


# ------------------------------------------------------------------------------------------- run
def _partial_file(cfg: dict[str, Any], spec: str, seed: int) -> Path:
    """Where a (model, seed) task appends each row as soon as it is done (a JSON line, flushed and fsynced):
    a run stopped mid-task resumes at row granularity (``--resume`` merges these files), not task."""
    safe = "".join(c if c.isalnum() or c in "._=-" else "_" for c in spec)
    return Path(cfg["cache_dir"]) / "vs_peers_partial" / f"{safe}-s{seed}.jsonl"


def _append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _partial_rows(cfg: dict[str, Any]) -> list[dict]:
    """Rows of unfinished tasks, from :func:`_partial_file` (a torn last line, from a kill, is skipped)."""
    rows = []
    for path in sorted((Path(cfg["cache_dir"]) / "vs_peers_partial").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def _task(args: tuple[dict, str, int, list[tuple[str, float]], dict[float, float]]) -> list[dict]:
    cfg, spec, seed, todo, prior = args
    partial = _partial_file(cfg, spec, seed)
    torch.set_num_threads(cfg["threads"])
    bench = Bench(cfg)
    dense, dinfo = bench.dense(spec, seed)
    rows: list[dict] = []
    aims: dict[float, float] = dict(prior)
    # Torch-Pruning's MagnitudePruner first: the other methods aim at the reduction it achieves
    todo = sorted(todo, key=lambda mr: mr[0] != "tp-magnitude")
    for method, reduction in todo:
        try:
            row = point(bench, dense, dinfo, method, reduction, seed, aims.get(reduction))
            if method == "tp-magnitude":
                aims[reduction] = row["achieved_macs_x"]
        except Exception as exc:  # record and go on: one failing method must not sink the run
            row = {
                "model": spec,
                "seed": seed,
                "method": method,
                "target_macs_x": reduction,
                "error": f"{type(exc).__name__}: {exc}",
            }
            log(f"ERROR {row}")
        else:
            log(
                f"{spec} s{seed} {method:17s} {reduction:g}x -> {row['achieved_macs_x']:.2f}x: "
                f"{row['accuracy_before_finetune']:.4f} -> {row['accuracy']:.4f}"
            )
            _append_row(partial, row)
        rows.append(row)
    return rows


def graph_speed(reps: int) -> dict[str, Any]:
    """``graph_speed.py`` in a subprocess (same run): the two headline ratios and its exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gs.json"
        cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "graph_speed.py"),
            "--reps",
            str(reps),
            "--threads",
            "1",
            "--skip-latency",
            "--skip-verified",
            "--out",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if not out.exists():
            return {"error": proc.stderr[-2000:], "exit_code": proc.returncode}
        res = json.loads(out.read_text())
    speed = {"exit_code": proc.returncode, "command": " ".join(cmd[1:])}
    for name, m in res.get("models", {}).items():
        key = "resnet50_speedup" if "resnet" in name.lower() else "vit_base_speedup"
        speed[key] = m.get("speedup_total")
    return speed


def run(cfg: dict[str, Any], out: Path, resume: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"rows": []}
    if resume and out.exists():
        res = json.loads(out.read_text())
    res["rows"] = [r for r in res["rows"] if "error" not in r]
    key = lambda r: (r["model"], r["seed"], r["method"], r["target_macs_x"])  # noqa: E731
    done = {key(r) for r in res["rows"]}
    if resume:  # rows of tasks a stopped run had not finished
        for r in _partial_rows(cfg):
            if key(r) not in done:
                res["rows"].append(r)
                done.add(key(r))
    else:
        shutil.rmtree(Path(cfg["cache_dir"]) / "vs_peers_partial", ignore_errors=True)
    res["config"] = {k: v for k, v in cfg.items() if k != "command"}
    res.setdefault("commands", []).append(cfg["command"])
    res["environment"] = {
        "torch": torch.__version__,
        "torch_pruning": getattr(tp, "__version__", "1.6.0"),
        "threads_per_job": cfg["threads"],
        "jobs": cfg["jobs"],
        "cpu_count": os.cpu_count(),
    }
    tasks = []
    for spec in cfg["models"]:
        for seed in cfg["seeds"]:
            todo = [(m, r) for r in cfg["targets"] for m in cfg["methods"] if (spec, seed, m, r) not in done]
            prior = {
                r["target_macs_x"]: r["achieved_macs_x"]
                for r in res["rows"]
                if (r["model"], r["seed"], r["method"]) == (spec, seed, "tp-magnitude")
            }
            if todo:
                tasks.append((cfg, spec, seed, todo, prior))

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out)

    def merge(task: tuple, rows: list[dict]) -> None:
        res["rows"] += rows
        save()  # the rows are in the JSON now: the task's row file is no longer needed
        _partial_file(cfg, task[1], task[2]).unlink(missing_ok=True)

    save()
    t0 = time.perf_counter()
    if cfg["jobs"] > 1:
        with ProcessPoolExecutor(cfg["jobs"]) as pool:
            for t, rows in zip(tasks, pool.map(_task, tasks)):
                merge(t, rows)
    else:
        for t in tasks:
            merge(t, _task(t))
    res["wall_s"] = res.get("wall_s", 0.0) + time.perf_counter() - t0
    if cfg["speed"]:
        res["speed"] = graph_speed(cfg["speed"])
    save()
    return res


# ------------------------------------------------------------------------------------------ docs
def _mean(vals: list[float]) -> float:
    return sum(vals) / len(vals)


def _sd(vals: list[float]) -> float:
    m = _mean(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0


def summary(res: dict) -> dict[tuple[str, str, float], dict[str, float]]:
    cells: dict[tuple[str, str, float], list[dict]] = {}
    for r in res["rows"]:
        if "error" not in r:
            cells.setdefault((r["model"], r["method"], r["target_macs_x"]), []).append(r)
    return {
        k: {
            "acc": _mean([100 * r["accuracy"] for r in v]),
            "sd": _sd([100 * r["accuracy"] for r in v]),
            "x": _mean([r["achieved_macs_x"] for r in v]),
            "n": len(v),
        }
        for k, v in cells.items()
    }


def checks(res: dict) -> list[str]:
    """The issue's must-show comparisons, computed from the rows."""
    s = summary(res)
    lines = []
    models = sorted({k[0] for k in s})
    for model in models:
        for x in sorted({k[2] for k in s if k[0] == model}):
            pairs = [
                ("secateur-default", "tp-magnitude", -0.1, (1.5, 2.0, 3.0, 4.0)),
                ("secateur-best", "tp-groupnorm", 0.5, (2.0, 3.0, 4.0)),
            ]
            for ours, peer, margin, at in pairs:
                a, b = s.get((model, ours, x)), s.get((model, peer, x))
                if a is None or b is None or x not in at:
                    continue
                ok = a["acc"] >= b["acc"] + margin
                dx = abs(a["x"] / b["x"] - 1)
                lines.append(
                    f"| {model} | {x:g}x | {ours} {a['acc']:.1f} vs {peer} {b['acc']:.1f} "
                    f"({'+' if margin >= 0 else ''}{margin:g} pt needed) | {'yes' if ok else '**no**'} "
                    f"| {a['x']:.2f}x vs {b['x']:.2f}x ({'within' if dx <= 0.03 else '**beyond**'} 3%) |"
                )
    return [
        "| model | target | mean accuracy (%) | met | achieved MACs |",
        "| --- | --- | --- | --- | --- |",
        *lines,
    ]


def plot(res: dict, img_dir: Path) -> list[str]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    s = summary(res)
    models = sorted({k[0] for k in s})
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in METHODS:
            pts = sorted(
                (v["x"], v["acc"], v["sd"]) for k, v in s.items() if k[0] == model and k[1] == method
            )
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MAC reduction (achieved, x)")
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy after fine-tuning (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    img_dir.mkdir(parents=True, exist_ok=True)
    path = img_dir / "vs_peers.png"
    fig.savefig(path, dpi=110)
    return [f"![secateur vs Torch-Pruning](img/{path.name})"]


def superseded_lines(res: dict) -> list[str]:
    """Rows replaced by a later run (kept in the JSON under ``superseded``), as mean accuracies."""
    out = []
    for entry in res.get("superseded", []):
        s = summary({"rows": entry["rows"]})
        recipes = sorted({r.get("recipe", "?") for r in entry["rows"]})
        cells = ", ".join(
            f"{model.split(':')[0]} {x:g}x {v['acc']:.1f}" for (model, _m, x), v in sorted(s.items())
        )
        out += [f"Superseded ({entry['why']}; recipe {', '.join(f'`{r}`' for r in recipes)}): {cells}.", ""]
    return out


def best_sweep_lines(best: str) -> list[str]:
    """How ``--best`` was chosen: the means of ``benchmarks/vs_peers_best_sweep.py``'s recipes, if run."""
    path = ROOT / "benchmarks" / "results" / "vs_peers_best_sweep.json"
    if not path.exists():
        return []
    sweep = json.loads(path.read_text())
    cells: dict[tuple[str, str, float], list[float]] = {}
    for e in sweep["entries"]:
        cells.setdefault((e["recipe"], e["model"], e["target_macs_x"]), []).append(100 * e["accuracy"])
    lines = [
        f"How secateur-best's recipe (`{best}`) was chosen: `{sweep['command'][-1]}` "
        "(`benchmarks/results/vs_peers_best_sweep.json`), the same budget and seeds, secateur-best only. "
        "These accuracies are on the test split (the benchmark has no validation split), so the choice is "
        "selection on the test data of that one model and target; every other model and target above is "
        "out of sample.",
        "",
        "| recipe | model | target | mean accuracy (%) | seeds |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for (recipe, model, x), accs in cells.items():
        mark = " (chosen)" if recipe == best else ""
        lines.append(f"| `{recipe}`{mark} | {model} | {x:g}x | {_mean(accs):.2f} | {len(accs)} |")
    return [*lines, ""]


def docs(res: dict, path: Path, img_dir: Path) -> None:
    s = summary(res)
    cfg = res["config"]
    lines = [
        f"Produced by `{res['commands'][-1]}` (earlier parts of the same run: "
        f"{'; '.join(f'`{c}`' for c in res['commands'][:-1]) or 'none'}); results: "
        "`benchmarks/results/vs_peers.json`.",
        "",
        f"Protocol: dense weights trained once per model and seed ({cfg['dense_epochs']} epochs of "
        f"{cfg['train_subset'] or 60000} images); every method prunes a copy to the MAC target, BatchNorm is "
        f"re-estimated on {cfg['bn_batches']} training batches for every method, then {cfg['ft_steps']} SGD "
        f"steps of batch {cfg['batch_size']} (lr {cfg['ft_lr']}, cosine) on the same batches. The sparse-"
        f"learning methods first train {cfg['sparse_steps']} steps with their regulariser. secateur-best: "
        f"`{cfg['best']}`. Accuracy: mean ± std over the seeds run so far "
        f"({sorted({r['seed'] for r in res['rows'] if 'error' not in r})} of {cfg['seeds']}) on the first "
        f"{cfg['test_subset'] or 10000} test images; the "
        "achieved MAC reduction in brackets.",
        "",
    ]
    for model in sorted({k[0] for k in s}):
        xs = sorted({k[2] for k in s if k[0] == model})
        lines += [
            f"**{model}**",
            "",
            "| method | " + " | ".join(f"{x:g}x" for x in xs) + " |",
            "| --- |" + " ---: |" * len(xs),
        ]
        for method in METHODS:
            cells = [s.get((model, method, x)) for x in xs]
            if any(cells):
                lines.append(
                    f"| {method} | "
                    + " | ".join(
                        f"{c['acc']:.1f} ± {c['sd']:.1f} [{c['x']:.2f}x]" if c else "" for c in cells
                    )
                    + " |"
                )
        lines.append("")
    lines += ["Checks of issue 14 (computed from the rows):", "", *checks(res), ""]
    lines += best_sweep_lines(cfg.get("best", ""))
    lines += superseded_lines(res)
    if "speed" in res:
        sp = res["speed"]
        lines.append(
            f"Graph build + one 50% step vs Torch-Pruning (`{sp.get('command')}`, same run): ResNet-50 "
            f"{sp.get('resnet50_speedup')}x, ViT-base {sp.get('vit_base_speedup')}x."
        )
        lines.append("")
    lines += plot(res, img_dir)
    write_block(
        path,
        "<!-- vs_peers:begin -->",
        "<!-- vs_peers:end -->",
        "\n".join(lines),
        heading="## secateur vs Torch-Pruning at equal MACs (issue 14)\n\n",
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--best", default="sparse+kd", help="secateur-best's recipe: sparse, kd, crit=<name>")
    ap.add_argument("--train-subset", type=int, default=0, help="first N training images (0: all 60k)")
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--dense-epochs", type=int, default=3)
    ap.add_argument("--dense-lr", type=float, default=0.1)
    ap.add_argument("--ft-steps", type=int, default=469, help="fine-tuning steps (469 = 1 epoch of 60k)")
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--sparse-steps", type=int, default=469)
    ap.add_argument(
        "--sparse-lr", type=float, default=0.01, help="learning rate of the sparse-learning steps"
    )
    ap.add_argument("--greg-delta", type=float, default=0.05, help="GReg: penalty increment")
    ap.add_argument("--greg-every", type=int, default=5, help="GReg: steps between increments")
    ap.add_argument("--tp-reg", type=float, default=5e-4, help="GroupNormPruner's reg")
    ap.add_argument("--kd-temperature", type=float, default=4.0)
    ap.add_argument("--kd-alpha", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--bn-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--jobs", type=int, default=1, help="(model, seed) tasks run in parallel")
    ap.add_argument("--speed", type=int, default=0, help="run graph_speed.py with this many reps (0: skip)")
    ap.add_argument("--cache-dir", default=str(ROOT / "benchmarks" / "cache"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vs_peers.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--img-dir", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--docs-only", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if not a.docs_only:
        cfg = {k: v for k, v in vars(a).items() if k not in ("out", "docs", "img_dir", "resume", "docs_only")}
        cfg.update(
            score_batches=max(a.bn_batches, 4),
            eval_oneshot=True,
            command="python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        )
        run(cfg, out, a.resume)
    docs(json.loads(out.read_text()), Path(a.docs), Path(a.img_dir))


if __name__ == "__main__":
    main()
