"""The embedded demo: train a residual net on Fashion-MNIST, prune it to 90% with the gradual
(cubic) schedule of Zhu & Gupta 2017 while fine-tuning, and report dense vs pruned.

It is the library's main job end to end on real data, sized to run in a few minutes on 2 CPU
cores: a CIFAR-style ResNet-20 whose stem downsamples 28→14 (He et al. 2016 sec. 4.2), SGD with a
per-step cosine learning rate, global magnitude pruning of every conv and linear weight.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from secateur.analysis import count_macs, count_params, layer_table
from secateur.analysis.latency import compare_latency
from secateur.analysis.plots import plot_layer_sparsity, plot_training_curves
from secateur.analysis.report import build_report, environment, layer_comparison
from secateur.data import fashion_mnist_loaders
from secateur.errors import ConfigError
from secateur.pruners.element import Pruner
from secateur.schedules import Cubic
from secateur.train import Trainer, recalibrate_bn, seed_everything
from secateur.zoo import create_model


@dataclass
class DemoConfig:
    """Demo settings. Epoch counts are passes over the 60,000 training images; sparsity is a fraction."""

    model: str = "resnet20"
    stem_stride: int = 2
    dense_epochs: int = 4
    prune_epochs: int = 4
    batch_size: int = 128
    lr: float = 0.1
    prune_lr: float = 0.05
    weight_decay: float = 5e-4
    sparsity: float = 0.9
    prune_updates: int = 20  # n in Zhu & Gupta's schedule
    prune_span: float = 0.6  # fraction of the fine-tuning steps over which sparsity ramps up
    bn_batches: int = 50  # training batches to re-estimate BatchNorm statistics after pruning (0: off)
    subset: int | None = None  # first n images of each split (tests); None = full data
    seed: int = 0
    threads: int = 2
    out_dir: str = "runs/demo"
    progress: bool = True


class _SparsityLog:
    """Trainer callback recording the pruner's sparsity at every mask update and epoch end."""

    def __init__(self, pruner: Pruner, offset: int) -> None:
        self.pruner, self.offset, self.rows = pruner, offset, []

    def on_step_end(self, trainer: Any) -> None:
        if self.pruner.last_update == trainer.global_step:
            self.rows.append({"step": self.offset + trainer.global_step, "sparsity": self.pruner.sparsity()})


def _shift(history: list[dict], offset: int, phase: str) -> list[dict]:
    return [{**h, "step": h["step"] + offset, "phase": phase} for h in history]


