"""Dense-vs-pruned reports: one self-contained HTML file and a Markdown file with PNG plots beside it.

The HTML report embeds its plots as base64 PNG data URIs and its CSS inline, so it is one file
that can be mailed, attached to a CI run or opened offline; it loads nothing from the network.
Plots are drawn with matplotlib's Agg canvas directly (no pyplot state, no display).

The input is a plain dict (see :func:`build_report`), so results measured elsewhere (a benchmark
sweep, a JSON file) render the same way; :func:`collect_results` fills it from two models.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur._torch import eval_mode
from secateur.analysis.plots import (
    FRACTION_METRICS,
    POINT_METRICS,
    plot_accuracy_vs_compression,
    plot_latency_vs_macs,
    plot_layer_kept,
)
from secateur.analysis.progress import Steps
from secateur.errors import ConfigError

__all__ = [
    "build_report",
    "collect_results",
    "environment",
    "headline",
    "layer_comparison",
    "metric_change_text",
    "plot_accuracy_vs_compression",
    "plot_latency_vs_macs",
    "plot_layer_kept",
    "render_html",
    "render_markdown",
    "summary_rows",
]

_FORMATS = ("html", "md")


# -- collecting ---------------------------------------------------------------------------------
def _eval_layer_table(model: nn.Module, example_inputs: Any) -> list[Any]:
    """``layer_table`` in eval mode (no batch-norm statistics updated), the mode restored after."""
    from secateur.analysis.counting import layer_table

    with eval_mode(model):
        return layer_table(model, example_inputs)


def layer_comparison(dense: nn.Module, pruned: nn.Module, example_inputs: Any) -> list[dict[str, Any]]:
    """Per leaf layer (matched by module path): dense and pruned kept ratio, params and MACs.

    Both models run one forward in eval mode (their modes are restored). The kept ratio is the
    layer's non-zero parameters divided by the *dense* layer's parameter count (a fraction in
    [0, 1]), so it means the same for a masked model (zeros) and a compacted one (fewer
    channels). Layers present only in one model are kept with ``None`` for the other.

    Returns:
        Rows ``{"name", "type", "dense_params", "pruned_params", "pruned_nonzero", "dense_kept",
        "pruned_kept", "dense_macs", "pruned_macs", "pruned_sparse_macs"}`` in dense order.
    """
    d_rows = {r.name: r for r in _eval_layer_table(dense, example_inputs)}
    p_rows = {r.name: r for r in _eval_layer_table(pruned, example_inputs)}
    names = list(d_rows) + [n for n in p_rows if n not in d_rows]
    out = []
    for name in names:
        d, p = d_rows.get(name), p_rows.get(name)
        base = d.params if d is not None else (p.params if p is not None else 0)
        out.append(
            {
                "name": name,
                "type": (d or p).type,  # type: ignore[union-attr]
                "dense_params": d.params if d else None,
                "pruned_params": p.params if p else None,
                "pruned_nonzero": p.nonzero_params if p else None,
                "dense_kept": (d.nonzero_params / base) if d and base else None,
                "pruned_kept": (p.nonzero_params / base) if p and base else (0.0 if d and base else None),
                "dense_macs": d.macs if d else None,
                "pruned_macs": p.macs if p else None,
                "pruned_sparse_macs": p.sparse_macs if p else None,
            }
        )
    return out


def collect_results(
    dense: nn.Module,
    pruned: nn.Module,
    example_inputs: Any,
    *,
    dense_accuracy: float | None = None,
    pruned_accuracy: float | None = None,
    latency: bool = True,
    memory: bool = True,
    sizes: bool = True,
    threads: int | None = None,
    repeats: int = 30,
    onnx_dir: str | os.PathLike[str] | None = None,
    deployment: dict[str, Any] | None = None,
    title: str = "secateur pruning report",
    progress: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Measure two models and return the dict :func:`build_report` takes.

    Counts from :func:`secateur.analysis.counting.count_params`/``count_macs``; latency from
    :func:`secateur.analysis.latency.compare_latency` (both models interleaved in one run), peak
    activation memory from :func:`secateur.analysis.latency.peak_memory`; with ``sizes``, each model's
    size on disk as a safetensors file of its weights (``file_bytes``:
    :func:`secateur.analysis.deploy.weights_file`, written to a temporary folder). With ``onnx_dir``,
    both models are exported there (``dense.onnx``, ``pruned.onnx``) and timed under ONNX Runtime,
    interleaved (:func:`secateur.analysis.onnx.compare_onnx_latency`; needs the ``onnx`` extra). With
    ``deployment`` (keyword arguments of :func:`secateur.analysis.deploy.measure_deployment`, e.g.
    ``{"batch_sizes": (1, 32)}``), both models are measured in every runtime side by side (rows under
    ``"deployment"``). Accuracies are fractions in [0, 1] measured by the caller. ``extra`` keys
    (``sweep``, ``trajectory``, ``history``, ``recipe``, ``metric_name``, ``command``, ``description``)
    are copied into the result. A progress bar shows on stderr (``progress=None``: only on a terminal).

    Raises:
        ImportError: ``onnx_dir`` or ``deployment`` given without onnx/onnxruntime/onnxscript installed.
    """
    from secateur.analysis.counting import count_macs, count_params
    from secateur.analysis.latency import peak_memory

    n_steps = 3 + latency + sizes + 2 * (onnx_dir is not None) + (deployment is not None)
    res: dict[str, Any] = {"title": title}
    with Steps("report", n_steps, progress) as bar:
        for key, model, acc in (("dense", dense, dense_accuracy), ("pruned", pruned, pruned_accuracy)):
            with bar.step(f"{key}: counts" + (", memory" if memory else "")), eval_mode(model):
                res[key] = {"accuracy": acc, **count_params(model), **count_macs(model, example_inputs)}
                if memory:
                    peak = peak_memory(model, example_inputs)
                    res[key]["peak_activation_bytes"] = peak["peak_activation_bytes"]
        if sizes:
            with bar.step("size on disk"):
                _file_sizes(res, dense, pruned)
        if latency:
            with bar.step("latency (eager)"):
                _eager_latency(res, dense, pruned, example_inputs, threads, repeats)
        if onnx_dir is not None:
            _onnx_latency(res, dense, pruned, example_inputs, Path(onnx_dir), threads, repeats, bar)
        if deployment is not None:
            with bar.step("deployment runtimes"):
                from secateur.analysis.deploy import measure_deployment

                kwargs = {"threads": threads or 1, "progress": False, **deployment}
                res["deployment"] = measure_deployment({"dense": dense, "pruned": pruned}, example_inputs,
                                                       **kwargs)
        with bar.step("per-layer table"):
            res["layers"] = layer_comparison(dense, pruned, example_inputs)
    res["environment"] = environment()
    res.update(extra)
    return res


