"""``secateur report``: a dense and a pruned model measured side by side, for any model and data.

Stages (one line each on stderr, with the seconds taken): load both models; evaluate the task's metric
(:mod:`secateur.app.metrics`) on the held-out data; count and time them
(:func:`secateur.analysis.report.collect_results`: latency at ``--batch`` examples, both models
interleaved); optionally export and time both in ONNX Runtime; write report.html / .md / .json
(:func:`secateur.analysis.report.build_report`). Parameters and MACs in the report are per example (counted
at batch 1); latency is per batch of ``--batch``. Ends with a one-screen summary.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from secateur.errors import ConfigError

__all__ = ["run_report", "summary"]


class _Stages:
    """``[k/n] name ... (s)`` lines through ``echo`` (nothing when ``echo`` is None)."""

    def __init__(self, n: int, echo: Callable[[str], None] | None) -> None:
        self.n, self.k, self.echo = n, 0, echo
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        if self.echo is not None and self.k:
            self.echo(f"      done in {now - self.t:.1f} s")
        self.k += 1
        self.t = now
        if self.echo is not None and name:
            self.echo(f"[{self.k}/{self.n}] {name} ...")


def _argv(
    dense: str, pruned: str, data: str, batch: int, out_dir: str, subset: int | None, onnx: bool, extra: dict
) -> str:
    argv = ["secateur", "report", "--dense", dense, "--pruned", pruned, "--data", data]
    argv += ["--batch", str(batch), "--out", str(out_dir)]
    argv += ["--subset", str(subset)] if subset is not None else []
    argv += ["--onnx"] if onnx else []
    for opt, value in extra.items():
        if isinstance(value, (list, tuple)):
            argv += [a for v in value for a in (opt, v)]
        elif value:
            argv += [opt, str(value)]
    return shlex.join(argv)


def _weights_bytes(spec: str) -> int | None:
    from secateur.app.export import disk_sizes

    return disk_sizes(spec, None).get("size_on_disk_bytes")


def run_report(
    dense_spec: str,
    pruned_spec: str,
    *,
    data: str = "auto",
    subset: int | None = None,
    input_spec: str | None = None,
    input_shape: str | None = None,
    seq_len: int | None = None,
    batch: int = 32,
    repeats: int = 30,
    onnx: bool = False,
    out_dir: str | Path = "runs/report",
    trust_factory: Sequence[str] = (),
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure ``dense_spec`` and ``pruned_spec`` side by side and write the report to ``out_dir``.

    The inputs, data and metric are those of the pruned model's session
    (:func:`secateur.app.run.open_session`: a saved folder's record, else derived), used for both models.
    ``trust_factory`` applies to ``saved:`` specs. ``batch``: examples per timed forward; ``repeats``: timed
    blocks per model. A dense model built afresh (``zoo:``, a factory, an ``hf:`` folder without weights)
    that the pruned folder records as its origin is built under the recipe's seed, as ``secateur prune``
    built it: the same initial weights, so the comparison is with the model that was pruned.

    Returns:
        ``{"results": the dict given to build_report, "paths": {kind: path}, "summary": text}``.

    Raises:
        ConfigError: ``batch`` < 1, a dense model the pruned model's inputs do not fit, and what
            :func:`~secateur.app.run.open_session` raises.
    """
    from secateur._torch import eval_mode
    from secateur.analysis import count_macs
    from secateur.analysis.report import build_report, collect_results, layer_comparison
    from secateur.app.inputs import make_inputs
    from secateur.app.models import build_model
    from secateur.app.run import chance_accuracy, check_forward, open_session, zoo_for_classes

    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")
    stage = _Stages(5 if onnx else 4, echo)
    stage("loading both models")
    trust = tuple(trust_factory)
    s = open_session(
        pruned_spec,
        data=data,
        input_spec=input_spec,
        input_shape=input_shape,
        seq_len=seq_len,
        subset=subset,
        trust_factory=trust if pruned_spec.startswith("saved:") else (),
    )
    recipe = s.metadata.get("recipe")
    recorded_seed = recipe.get("seed") if isinstance(recipe, dict) else None
    if s.metadata.get("model") == dense_spec and isinstance(recorded_seed, int):
        from secateur.train import seed_everything

        seed_everything(recorded_seed, deterministic=False)  # as prune seeded it before building the model
    dense = build_model(dense_spec, trust_factory=trust if dense_spec.startswith("saved:") else ())
    dense = zoo_for_classes(dense_spec, dense, s.data).eval()  # a zoo dense model: the data's classes
    pruned = s.model.eval()
    check_forward(dense, s.example, s.fields)
    metric: dict[str, Any] = {}
    if s.evaluator is not None:
        stage(f"evaluating {s.metric} on {s.data.evaluated_on}")
        if s.metric == "cosine":
            s.evaluator.set_reference(dense)
        metric = {"name": s.metric, "dense": s.evaluator(dense), "pruned": s.evaluator(pruned)}
    else:
        stage("")
    inputs = make_inputs(s.fields, dense, batch=batch)
    stage(
        f"counting both models and timing them: eager latency of a batch of {batch}, {repeats} timed blocks "
        f"per model, dense and pruned interleaved ({_latency_estimate(dense, pruned, inputs, repeats)})"
    )
    acc = {}
    if metric:  # analysis.report reads the task metric's values under "accuracy", its name in metric_name
        acc = {"dense_accuracy": metric["dense"], "pruned_accuracy": metric["pruned"]}
    command = _argv(
        dense_spec,
        pruned_spec,
        s.data.form,
        batch,
        str(out_dir),
        subset,
        onnx,
        {
            "--input-spec": input_spec,
            "--input-shape": input_shape,
            "--seq-len": seq_len,
            "--repeats": repeats if repeats != 30 else None,
            "--trust-factory": trust,
        },
    )
    what = f"{metric['name']} on {s.data.evaluated_on}" if metric else "No metric measured (--data none)."
    if onnx:
        stage("exporting both models to ONNX and timing them in ONNX Runtime")
    results = collect_results(
        dense,
        pruned,
        inputs,
        onnx_dir=Path(out_dir) / "onnx" if onnx else None,
        repeats=repeats,
        progress=None if echo is not None else False,
        command=command,
        description=f"Dense {dense_spec} vs pruned {pruned_spec}. {_sentence(what)} "
        "Parameters and MACs per example (batch 1); latency per batch.",
        **acc,
    )
    for key, model in (("dense", dense), ("pruned", pruned)):
        with eval_mode(model):
            results[key].update(count_macs(model, s.example))  # per example
    results["layers"] = layer_comparison(dense, pruned, s.example)
    results["macs_per"] = "example"
    results["input_spec"] = s.input_spec
    results["kind"] = s.kind.label
    if metric:
        results["metric"] = metric
        if metric["name"] == "accuracy":
            results["chance"] = chance_accuracy(s.data)
        results["metric_name"] = _REPORT_NAMES.get(metric["name"], metric["name"])
        results["higher_is_better"] = metric["name"] != "perplexity"
        results["dense"][metric["name"]] = metric["dense"]
        results["pruned"][metric["name"]] = metric["pruned"]
    for key, spec in (("dense", dense_spec), ("pruned", pruned_spec)):
        size = _weights_bytes(spec)
        if size is not None:
            results[key]["size_on_disk_bytes"] = results[key]["file_bytes"] = size
    if s.metadata.get("recipe"):
        results["recipe"] = s.metadata["recipe"]
    stage("writing report.html, report.md and report.json")
    paths = build_report(results, out_dir)
    stage("")
    return {"results": results, "paths": paths, "summary": summary(results, paths)}