def run_demo(cfg: DemoConfig | None = None) -> dict[str, Any]:
    """Run train → prune (cubic schedule, global magnitude) → fine-tune → report.

    Writes ``metrics.json``, ``report.md``, ``report.html`` (self-contained) and PNG plots to
    ``cfg.out_dir`` (see :func:`write_outputs`) and returns the metrics (accuracies as fractions in
    [0, 1], MACs for one 1×1×28×28 image, seconds of wall time). The paths written are in
    ``metrics["outputs"]`` (not saved in ``metrics.json``).
    """
    cfg = cfg or DemoConfig()
    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_loader, test_loader = fashion_mnist_loaders(
        batch_size=cfg.batch_size, subset=cfg.subset, seed=cfg.seed
    )
    model = create_model(cfg.model, num_classes=10, in_chans=1, stem_stride=cfg.stem_stride)
    example = torch.zeros(1, 1, 28, 28)

    # 1. Dense training.
    t0 = time.perf_counter()
    dense = Trainer(
        model, train_loader, test_loader, epochs=cfg.dense_epochs, lr=cfg.lr,
        weight_decay=cfg.weight_decay, progress=cfg.progress, log_every=25,
    )
    dense.fit()
    dense_acc = dense.evaluate(test_loader)["accuracy"]
    dense_seconds = time.perf_counter() - t0
    dense_counts = {**count_params(model), **count_macs(model, example)}
    dense_model = copy.deepcopy(model)  # for the per-layer dense-vs-pruned table of the HTML report

    # 2. Gradual magnitude pruning while fine-tuning (Zhu & Gupta 2017).
    t1 = time.perf_counter()
    steps = cfg.prune_epochs * len(train_loader)
    ramp = max(1, int(cfg.prune_span * steps))  # steps over which sparsity rises
    n_updates = min(cfg.prune_updates, ramp)
    schedule = Cubic(final_sparsity=cfg.sparsity, start=0, every=ramp // n_updates, n=n_updates)
    pruner = Pruner(model, schedule, criterion="magnitude", allocation="global")
    log = _SparsityLog(pruner, offset=dense.global_step)
    finetune = Trainer(
        model, train_loader, test_loader, epochs=cfg.prune_epochs, lr=cfg.prune_lr,
        weight_decay=cfg.weight_decay, callbacks=[pruner, log], progress=cfg.progress, log_every=25,
    )
    finetune.fit()
    pruned_acc = before_bn = finetune.evaluate(test_loader)["accuracy"]
    if cfg.bn_batches:
        # Adaptive BatchNorm (Li et al. 2020): running statistics re-estimated on the pruned network.
        # With a full run they already track it; on a short --subset run they lag the last mask
        # update and can make a working model look like chance.
        recalibrate_bn(model, train_loader, num_batches=cfg.bn_batches)
        pruned_acc = finetune.evaluate(test_loader)["accuracy"]
    prune_seconds = time.perf_counter() - t1
    sparsity = pruner.sparsity()
    scoped = sum(m.numel() for m in pruner.masks().values())  # the weights the sparsity is a fraction of
    pruner.finalize()  # bake masks: plain weights with exact zeros
    pruned_counts = {**count_params(model), **count_macs(model, example)}
    layers = [r.as_dict() for r in layer_table(model, example)]
    comparison = layer_comparison(dense_model, model, example)
    # Unstructured zeros run through the same dense kernels: measured, so the report says it plainly.
    latency = compare_latency(dense_model, model, example, threads=1, repeats=15, block_ms=5.0)
    del dense_model

    history = _shift(dense.history, 0, "dense") + [
        {"step": 0, "sparsity": 0.0},
        {"step": dense.global_step, "sparsity": 0.0},
    ]
    history += _shift(finetune.history, dense.global_step, "prune") + log.rows
    history.append({"step": dense.global_step + finetune.global_step, "sparsity": sparsity})
    if cfg.bn_batches:
        history.append({"step": dense.global_step + finetune.global_step, "eval_accuracy": pruned_acc,
                        "phase": "bn_recalibrated"})
    history.sort(key=lambda h: h["step"])
    metrics = {
        "dense_accuracy": dense_acc,
        "pruned_accuracy": pruned_acc,
        "pruned_accuracy_before_bn_recalibration": before_bn,
        "sparsity": sparsity,
        "params": pruned_counts["params"],
        "nonzero_params": pruned_counts["nonzero_params"],
        "macs": pruned_counts["macs"],
        "sparse_macs": pruned_counts["sparse_macs"],
        "dense": {**dense_counts, "accuracy": dense_acc, "seconds": dense_seconds},
        "pruned": {**pruned_counts, "accuracy": pruned_acc, "seconds": prune_seconds},
        "seconds": time.perf_counter() - t_start,
        "config": asdict(cfg),
        "layers": layers,
        "layer_comparison": comparison,
        "history": history,
        "trajectory": _trajectory(history, dense_counts["params"], scoped),
        "latency": {k: {q: latency[k][f"{q}_ms"] for q in ("median", "q1", "q3")} for k in MODELS},
        "environment": environment(),
    }
    metrics["outputs"] = {k: str(v) for k, v in write_outputs(metrics, out).items()}
    return metrics


def write_outputs(metrics: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write the demo's results to ``out_dir``; return ``{"metrics", "md", "html", <plot>: path}``.

    - ``metrics.json``: ``metrics`` as JSON (without ``outputs``);
    - ``accuracy_sparsity.png`` (:func:`~secateur.analysis.plots.plot_training_curves` of
      ``metrics["history"]``) and ``layer_sparsity.png`` (conv/linear rows of ``metrics["layers"]``);
    - ``report.md`` (:func:`render_report`);
    - ``report.html``: the self-contained report of :func:`secateur.analysis.report.build_report`
      (dense vs pruned table, accuracy-vs-compression and per-layer kept plots from
      ``metrics["layer_comparison"]`` when present, the training curves embedded), and
      ``report.json``, its input.

    ``metrics`` is the dict :func:`run_demo` returns (keys ``config``, ``dense``, ``pruned``,
    ``sparsity``, ``seconds``, ``layers``, ``history``; ``layer_comparison`` and ``environment``
    optional).

    Raises:
        ConfigError: ``metrics`` lacks a key the report needs (the message names it).
    """
    missing = [k for k in ("config", "dense", "pruned", "sparsity", "seconds", "layers", "history")
               if k not in metrics]
    if missing:
        raise ConfigError(f"demo metrics lack {missing}; expected the dict run_demo returns")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = metrics["config"]
    paths: dict[str, Path] = {"metrics": out / "metrics.json"}
    saved = {k: v for k, v in metrics.items() if k != "outputs"}
    paths["metrics"].write_text(json.dumps(saved, indent=2))
    paths["accuracy_sparsity"] = plot_training_curves(
        metrics["history"], out / "accuracy_sparsity.png",
        title=f"{cfg['model']}: dense training, then gradual pruning to {cfg['sparsity']:.0%}",
    )
    weighted = [r for r in metrics["layers"] if r["type"] in ("Conv1d", "Conv2d", "Conv3d", "Linear")]
    paths["layer_sparsity"] = plot_layer_sparsity(
        weighted, out / "layer_sparsity.png", title="Per-layer sparsity of conv/linear weights"
    )
    paths["md"] = out / "report.md"
    paths["md"].write_text(render_report(metrics))
    curves = paths["accuracy_sparsity"].read_bytes()
    written = build_report(
        report_results(metrics), out, formats=("html",), name="report",
        extra_plots={"training_curves": ("Accuracy and sparsity over training", curves)},
    )
    paths["html"] = written["html"]
    return paths


def _command(cfg: dict[str, Any]) -> str:
    """The ``secateur demo`` command line that reproduces a run with these settings."""
    args = [
        "secateur demo",
        f"--dense-epochs {cfg['dense_epochs']}",
        f"--prune-epochs {cfg['prune_epochs']}",
        f"--sparsity {cfg['sparsity']}",
        f"--seed {cfg['seed']}",
        f"--out {cfg['out_dir']}",
    ]
    if cfg.get("subset") is not None:
        args.append(f"--subset {cfg['subset']}")
    return " ".join(args)


def _test_set(cfg: dict[str, Any]) -> str:
    n = cfg.get("subset")
    return "the full 10,000-image test set" if n is None else f"the first {min(n, 10_000):,} test images"


def _bn_note(m: dict[str, Any]) -> str:
    """How the pruned accuracy was measured: after re-estimating BatchNorm statistics, or not."""
    n = m["config"].get("bn_batches", 0)
    if not n:
        return ""
    before = m.get("pruned_accuracy_before_bn_recalibration")
    was = f" (before: {before:.4f})" if isinstance(before, float) else ""
    return (f" Pruned accuracy after re-estimating BatchNorm statistics on {n} training batches "
            f"(adaptive BN, Li et al. 2020){was}.")


MODELS = ("dense", "pruned")


def _trajectory(history: list[dict], dense_params: int, scoped: int) -> list[dict]:
    """Evaluations while pruning as report points: each ``eval_accuracy`` row of the fine-tuning phase with
    the non-zero parameters at that step (``dense_params - sparsity * scoped``, the sparsity last recorded
    at or before it; ``scoped``: the weights the global sparsity is a fraction of)."""
    points, sparsity = [], 0.0
    for h in history:
        if "sparsity" in h:
            sparsity = h["sparsity"]
        if "eval_accuracy" in h and h.get("phase") in ("prune", "bn_recalibrated"):
            nonzero = dense_params - round(sparsity * scoped)
            label = "after BN re-estimation" if h["phase"] == "bn_recalibrated" else f"step {h['step']}"
            points.append({"nonzero_params": nonzero, "accuracy": h["eval_accuracy"], "label": label})
    return points


def report_results(m: dict[str, Any]) -> dict[str, Any]:
    """The demo's metrics as the results dict of :func:`secateur.analysis.report.build_report`.

    Dense and pruned counts (MACs for one 1×1×28×28 image) and accuracies (fractions); the
    per-layer rows are ``m["layer_comparison"]`` (from
    :func:`secateur.analysis.report.layer_comparison`) when present.
    """
    cfg = m["config"]
    keys = ("accuracy", "params", "nonzero_params", "macs", "sparse_macs")
    results: dict[str, Any] = {
        "title": f"secateur demo: {cfg['model']} on Fashion-MNIST, dense vs pruned",
        "description": (
            f"{cfg['dense_epochs']} dense epochs, then {cfg['prune_epochs']} epochs of fine-tuning "
            f"while pruning to {cfg['sparsity']:.0%} global sparsity (magnitude) with the cubic schedule of "
            f"Zhu & Gupta 2017 ({cfg['prune_updates']} updates); achieved sparsity of conv/linear weights "
            f"{m['sparsity']:.4f}. Accuracy on {_test_set(cfg)}.{_bn_note(m)} "
            f"Total wall time {m['seconds']:.0f} s."
        ),
        "dense": {k: m["dense"].get(k) for k in keys},
        "pruned": {k: m["pruned"].get(k) for k in keys},
        "batch_size": 1,
        "command": _command(cfg),
    }
    if m.get("trajectory"):
        results["trajectory"] = m["trajectory"]
    for k, lat in (m.get("latency") or {}).items():
        results[k].update(latency_ms=lat["median"], latency_q1_ms=lat["q1"], latency_q3_ms=lat["q3"])
    if m.get("latency"):
        results["latency"] = {"threads": 1, "batch_size": 1, "device": "cpu"}
    if m.get("layer_comparison"):
        results["layers"] = m["layer_comparison"]
    if m.get("environment"):
        results["environment"] = m["environment"]
    return results


def summary_rows(m: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(quantity, dense, pruned) rows for the demo's table."""
    d, p = m["dense"], m["pruned"]
    return [
        ("top-1 accuracy", f"{d['accuracy']:.4f}", f"{p['accuracy']:.4f}"),
        ("parameters", f"{d['params']:,}", f"{p['params']:,}"),
        ("non-zero parameters", f"{d['nonzero_params']:,}", f"{p['nonzero_params']:,}"),
        ("MACs (1 image)", f"{d['macs']:,}", f"{p['macs']:,}"),
        ("sparse MACs (1 image)", f"{d['sparse_macs']:,}", f"{p['sparse_macs']:,}"),
        ("wall time (s)", f"{d['seconds']:.1f} (train)", f"{p['seconds']:.1f} (prune + fine-tune)"),
    ]


def render_report(m: dict[str, Any]) -> str:
    """The Markdown report: settings, the dense-vs-pruned table, plots and the per-layer table."""
    cfg = m["config"]
    lines = [
        "# secateur demo: gradual magnitude pruning on Fashion-MNIST",
        "",
        f"Model `{cfg['model']}` (stem stride {cfg['stem_stride']}), "
        f"{cfg['dense_epochs']} dense epochs, then "
        f"{cfg['prune_epochs']} epochs of fine-tuning while pruning to {cfg['sparsity']:.0%} global sparsity "
        f"with the cubic schedule of Zhu & Gupta 2017 ({cfg['prune_updates']} updates). "
        f"Accuracy on {_test_set(cfg)}.{_bn_note(m)} Total wall time {m['seconds']:.0f} s. "
        "Self-contained HTML version: [report.html](report.html).",
        "",
        "| | dense | pruned |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(m)]
    lines += [
        "",
        f"Achieved sparsity of conv/linear weights: {m['sparsity']:.4f}.",
        "",
        "![accuracy and sparsity over training](accuracy_sparsity.png)",
        "",
        "![per-layer sparsity](layer_sparsity.png)",
        "",
        "| layer | type | params | non-zero | sparsity | MACs | sparse MACs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in m["layers"]:
        lines.append(
            f"| {r['name']} | {r['type']} | {r['params']:,} | {r['nonzero_params']:,} | {r['sparsity']:.3f} "
            f"| {r['macs']:,} | {r['sparse_macs']:,} |"
        )
    return "\n".join(lines) + "\n"