def _file_sizes(res: dict[str, Any], dense: nn.Module, pruned: nn.Module) -> None:
    import tempfile

    from secateur.analysis.deploy import weights_file

    with tempfile.TemporaryDirectory() as tmp:
        for key, model in (("dense", dense), ("pruned", pruned)):
            res[key]["file_bytes"] = weights_file(model, Path(tmp) / f"{key}.safetensors").stat().st_size


def _eager_latency(res: dict[str, Any], dense: nn.Module, pruned: nn.Module, example_inputs: Any,
                   threads: int | None, repeats: int) -> None:
    from secateur.analysis.latency import compare_latency

    lat = compare_latency(dense, pruned, example_inputs, threads=threads, repeats=repeats)
    for key in ("dense", "pruned"):
        for stat in ("median", "iqr", "q1", "q3"):
            res[key]["latency_ms" if stat == "median" else f"latency_{stat}_ms"] = lat[key][f"{stat}_ms"]
    res["latency"] = {
        "threads": lat["dense"]["threads"],
        "batch_size": lat["dense"]["batch_size"],
        "blocks": lat["dense"]["n"],
        "device": lat["dense"]["device"],
    }


def _onnx_latency(res: dict[str, Any], dense: nn.Module, pruned: nn.Module, example_inputs: Any,
                  onnx_dir: Path, threads: int | None, repeats: int, bar: Steps) -> None:
    from secateur.analysis.onnx import compare_onnx_latency, export_onnx

    with bar.step("ONNX export"):
        paths = {
            key: export_onnx(m, example_inputs, onnx_dir / f"{key}.onnx", progress=False)
            for key, m in (("dense", dense), ("pruned", pruned))
        }
    with bar.step("latency (ONNX Runtime)"):
        ox = compare_onnx_latency(paths["dense"], paths["pruned"], example_inputs, threads=threads,
                                  repeats=repeats)
    for key in ("dense", "pruned"):
        for stat in ("median", "iqr", "q1", "q3"):
            out_key = "onnx_latency_ms" if stat == "median" else f"onnx_latency_{stat}_ms"
            res[key][out_key] = ox[key][f"{stat}_ms"]
        res[key]["onnx_file_bytes"] = paths[key].stat().st_size


