"""Plots for reports, drawn on matplotlib's Agg canvas (no pyplot state, no display).

matplotlib is an optional dependency (the ``report`` extra): it is imported when a plot is drawn, and a
missing install raises ``ImportError`` naming ``pip install 'secateur[report]'``.

Axes are chosen not to exaggerate: the accuracy-vs-compression plot's y axis spans at least
:data:`MIN_METRIC_SPAN` (20 points of a fraction metric) below the dense value, so a 2-point drop is a
tenth of the axis, and its floor is written in the axis label; latency plots start at 0.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FRACTION_METRICS",
    "MIN_METRIC_SPAN",
    "POINT_METRICS",
    "metric_axis",
    "plot_accuracy_vs_compression",
    "plot_latency_vs_macs",
    "plot_layer_kept",
    "plot_layer_sparsity",
    "plot_training_curves",
    "trajectory_points",
]

#: Metrics bounded by 1 whose y axis spans at least MIN_METRIC_SPAN (higher is better).
FRACTION_METRICS = ("accuracy", "top-1 accuracy", "embedding cosine", "cosine", "f1", "exact match")
#: Fraction metrics read as percentages: their changes are given in percentage points (a cosine's is
#: given as the absolute change of the cosine).
POINT_METRICS = ("accuracy", "top-1 accuracy", "f1", "exact match")
#: The smallest y span of the accuracy-vs-compression plot below the dense value, for fraction metrics.
MIN_METRIC_SPAN = 0.2


def _figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the report's plots need matplotlib: pip install 'secateur[report]'") from exc
    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# -- accuracy vs compression ----------------------------------------------------------------------
def _metric_value(m: dict[str, Any]) -> float | None:
    v = m.get("metric", m.get("accuracy"))
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def trajectory_points(results: dict[str, Any]) -> list[tuple[float, float, str]]:
    """``(compression, metric, label)`` of the pruning trajectory recorded in ``results``, in order.

    From ``results["trajectory"]`` (points ``{"compression"`` or ``"nonzero_params", "accuracy"`` or
    ``"metric", "label"}``) or, if absent, from ``results["history"]`` rows that hold an evaluation
    (``"eval_accuracy"``) and ``"compression"`` or ``"nonzero_params"``. Compression is the dense model's
    parameter count over the point's non-zero parameters (x-fold), as for the pruned model.
    """
    dense_params = (results.get("dense") or {}).get("params")
    rows = results.get("trajectory")
    key = "accuracy"
    if rows is None:
        rows, key = results.get("history") or [], "eval_accuracy"
    out = []
    for i, r in enumerate(rows):
        y = r.get("metric", r.get(key))
        c = r.get("compression")
        if c is None and r.get("nonzero_params") and dense_params:
            c = dense_params / r["nonzero_params"]
        if isinstance(c, (int, float)) and c > 0 and isinstance(y, (int, float)) and math.isfinite(y):
            out.append((float(c), float(y), str(r.get("label", r.get("phase", i)))))
    return out


def metric_axis(values: Sequence[float], dense: float | None, fraction: bool) -> tuple[float, float]:
    """The y limits of a metric plot: for a fraction metric at least :data:`MIN_METRIC_SPAN` below the dense
    value (or the best value), never below 0 nor above 1, with a small margin; otherwise from 0."""
    vals = [v for v in values if math.isfinite(v)] + ([dense] if dense is not None else [])
    if not vals:
        return 0.0, 1.0
    top = max(vals)
    if not fraction:
        return 0.0, top * 1.05 if top > 0 else 1.0
    ref = dense if dense is not None else top
    lo = min(min(vals), ref - MIN_METRIC_SPAN) - 0.02
    hi = top + 0.02
    return max(0.0, math.floor(lo * 50) / 50), min(1.0, math.ceil(hi * 50) / 50)


def plot_accuracy_vs_compression(results: dict[str, Any]) -> bytes | None:
    """PNG of the metric (accuracy by default) against compression (dense params / non-zero params, log2).

    Draws the sweep (``results["sweep"]``, one line per ``"method"``), the pruning trajectory
    (:func:`trajectory_points`, in the order recorded), the dense model at 1x and the pruned model. The y
    axis follows :func:`metric_axis` and its label says where it starts. ``results["metric_name"]`` names
    the metric (default ``"accuracy"``). Returns None when no point has both values.
    """
    name = str(results.get("metric_name") or "accuracy")
    fraction = name in FRACTION_METRICS
    series: dict[str, list[tuple[float, float]]] = {}
    for pt in results.get("sweep") or []:
        y = _metric_value(pt)
        if pt.get("compression") is not None and y is not None:
            series.setdefault(str(pt.get("method", "sweep")), []).append((pt["compression"], y))
    traj = trajectory_points(results)
    d, p = results.get("dense") or {}, results.get("pruned") or {}
    dense_y, pruned_y = _metric_value(d), _metric_value(p)
    # Relative to the dense model: a compacted model's own params / non-zero params is 1.
    c = d["params"] / p["nonzero_params"] if d.get("params") and p.get("nonzero_params") else None
    pruned_pt = (c, pruned_y) if c and pruned_y is not None else None
    if not series and not pruned_pt and not traj:
        return None
    fig = _figure((7, 4.2))
    ax = fig.add_subplot()
    for label, pts in series.items():
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=label)
    if traj:
        ax.plot([t[0] for t in traj], [t[1] for t in traj], ".-", color="tab:blue", alpha=0.6, lw=1,
                label=f"pruning trajectory ({len(traj)} points)")
    if dense_y is not None:
        ax.axhline(dense_y, color="grey", ls="--", lw=1, label=f"dense ({dense_y:.3f})")
        ax.plot(1.0, dense_y, "s", color="black")
    if pruned_pt:
        drop = ""
        if dense_y is not None:
            delta = pruned_pt[1] - dense_y
            drop = (f", {100 * delta:+.1f} pt" if name in POINT_METRICS
                    else f", {delta:+.3f}" if fraction else f", {pruned_pt[1]:.3g}")
        ax.plot(*pruned_pt, "*", ms=14, color="tab:red", label=f"this model ({pruned_pt[0]:.2f}x{drop})")
    values = [y for pts in series.values() for _, y in pts] + [t[1] for t in traj]
    values += [pruned_pt[1]] if pruned_pt else []
    lo, hi = metric_axis(values, dense_y, fraction)
    ax.set_ylim(lo, hi)
    ax.set_xscale("log", base=2)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("compression: dense parameters / non-zero parameters (log2 scale)")
    unit = "fraction; " if fraction else ""
    ax.set_ylabel(f"{name} ({unit}axis from {lo:.2f})")
    ax.set_title(f"{name[:1].upper()}{name[1:]} vs compression")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


# -- per-layer kept ratio ---------------------------------------------------------------------------
def plot_layer_kept(layers: Sequence[dict[str, Any]]) -> bytes | None:
    """PNG of horizontal bars: fraction of each layer's dense parameters kept, dense vs pruned."""
    rows = [r for r in layers if r.get("dense_params")]
    if not rows:
        return None
    fig = _figure((7, max(3.0, 0.32 * len(rows) + 1.4)))
    ax = fig.add_subplot()
    y = list(range(len(rows)))
    dense = [r.get("dense_kept") or 0.0 for r in rows]
    pruned = [r.get("pruned_kept") or 0.0 for r in rows]
    ax.barh([v - 0.2 for v in y], dense, height=0.4, color="tab:grey", label="dense")
    ax.barh([v + 0.2 for v in y], pruned, height=0.4, color="tab:green", label="pruned")
    ax.set_yticks(y, [f"{r['name']} ({r['dense_params']:,})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("kept fraction of the dense layer's parameters")
    ax.set_title("Per-layer kept ratio")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


# -- latency vs MACs --------------------------------------------------------------------------------
def _yerr(points: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Asymmetric error bars from the quartiles when known, else +-IQR/2 around the median."""
    lo, hi = [], []
    for q in points:
        med = q["latency_ms"]
        if q.get("latency_q1_ms") is not None and q.get("latency_q3_ms") is not None:
            lo.append(max(0.0, med - q["latency_q1_ms"]))
            hi.append(max(0.0, q["latency_q3_ms"] - med))
        else:
            half = (q.get("latency_iqr_ms") or 0.0) / 2
            lo.append(min(half, med))
            hi.append(half)
    return [lo, hi]


def _draw_model_latency(ax: Any, results: dict[str, Any]) -> None:
    for key, color, marker in (("dense", "black", "s"), ("pruned", "tab:red", "*")):
        m = results.get(key) or {}
        if m.get("latency_ms") is None or not m.get("macs"):
            continue
        ax.errorbar([m["macs"]], [m["latency_ms"]], yerr=_yerr([m]), fmt=marker,
                    ms=10 if marker == "*" else 7, color=color, capsize=3, label=f"{key} (MACs run)")
        sm = m.get("sparse_macs")
        if key == "pruned" and sm and sm < m["macs"]:
            ax.plot([sm], [m["latency_ms"]], marker, mfc="none", ms=10, color=color,
                    label="pruned at its sparse MACs")
            ax.plot([sm, m["macs"]], [m["latency_ms"]] * 2, ":", color=color, lw=1)


def plot_latency_vs_macs(results: dict[str, Any]) -> bytes | None:
    """PNG of measured latency (median ms, quartiles as error bars) against MACs executed.

    Dense and pruned models are plotted at their dense-equivalent MACs (what the hardware runs), with the
    pruned model's *sparse* MACs (what a sparse kernel could skip) as a hollow marker; sweep points with
    ``latency_ms`` and ``macs`` are added. Both axes start at 0. Returns None without latency data.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for pt in results.get("sweep") or []:
        if pt.get("latency_ms") is not None and pt.get("macs"):
            groups.setdefault(str(pt.get("method", "sweep")), []).append(pt)
    models = [results.get(k) or {} for k in ("dense", "pruned")]
    has_models = any(m.get("latency_ms") is not None and m.get("macs") for m in models)
    if not groups and not has_models:
        return None
    fig = _figure((7, 4.2))
    ax = fig.add_subplot()
    for name, pts in groups.items():
        pts = sorted(pts, key=lambda q: q["macs"])
        ax.errorbar([q["macs"] for q in pts], [q["latency_ms"] for q in pts], yerr=_yerr(pts), fmt="o-",
                    capsize=3, label=name)
    _draw_model_latency(ax, results)
    ax.set_xlabel("MACs per forward (multiply-accumulates)")
    ax.set_ylabel("latency (ms, median; bars: quartiles)")
    ax.set_title("Latency vs MACs")
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


# -- files for the demo -----------------------------------------------------------------------------
def plot_training_curves(
    history: Sequence[dict], path: str | Path, title: str = "Accuracy and sparsity over training"
) -> Path:
    """Plot test accuracy (points at evaluations) and sparsity (line) against the training step.

    ``history`` rows may hold ``step`` (global optimizer step), ``eval_accuracy`` (fraction),
    ``train_accuracy`` (fraction, running) and ``sparsity`` (fraction); missing keys are skipped.
    The accuracy axis spans [0, 1]. Writes a PNG to ``path`` and returns it.

    Raises:
        ImportError: matplotlib is missing (names ``secateur[report]``).
    """
    path = Path(path)
    fig = _figure((8, 4.5))
    ax1 = fig.add_subplot()
    ev = [(h["step"], h["eval_accuracy"]) for h in history if h.get("eval_accuracy") is not None]
    tr = [(h["step"], h["train_accuracy"]) for h in history if h.get("train_accuracy") is not None]
    sp = [(h["step"], h["sparsity"]) for h in history if h.get("sparsity") is not None]
    if tr:
        ax1.plot(*zip(*tr), color="tab:blue", alpha=0.35, lw=1, label="train accuracy (running)")
    if ev:
        ax1.plot(*zip(*ev), "o-", color="tab:blue", label="test accuracy")
    ax1.set_xlabel("training step (optimizer steps)")
    ax1.set_ylabel("accuracy (fraction)")
    ax1.set_ylim(0, 1)
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
    path.write_bytes(_png(fig))
    return path


def plot_layer_sparsity(layers: Sequence[dict], path: str | Path, title: str = "Per-layer sparsity") -> Path:
    """Horizontal bars of each layer's sparsity (fraction), labelled with its parameter count; a PNG at
    ``path`` (returned).

    Raises:
        ImportError: matplotlib is missing (names ``secateur[report]``).
    """
    path = Path(path)
    layers = [r for r in layers if r.get("params")]
    fig = _figure((8, max(3.0, 0.28 * len(layers) + 1.2)))
    ax = fig.add_subplot()
    y = list(range(len(layers)))
    ax.barh(y, [r["sparsity"] for r in layers], color="tab:red", alpha=0.8)
    ax.set_yticks(y, [f"{r['name']} ({r['params']:,})" for r in layers], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("sparsity (fraction of the layer's parameters that are zero)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    path.write_bytes(_png(fig))
    return path