def _latency_estimate(dense: Any, pruned: Any, inputs: Any, repeats: int, warmup: int = 3) -> str:
    """How long the latency stage will take, from one timed forward of each model on ``inputs`` after one
    untimed call: ``(repeats + warmup + 1) x (dense + pruned)`` seconds (blocks hold one call at least), and
    how to shorten it when that is over 30 s."""
    import torch

    def call(model: Any) -> Any:
        if isinstance(inputs, dict):
            return model(**inputs)
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)

    seconds = []
    with torch.no_grad():
        for model in (dense, pruned):
            call(model)
            t = time.perf_counter()
            call(model)
            seconds.append(time.perf_counter() - t)
    total = (repeats + warmup + 1) * sum(seconds)
    text = (f"one forward takes {1e3 * seconds[0]:.0f} ms dense, {1e3 * seconds[1]:.0f} ms pruned: at least "
            f"{total:.0f} s" if total >= 1 else "under a second")
    return text + ("; --batch 1 --repeats 3 makes it quick" if total > 30 else "")


#: The task metric's name in the HTML report.
_REPORT_NAMES = {"cosine": "embedding cosine"}


def _sentence(text: str) -> str:
    text = text[0].upper() + text[1:] if text else text
    return text if text.endswith(".") else text + "."


def summary(results: dict[str, Any], paths: dict[str, Any]) -> str:
    """One screen: the metric, parameters, MACs per example, latency, size on disk, and the files written."""
    from secateur.app.summary import count_rows, human_bytes, metric_row, rows_table, size_change

    d, p = results["dense"], results["pruned"]
    rows = metric_row(results.get("metric", {}).get("name"), d, p) + count_rows(d, p)
    lat = results.get("latency") or {}
    if d.get("latency_ms") and p.get("latency_ms"):
        rows.append(
            (
                f"latency ms (batch {lat.get('batch_size') or '?'}, eager)",
                f"{d['latency_ms']:.3f}",
                f"{p['latency_ms']:.3f}",
                f"{d['latency_ms'] / p['latency_ms']:.2f}x speed-up",
            )
        )
    if d.get("onnx_latency_ms") and p.get("onnx_latency_ms"):
        rows.append(
            (
                "latency ms (ONNX Runtime)",
                f"{d['onnx_latency_ms']:.3f}",
                f"{p['onnx_latency_ms']:.3f}",
                f"{d['onnx_latency_ms'] / p['onnx_latency_ms']:.2f}x speed-up",
            )
        )
    if d.get("size_on_disk_bytes") or p.get("size_on_disk_bytes"):
        sd, sp = d.get("size_on_disk_bytes"), p.get("size_on_disk_bytes")
        change = size_change(sd, sp) if sd and sp else ""
        like = max(sd or 0, sp or 0)
        rows.append(
            ("size on disk", human_bytes(sd, like) if sd else "-", human_bytes(sp, like) if sp else "-",
             change)
        )
    recipe = results.get("recipe") or {}
    lines = [
        f"secateur report: {results.get('description', '')}",
        f"  recipe: {recipe.get('name') or '-'}; inputs {results.get('input_spec', '?')}",
        "",
        rows_table(rows),
        "",
        "report: " + ", ".join(str(paths[k]) for k in ("html", "md", "json") if k in paths),
    ]
    return "\n".join(lines)