def environment() -> dict[str, Any]:
    """Where a measurement ran: torch and Python versions, machine, processor, torch threads, CPU count."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


# -- tables -------------------------------------------------------------------------------------
_MISSING = "—"
_Row = tuple[str, str, str, str]


def _cell(v: Any, spec: str = ".3f") -> str:
    """One table cell as text; ``"—"`` for a missing value (None, NaN, a bool or a non-number).

    ``spec`` is a format spec, or ``"int"`` (rounded down, thousands separators), ``"mib"`` (bytes
    shown in MiB, 2 decimals) or ``"x"`` (a ratio, 2 decimals and an ``x``).
    """
    if not isinstance(v, (int, float)) or isinstance(v, bool) or (isinstance(v, float) and math.isnan(v)):
        return _MISSING
    if spec == "int":
        return f"{int(v):,}"
    if spec == "mib":
        return f"{v / 2**20:.2f}"
    if spec == "x":
        return f"{v:.2f}x"
    return format(v, spec)


def _num(v: Any) -> bool:
    """Whether ``v`` is a finite number a table can show (not None, NaN or a bool)."""
    return _cell(v) != _MISSING


def _ratio(d: Any, p: Any) -> str:
    """dense / pruned as ``"2.00x"``; ``"—"`` when either is missing or the pruned value is 0."""
    if _cell(d) == _MISSING or _cell(p) == _MISSING or not p:
        return _MISSING
    return _cell(d / p, "x")


def _latency_ratio(d: dict[str, Any], p: dict[str, Any], prefix: str) -> str:
    """dense/pruned median ratio, flagged when the quartile ranges overlap (difference within noise)."""
    text = _ratio(d.get(f"{prefix}_ms"), p.get(f"{prefix}_ms"))
    q = [m.get(f"{prefix}_{k}_ms") for m in (d, p) for k in ("q1", "q3")]
    if text != _MISSING and all(_cell(v) != _MISSING for v in q) and q[0] <= q[3] and q[2] <= q[1]:
        text += " (IQRs overlap)"
    return text


def _batch_label(results: dict[str, Any]) -> str:
    """Which input the MAC counts are for: they count one forward of the example inputs (``macs_per:
    "example"``: counted at batch 1, as ``secateur report`` does)."""
    if results.get("macs_per") == "example":
        return "per example"
    b = (results.get("latency") or {}).get("batch_size") or results.get("batch_size")
    return f"batch of {b}" if b else "one forward of the example inputs"


def _compare_row(label: str, d: dict[str, Any], p: dict[str, Any], key: str, spec: str) -> _Row:
    """``(label, dense cell, pruned cell, dense/pruned)`` for one quantity ``key``."""
    return (label, _cell(d.get(key), spec), _cell(p.get(key), spec), _ratio(d.get(key), p.get(key)))


def _latency_row(label: str, d: dict[str, Any], p: dict[str, Any], prefix: str) -> _Row:
    """``(label, "median ± IQR" dense, pruned, ratio of medians)`` for ``<prefix>_ms`` latencies."""

    def cell(m: dict[str, Any]) -> str:
        return f"{_cell(m.get(f'{prefix}_ms'))} ± {_cell(m.get(f'{prefix}_iqr_ms'))}"

    return (label, cell(d), cell(p), _latency_ratio(d, p, prefix))


def _metric(results: dict[str, Any]) -> tuple[str, float | None, float | None, bool]:
    """``(name, dense value, pruned value, higher is better)`` of the task metric (default: accuracy)."""
    name = str(results.get("metric_name") or "accuracy")
    d, p = results.get("dense") or {}, results.get("pruned") or {}

    def value(m: dict[str, Any]) -> float | None:
        v = m.get("accuracy")
        return float(v) if _num(v) else None

    higher = bool(results.get("higher_is_better", name not in ("perplexity", "loss")))
    return name, value(d), value(p), higher


def metric_change_text(name: str, dense: float, pruned: float) -> str:
    """The change of a metric from ``dense`` to ``pruned`` in its own unit: percentage points for an
    accuracy-like metric (:data:`~secateur.analysis.plots.POINT_METRICS`, fractions in [0, 1] read as
    percentages), the absolute difference for a cosine (a value in [-1, 1], not a percentage), percent of
    the dense value for any other metric (perplexity, loss)."""
    if name in POINT_METRICS:
        return f"{100 * (pruned - dense):+.2f} points"
    if name in FRACTION_METRICS:
        return f"{pruned - dense:+.4f}"
    return f"{100 * (pruned - dense) / dense:+.1f}%" if dense else f"{pruned - dense:+.4g}"


def _metric_change(results: dict[str, Any]) -> str | None:
    name, dv, pv, higher = _metric(results)
    if dv is None or pv is None:
        return None
    change = metric_change_text(name, dv, pv)
    better = (pv > dv) == higher if pv != dv else None
    verdict = "" if better is None else (" (better)" if better else " (worse)")
    text = f"{name} {dv:.4f} → {pv:.4f}, {change}{verdict}"
    chance = results.get("chance")
    if name in POINT_METRICS and _num(chance) and dv < chance + 0.1:
        text += (f"; the dense model is near chance ({chance:.2f}): untrained? train it first "
                 "(secateur finetune), or the comparison says little")
    return text


def _count_change(label: str, d: Any, p: Any) -> str | None:
    """``"<label> 1,000 → 500 (2.00x fewer)"``: the same quantity in both models and their ratio as the
    table's dense / pruned column gives it (None when either count is missing)."""
    if not (_num(d) and _num(p)):
        return None
    if d == p:
        return f"{label} {int(d):,} (unchanged)"
    ratio = _ratio(d, p)
    return f"{label} {int(d):,} → {int(p):,} ({ratio} fewer)" if p < d else f"{label} {int(d):,} → {int(p):,}"


