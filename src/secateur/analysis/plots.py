"""Matplotlib plots for reports (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(
    history: Sequence[dict], path: str | Path, title: str = "Accuracy and sparsity over training"
) -> Path:
    """Plot test accuracy (points at evaluations) and sparsity (line) against the training step.

    ``history`` rows may hold ``step`` (global optimizer step), ``eval_accuracy`` (fraction),
    ``train_accuracy`` (fraction, running) and ``sparsity`` (fraction); missing keys are skipped.
    Writes a PNG to ``path`` and returns it.
    """
    path = Path(path)
    fig, ax1 = plt.subplots(figsize=(8, 4.5), dpi=110)
    ev = [(h["step"], h["eval_accuracy"]) for h in history if h.get("eval_accuracy") is not None]
    tr = [(h["step"], h["train_accuracy"]) for h in history if h.get("train_accuracy") is not None]
    sp = [(h["step"], h["sparsity"]) for h in history if h.get("sparsity") is not None]
    if tr:
        ax1.plot(*zip(*tr), color="tab:blue", alpha=0.35, lw=1, label="train accuracy (running)")
    if ev:
        ax1.plot(*zip(*ev), "o-", color="tab:blue", label="test accuracy")
    ax1.set_xlabel("training step (optimizer steps)")
    ax1.set_ylabel("accuracy")
    ax1.grid(alpha=0.3)
    ax2 = ax1.twinx()
    if sp:
        ax2.plot(*zip(*sp), color="tab:red", lw=2, label="sparsity")
    ax2.set_ylabel("sparsity (fraction of weights zero)")
    ax2.set_ylim(0, 1)
    lines = ax1.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower left")
    ax1.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_layer_sparsity(layers: Sequence[dict], path: str | Path, title: str = "Per-layer sparsity") -> Path:
    """Horizontal bars of each layer's sparsity (fraction), labelled with its parameter count."""
    path = Path(path)
    layers = [r for r in layers if r.get("params")]
    height = max(3.0, 0.28 * len(layers) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height), dpi=110)
    names = [r["name"] for r in layers]
    vals = [r["sparsity"] for r in layers]
    y = range(len(layers))
    ax.barh(list(y), vals, color="tab:red", alpha=0.8)
    ax.set_yticks(list(y), [f"{n} ({r['params']:,})" for n, r in zip(names, layers)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (fraction of the layer's parameters that are zero)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