def _size_change(d: dict[str, Any], p: dict[str, Any]) -> str | None:
    parts = [_count_change("parameters", d.get("params"), p.get("params")),
             _count_change("non-zero parameters", d.get("nonzero_params"), p.get("nonzero_params"))]
    if _num(d.get("macs")) and _num(p.get("macs")) and p["macs"] and d["macs"] != p["macs"]:
        parts.append(f"{_ratio(d['macs'], p['macs'])} fewer MACs")
    for key, what in (("file_bytes", "safetensors"), ("compressed_bytes", "compressed"),
                      ("onnx_file_bytes", "ONNX")):
        if _num(d.get(key)) and _num(p.get(key)):
            parts.append(f"{what} file {d[key] / 2**20:.2f} → {p[key] / 2**20:.2f} MiB")
            break
    return "; ".join(x for x in parts if x) or None


def _speed_change(results: dict[str, Any]) -> str | None:
    d, p = results.get("dense") or {}, results.get("pruned") or {}
    lat = results.get("latency") or {}
    setting = ", ".join(x for x in (f"batch {lat['batch_size']}" if lat.get("batch_size") else "",
                                    f"{lat['threads']} thread(s)" if lat.get("threads") else "") if x)
    parts = []
    for prefix, runtime in (("latency", "eager PyTorch"), ("onnx_latency", "ONNX Runtime")):
        text = _latency_ratio(d, p, prefix)
        if text != _MISSING:
            parts.append(f"{text} faster in {runtime}" + (f" ({setting})" if setting else ""))
    return "; ".join(parts) or None


def headline(results: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's headline, computed from ``results``: ``[(what, text), ...]`` for the metric change
    (:func:`metric_change_text`: points for accuracy, the absolute change of a cosine, percent otherwise;
    a dense accuracy within 10 points of ``results["chance"]`` is flagged), the size change (parameters
    and non-zero parameters each dense → pruned with the table's dense / pruned ratio, MACs, file size on
    disk in MiB) and the speed-up (ratio of median latencies, flagged when the quartile ranges overlap); an
    entry is left out when its inputs are missing."""
    d, p = results.get("dense") or {}, results.get("pruned") or {}
    items = [("metric", _metric_change(results)), ("size", _size_change(d, p)),
             ("speed", _speed_change(results))]
    return [(k, v) for k, v in items if v]


def summary_rows(results: dict[str, Any]) -> list[_Row]:
    """``(quantity, dense, pruned, dense/pruned)`` rows of the side-by-side table, as strings."""
    d, p = results.get("dense") or {}, results.get("pruned") or {}
    batch = _batch_label(results)
    name, _, _, _ = _metric(results)
    label = f"{name} (fraction)" if name in FRACTION_METRICS else name
    acc = _compare_row(label, d, p, "accuracy", ".4f")
    rows = [
        (acc[0], acc[1], acc[2], ""),
        _compare_row("parameters", d, p, "params", "int"),
        _compare_row("non-zero parameters", d, p, "nonzero_params", "int"),
        _compare_row(f"MACs (dense kernels, {batch})", d, p, "macs", "int"),
        _compare_row(f"sparse MACs (zeros skipped, {batch})", d, p, "sparse_macs", "int"),
    ]

    def present(key: str) -> bool:
        return d.get(key) is not None or p.get(key) is not None

    if present("latency_ms"):
        rows.append(_latency_row("latency, median ± IQR (ms)", d, p, "latency"))
    if present("onnx_latency_ms"):
        rows.append(_latency_row("ONNX Runtime latency, median ± IQR (ms)", d, p, "onnx_latency"))
    if present("peak_activation_bytes"):
        rows.append(_compare_row("peak activation memory (MiB)", d, p, "peak_activation_bytes", "mib"))
    if present("file_bytes"):
        rows.append(_compare_row("size on disk, safetensors (MiB)", d, p, "file_bytes", "mib"))
    if present("compressed_bytes"):
        rows.append(_compare_row("size on disk, bitmask-compressed (MiB)", d, p, "compressed_bytes", "mib"))
    if present("onnx_file_bytes"):
        rows.append(_compare_row("size on disk, ONNX (MiB)", d, p, "onnx_file_bytes", "mib"))
    return rows


_LAYER_HEAD = (
    "layer",
    "type",
    "dense params",
    "pruned params",
    "non-zero",
    "kept (dense)",
    "kept (pruned)",
    "MACs dense",
    "MACs pruned",
    "sparse MACs pruned",
)


_LAYER_CELLS = (
    ("dense_params", "int"), ("pruned_params", "int"), ("pruned_nonzero", "int"), ("dense_kept", ".3f"),
    ("pruned_kept", ".3f"), ("dense_macs", "int"), ("pruned_macs", "int"), ("pruned_sparse_macs", "int"),
)


def _layer_cells(r: dict[str, Any]) -> list[str]:
    return [str(r["name"]), str(r["type"])] + [_cell(r.get(k), spec) for k, spec in _LAYER_CELLS]


_SWEEP_HEAD = ("method", "compression", "accuracy", "MACs", "sparse MACs", "latency (ms)")


_SWEEP_CELLS = (("compression", "x"), ("accuracy", ".4f"), ("macs", "int"), ("sparse_macs", "int"),
                ("latency_ms", ".3f"))


def _sweep_cells(pt: dict[str, Any]) -> list[str]:
    return [str(pt.get("method", "sweep"))] + [_cell(pt.get(k), spec) for k, spec in _SWEEP_CELLS]


# -- rendering ----------------------------------------------------------------------------------
_PLOTS = (
    ("accuracy_vs_compression", "Accuracy vs compression"),
    ("layer_kept", "Per-layer kept ratio, dense vs pruned"),
    ("latency_vs_macs", "Measured latency vs MACs"),
)

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 16px}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plots figure{margin:0;flex:0 1 520px}
.plots img{width:100%;max-width:760px;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
code,pre{background:#f6f6f6;padding:2px 4px;border-radius:3px}pre{padding:8px;overflow-x:auto}
.muted{color:#666;font-size:.85em}
ul.headline{list-style:none;padding:10px 14px;background:#f4f8f4;border-left:4px solid #3a7;font-size:1.05em}
"""


def _html_table(head: Iterable[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    out = [f"<table><thead><tr>{header}</tr></thead><tbody>"]
    for row in rows:
        cells = [
            f'<td class="n">{html.escape(c)}</td>' if i >= numeric_from else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(row)
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _notes(results: dict[str, Any]) -> list[str]:
    notes = [
        "MACs are multiply-accumulates for one forward of the example inputs (FLOPs ≈ 2 × MACs), "
        "counted by torch.utils.flop_counter including functional ops and attention. Sparse MACs scale "
        "each layer by its weight density: what a kernel that skips zeros could save, not what dense "
        "kernels run.",
    ]
    lat = results.get("latency")
    if lat:
        notes.append(
            f"Latency: torch.utils.benchmark, {lat.get('threads')} thread(s), "
            f"batch {lat.get('batch_size')}, {lat.get('blocks')} timed blocks per model on "
            f"{lat.get('device')}, dense and pruned interleaved in one run; median and interquartile "
            "range per forward call."
        )
    if any((results.get(k) or {}).get("onnx_latency_ms") is not None for k in ("dense", "pruned")):
        notes.append(
            "ONNX Runtime latency: the exported models (masks baked in) on the CPU execution "
            "provider with the same thread count, timed the same way. Dense kernels do not skip "
            "zeros, so only compaction can make the pruned model faster there."
        )
    if any((results.get(k) or {}).get("file_bytes") is not None for k in ("dense", "pruned")):
        notes.append(
            "Size on disk: the model's weights written as one safetensors file (masks applied, not stored). "
            "safetensors is dense: zeros cost as much as other values, so element-sparse models need a "
            "compressed format (secateur.io.compressed) to shrink on disk; compacted models are smaller."
        )
    if any((results.get(k) or {}).get("peak_activation_bytes") is not None for k in ("dense", "pruned")):
        notes.append(
            "Peak activation memory: most bytes held at once by tensors allocated during one "
            "forward (torch.profiler allocation records on CPU; max_memory_allocated on CUDA)."
        )
    return notes


def _plot_order(
    keys: Iterable[str], captions: dict[str, str] | None, results: dict[str, Any]
) -> list[tuple[str, str]]:
    """``(key, caption)`` of the plots present: the standard ones in their order (the metric plot named
    after the task's metric), then the extra ones."""
    keys = list(keys)
    name = _metric(results)[0]
    own = {"accuracy_vs_compression": f"{name[:1].upper()}{name[1:]} vs compression"}
    std = [(k, own.get(k, c)) for k, c in _PLOTS if k in keys]
    extra = [(k, (captions or {}).get(k, k)) for k in keys if k not in dict(_PLOTS)]
    return std + extra


def _recipe_text(results: dict[str, Any]) -> str | None:
    """The recipe used, as text: a string as given, a mapping as YAML (keys in their order)."""
    recipe = results.get("recipe")
    if recipe is None:
        return None
    if isinstance(recipe, str):
        return recipe
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False, default_flow_style=False).rstrip()


_DEPLOY_HEAD = ("model", "runtime", "batch", "median ± IQR (ms)", "vs eager", "size on disk (MiB)",
                "vs PyTorch")


def _deploy_cells(r: dict[str, Any]) -> list[str]:
    check = r.get("check") or {}
    if not check:
        verdict = _MISSING
    elif check.get("mean_cosine") is not None and str(r.get("runtime", "")).endswith("int8"):
        verdict = f"cosine {_cell(check['mean_cosine'], '.4f')}"
    else:
        verdict = f"rel. err {_cell(check.get('max_rel_error'), '.1e')}"
    if check and not check.get("within_tolerance"):
        verdict += " (outside tolerance)"
    return [str(r.get("model", "")), str(r.get("runtime", "")), _cell(r.get("batch_size"), "int"),
            f"{_cell(r.get('median_ms'))} ± {_cell(r.get('iqr_ms'))}", _cell(r.get("speedup"), "x"),
            _cell(r.get("size_bytes"), "mib"), verdict]


def _deploy_note(rows: Sequence[dict[str, Any]]) -> str:
    threads = sorted({r.get("threads") for r in rows if r.get("threads") is not None})
    blocks = sorted({r.get("n") for r in rows if r.get("n") is not None})
    return (f"Every runtime of every model timed interleaved at each batch size ({blocks} timed blocks, "
            f"{threads} thread(s)); vs eager: the same model's eager median / this median. Sizes are the "
            "files on disk: safetensors weights (eager), the frozen TorchScript file, the ONNX files. "
            "vs PyTorch: float32 runtimes' max error relative to the largest PyTorch output, int8's mean "
            "per-example cosine similarity.")


def render_html(
    results: dict[str, Any], plots: dict[str, bytes], captions: dict[str, str] | None = None
) -> str:
    """The self-contained HTML report (inline CSS, plots as base64 PNG data URIs) as a string.

    ``plots`` maps plot keys to PNG bytes; keys other than the standard ones are drawn after them,
    captioned by ``captions[key]`` (the key itself when absent).
    """
    title = str(results.get("title") or "secateur pruning report")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    lines = headline(results)
    if lines:
        items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in lines)
        parts.append(f'<ul class="headline" id="headline">{items}</ul>')
    if results.get("description"):
        parts.append(f"<p>{html.escape(str(results['description']))}</p>")
    parts.append("<h2>Dense vs pruned</h2>")
    parts.append(_html_table(("quantity", "dense", "pruned", "dense / pruned"), summary_rows(results)))
    parts += [f'<p class="muted">{html.escape(n)}</p>' for n in _notes(results)]
    recipe = _recipe_text(results)
    if recipe:
        name = f" ({results['recipe_name']})" if results.get("recipe_name") else ""
        parts.append(f'<h2>Recipe{html.escape(name)}</h2><pre id="recipe">{html.escape(recipe)}</pre>')
    if results.get("deployment"):
        parts.append("<h2>Deployment: runtimes side by side</h2>")
        parts.append(_html_table(_DEPLOY_HEAD, [_deploy_cells(r) for r in results["deployment"]],
                                 numeric_from=2))
        parts.append(f'<p class="muted">{html.escape(_deploy_note(results["deployment"]))}</p>')
    if plots:
        parts.append('<h2>Plots</h2><div class="plots">')
        for key, caption in _plot_order(plots, captions, results):
            b64 = base64.b64encode(plots[key]).decode("ascii")
            parts.append(
                f'<figure id="plot-{html.escape(key)}"><img alt="{html.escape(caption)}" '
                f'src="data:image/png;base64,{b64}"><figcaption>{html.escape(caption)}</figcaption></figure>'
            )
        parts.append("</div>")
    if results.get("sweep"):
        parts.append("<h2>Sweep</h2>")
        parts.append(_html_table(_SWEEP_HEAD, [_sweep_cells(pt) for pt in results["sweep"]]))
    if results.get("layers"):
        parts.append("<h2>Per-layer table</h2>")
        parts.append(_html_table(_LAYER_HEAD, [_layer_cells(r) for r in results["layers"]], numeric_from=2))
    if results.get("command"):
        parts.append(f"<h2>Reproduce</h2><pre>{html.escape(str(results['command']))}</pre>")
    if results.get("environment"):
        env = ", ".join(f"{k} {v}" for k, v in results["environment"].items())
        parts.append(f'<p class="muted">Environment: {html.escape(env)}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_table(head: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> list[str]:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    align = ["---" if i < numeric_from else "---:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(
    results: dict[str, Any], plot_files: dict[str, str], captions: dict[str, str] | None = None
) -> str:
    """The Markdown report as a string; ``plot_files`` maps plot keys to PNG paths relative to it
    (extra keys captioned as in :func:`render_html`)."""
    title = str(results.get("title") or "secateur pruning report")
    lines = [f"# {title}", ""]
    head = headline(results)
    if head:
        lines += [f"- **{k}**: {v}" for k, v in head] + [""]
    if results.get("description"):
        lines += [str(results["description"]), ""]
    lines += ["## Dense vs pruned", ""]
    lines += _md_table(("quantity", "dense", "pruned", "dense / pruned"), summary_rows(results))
    lines.append("")
    for n in _notes(results):
        lines += [n, ""]
    recipe = _recipe_text(results)
    if recipe:
        name = f" ({results['recipe_name']})" if results.get("recipe_name") else ""
        lines += [f"## Recipe{name}", "", "```yaml", recipe, "```", ""]
    if results.get("deployment"):
        lines += ["## Deployment: runtimes side by side", ""]
        lines += _md_table(_DEPLOY_HEAD, [_deploy_cells(r) for r in results["deployment"]], numeric_from=2)
        lines += ["", _deploy_note(results["deployment"]), ""]
    if plot_files:
        lines += ["## Plots", ""]
        for key, caption in _plot_order(plot_files, captions, results):
            lines += [f"![{caption}]({plot_files[key]})", ""]
    if results.get("sweep"):
        lines += ["## Sweep", ""]
        lines += _md_table(_SWEEP_HEAD, [_sweep_cells(pt) for pt in results["sweep"]]) + [""]
    if results.get("layers"):
        lines += ["## Per-layer table", ""]
        lines += _md_table(_LAYER_HEAD, [_layer_cells(r) for r in results["layers"]], numeric_from=2) + [""]
    if results.get("command"):
        lines += ["## Reproduce", "", "```", str(results["command"]), "```", ""]
    if results.get("environment"):
        lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in results["environment"].items()), ""]
    return "\n".join(lines)


def build_report(
    results: dict[str, Any],
    out_dir: str | os.PathLike[str],
    formats: Sequence[str] = _FORMATS,
    *,
    name: str = "report",
    extra_plots: dict[str, tuple[str, bytes]] | None = None,
    progress: bool | None = None,
) -> dict[str, Path]:
    """Write the report of ``results`` to ``out_dir``: ``<name>.html`` (self-contained),
    ``<name>.md`` (with ``<name>_<plot>.png`` files beside it) and ``<name>.json`` (the input).

    ``results`` keys (all optional except that ``dense`` and ``pruned`` should be present):

    - ``dense``, ``pruned``: ``{"accuracy" (the task metric's value; a fraction for accuracy), "params",
      "nonzero_params", "macs", "sparse_macs", "latency_ms", "latency_iqr_ms", "latency_q1_ms",
      "latency_q3_ms" (median, IQR and quartiles, ms), "onnx_latency_ms" (and "onnx_latency_iqr_ms",
      "_q1_ms", "_q3_ms"), "peak_activation_bytes", "file_bytes", "compressed_bytes", "onnx_file_bytes"
      (sizes on disk)}``.
    - ``metric_name`` (default ``"accuracy"``; e.g. ``"perplexity"``, ``"embedding cosine"``) and
      ``higher_is_better`` (default: True except for perplexity and loss).
    - ``layers``: rows from :func:`layer_comparison` (``name``, ``dense_params``, ``dense_kept``,
      ``pruned_kept`` fractions, MACs ...).
    - ``sweep``: points ``{"method", "compression" (x-fold: dense params / non-zero), "accuracy",
      "macs", "latency_ms", "latency_iqr_ms"}``.
    - ``trajectory``: the pruning trajectory, points ``{"compression"`` or ``"nonzero_params",
      "accuracy", "label"}`` in the order recorded (or ``history`` rows with ``"eval_accuracy"``:
      :func:`secateur.analysis.plots.trajectory_points`).
    - ``deployment``: rows of :func:`secateur.analysis.deploy.measure_deployment`.
    - ``recipe`` (YAML text or a mapping) and ``recipe_name``.
    - ``title``, ``description``, ``command`` (to reproduce), ``environment``, ``latency`` (settings).

    The report opens with a headline computed from these values (:func:`headline`): the metric change,
    the size change and the speed-up.

    ``extra_plots`` maps further plot keys to ``(caption, PNG bytes)`` drawn after the standard
    plots (e.g. the demo's training curves); they are embedded in the HTML and written as PNGs
    beside the Markdown like the others.

    Returns:
        ``{"html": path, "md": path, "json": path, "<plot key>": png path, ...}`` for what was written.

    Raises:
        ConfigError: an unknown format (allowed: "html", "md"), ``results`` not a dict, or an
            extra plot that is not ``(caption, PNG bytes)`` or reuses a standard key (named).
    """
    if not isinstance(results, dict):
        raise ConfigError(f"results must be a dict, got {type(results).__name__}")
    for key, value in (extra_plots or {}).items():
        ok = isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bytes)
        if not ok or not value[1].startswith(b"\x89PNG") or key in dict(_PLOTS):
            raise ConfigError(
                f"extra plot {key!r} must be (caption, PNG bytes) under a new key "
                f"(standard keys: {[k for k, _ in _PLOTS]})"
            )
    bad = [f for f in formats if f not in _FORMATS]
    if bad:
        raise ConfigError(f"unknown report format(s) {bad}; allowed: {list(_FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, bytes] = {}
    drawers = {
        "accuracy_vs_compression": lambda: plot_accuracy_vs_compression(results),
        "layer_kept": lambda: plot_layer_kept(results.get("layers") or []),
        "latency_vs_macs": lambda: plot_latency_vs_macs(results),
    }
    with Steps("report plots", len(drawers), progress) as bar:
        for key, draw in drawers.items():
            with bar.step(key):
                png = draw()
            if png is not None:
                plots[key] = png
    captions = {}
    for key, (caption, png) in (extra_plots or {}).items():
        plots[key], captions[key] = png, str(caption)
    written: dict[str, Path] = {}
    if "md" in formats:
        plot_files = {}
        for key, png in plots.items():
            p = out / f"{name}_{key}.png"
            p.write_bytes(png)
            written[key] = p
            plot_files[key] = p.name
        written["md"] = out / f"{name}.md"
        written["md"].write_text(render_markdown(results, plot_files, captions), encoding="utf-8")
    if "html" in formats:
        written["html"] = out / f"{name}.html"
        written["html"].write_text(render_html(results, plots, captions), encoding="utf-8")
    written["json"] = out / f"{name}.json"
    written["json"].write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    return written
