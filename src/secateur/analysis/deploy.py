"""One model (or several) measured side by side in the runtimes it can be deployed in, with file sizes.

:func:`measure_deployment` turns each model into these artefacts and runners:

- ``"eager"``: the PyTorch module (eval mode, ``torch.no_grad()``); artefact: its weights as safetensors
  (masks baked in, so the file is what a dense loader reads).
- ``"torchscript"``: ``torch.jit.trace`` then ``torch.jit.freeze`` (weights folded in as constants);
  artefact: the saved ``.pt`` file. If tracing fails, ``"torch.compile"`` (Inductor, compiled per batch
  size, no artefact) is used instead when ``compiled="auto"``; the row's ``runtime`` says which ran.
- ``"onnxruntime-fp32"``: :func:`secateur.analysis.onnx.export_onnx` (``torch.export``-based exporter,
  dynamic batch dimension), ONNX Runtime CPU provider.
- ``"onnxruntime-int8"``: :func:`secateur.analysis.quantize.quantize_onnx` of that file (static QDQ for
  models with convolutions when calibration data is given, dynamic otherwise).

At each batch size all runners of all models are timed interleaved in one run
(:func:`secateur.analysis.latency.compare_callables`: one block of each in turn, the order reversed every
other round), so a change in machine load hits every runtime alike and the ratios are side by side. Every
ONNX runner's outputs are also compared with PyTorch's on the same batch
(:func:`secateur.analysis.quantize.compare_onnx_outputs`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.analysis.backends import prepare_runner
from secateur.analysis.latency import compare_callables
from secateur.analysis.onnx import (
    baked_copy,
    export_onnx,
    flatten_outputs,
    inputs_at_batch,
    onnx_opset,
    ort_session,
    session_feed,
)
from secateur.analysis.progress import Steps
from secateur.analysis.quantize import (
    FP32_ATOL,
    FP32_RTOL,
    compare_onnx_outputs,
    quantize_onnx,
    tolerance_text,
)
from secateur.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["COMPILED", "QUANTIZE", "RUNTIMES", "format_deployment", "measure_deployment", "weights_file"]

#: Runtimes of a deployment row, in the order they are reported.
RUNTIMES = ("eager", "torchscript", "torch.compile", "onnxruntime-fp32", "onnxruntime-int8")
#: ``compiled=`` choices: TorchScript, torch.compile, TorchScript falling back to torch.compile, or none.
COMPILED = ("auto", "torchscript", "compile", None)
#: ``quantize=`` choices: chosen by the model, ONNX Runtime dynamic or static int8, or no int8 model.
QUANTIZE = ("auto", "dynamic", "static", None)

_Runner = Callable[[], Any]


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def _check(models: Mapping[str, Any], batch_sizes: Sequence[int], compiled: Any, quantize: Any) -> None:
    if not models:
        raise ConfigError("measure_deployment needs at least one model")
    for name, m in models.items():
        if not isinstance(m, nn.Module):
            raise TypeError(
                f"measure_deployment: model {name!r} must be an nn.Module, got {type(m).__name__}"
            )
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError(f"measure_deployment: batch_sizes must be ints >= 1, got {list(batch_sizes)!r}")
    if compiled not in COMPILED:
        raise ConfigError(f"measure_deployment: compiled must be one of {COMPILED}, got {compiled!r}")
    if quantize not in QUANTIZE:
        raise ConfigError(f"measure_deployment: quantize must be one of {QUANTIZE}, got {quantize!r}")


def weights_file(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s weights (masks baked in, tied tensors once) as a safetensors file; return its path.

    This is the dense file a plain loader reads: zeros cost as much as any other value.
    """
    from safetensors.torch import save_model

    from secateur.masks.element import masked_parameters

    plain = baked_copy(model) if any(True for _ in masked_parameters(model)) else model
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(plain, str(path))
    return path


def _trace(model: nn.Module, example_inputs: Any) -> torch.jit.ScriptModule:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if isinstance(example_inputs, Mapping):
            traced = torch.jit.trace(model, example_kwarg_inputs=dict(example_inputs), strict=False)
        else:
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            traced = torch.jit.trace(model, args, strict=False)
        return torch.jit.freeze(traced.eval())


def _call(fn: Callable[..., Any], inputs: Any) -> Any:
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            return fn(**inputs)
        if isinstance(inputs, tuple):
            return fn(*inputs)
        return fn(inputs)


class _Artefacts:
    """The files and compiled forms of one model, built once, runners made per batch size."""

    def __init__(self, name: str, model: nn.Module, out_dir: Path) -> None:
        self.name, self.model, self.out_dir = name, model, out_dir
        self.files: dict[str, Path] = {}
        self.traced: torch.jit.ScriptModule | None = None
        self.compiled_kind: str | None = None
        self.int8_mode: str | None = None
        self.notes: list[str] = []

    def build(self, example: Any, steps: Steps, compiled: str | None, quantize: str | None,
              calibration: Iterable[Any] | None) -> None:
        with steps.step(f"{self.name}: weights"):
            self.files["eager"] = weights_file(self.model, self.out_dir / f"{self.name}.safetensors")
        if compiled is not None:
            with steps.step(f"{self.name}: {compiled}"):
                self._compile(example, compiled)
        with steps.step(f"{self.name}: ONNX export"):
            self.files["onnxruntime-fp32"] = export_onnx(
                self.model, example, self.out_dir / f"{self.name}.onnx", dynamic_batch=True, progress=False
            )
        if quantize is not None:
            mode = quantize
            if mode == "auto":
                mode = "static" if calibration is not None and _has_conv(self.model) else "dynamic"
            with steps.step(f"{self.name}: int8 ({mode})"):
                self.files["onnxruntime-int8"] = quantize_onnx(
                    self.files["onnxruntime-fp32"], self.out_dir / f"{self.name}.int8.onnx", mode=mode,
                    calibration=calibration, progress=False,
                )
            self.int8_mode = mode

    def _compile(self, example: Any, compiled: str) -> None:
        if compiled in ("auto", "torchscript"):
            try:
                self.traced = _trace(self.model, example)
                path = self.out_dir / f"{self.name}.torchscript.pt"
                with warnings.catch_warnings():  # torch.jit.save warns that TorchScript is deprecated
                    warnings.simplefilter("ignore", DeprecationWarning)
                    torch.jit.save(self.traced, str(path))
                self.files["torchscript"] = path
                self.compiled_kind = "torchscript"
                return
            except Exception as exc:  # noqa: BLE001 - tracing fails on data-dependent control flow
                if compiled == "torchscript":
                    raise
                self.notes.append(
                    f"TorchScript tracing failed ({type(exc).__name__}: {exc}); torch.compile used"
                )
                log.warning("%s: %s", self.name, self.notes[-1])
        self.compiled_kind = "torch.compile"

    def runners(self, inputs: Any, threads: int) -> dict[str, _Runner]:
        out: dict[str, _Runner] = {"eager": prepare_runner(self.model, inputs, "eager")}
        if self.compiled_kind == "torchscript" and self.traced is not None:
            traced = self.traced
            out["torchscript"] = lambda: _call(traced, inputs)
        elif self.compiled_kind == "torch.compile":
            fn = torch.compile(self.model, dynamic=False)
            _call(fn, inputs)  # compile outside the timing
            out["torch.compile"] = lambda: _call(fn, inputs)
        for key in ("onnxruntime-fp32", "onnxruntime-int8"):
            if key in self.files:
                sess = ort_session(self.files[key], threads)
                feed = session_feed(sess, inputs, source=self.files[key].name)
                sess.run(None, feed)  # the first run allocates and plans
                out[key] = (lambda s, f: lambda: s.run(None, f))(sess, feed)
        return out


def measure_deployment(
    model: nn.Module | Mapping[str, nn.Module],
    example_inputs: Any,
    *,
    batch_sizes: Sequence[int] = (1, 32),
    out_dir: str | os.PathLike[str] | None = None,
    compiled: str | None = "auto",
    quantize: str | None = "auto",
    calibration: Iterable[Any] | None = None,
    threads: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    block_ms: float = 10.0,
    check_outputs: bool = True,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Latency (ms per forward of the whole batch, median and IQR over ``repeats`` timed blocks) and size on
    disk of ``model`` in eager PyTorch, TorchScript (or torch.compile), ONNX Runtime float32 and int8.

    Args:
        model: one model, or ``{name: model}`` to measure several side by side (e.g. dense and pruned).
        example_inputs: a tensor, tuple or dict whose tensors' leading dimension is the batch; the batch
            of each size is built from its rows (:func:`secateur.analysis.onnx.inputs_at_batch`).
        batch_sizes: batch sizes to time (each a separate interleaved run).
        out_dir: where the artefacts are written (``<name>.safetensors``, ``<name>.torchscript.pt``,
            ``<name>.onnx``, ``<name>.int8.onnx``); default: a temporary folder removed afterwards (sizes
            are still reported, ``artefact`` is then None).
        compiled: ``"auto"`` (TorchScript, torch.compile if tracing fails), ``"torchscript"``, ``"compile"``
            or None (skip).
        quantize: ``"auto"`` (static QDQ int8 for models with convolutions when ``calibration`` is given,
            dynamic int8 otherwise), ``"dynamic"``, ``"static"`` (needs ``calibration``) or None (skip).
        calibration: calibration batches for static quantisation (see
            :func:`secateur.analysis.quantize.quantize_onnx`).
        threads: intra-op threads of PyTorch and ONNX Runtime during timing (default 1).
        repeats, warmup, block_ms: as :func:`secateur.analysis.latency.compare_callables`.
        check_outputs: compare each ONNX model's outputs with PyTorch's at every batch size.
        progress: a progress bar on stderr (``None``: only when stderr is a terminal).

    Returns:
        One row per model, runtime and batch size: ``{"model", "runtime"`` (:data:`RUNTIMES`)``,
        "batch_size", "median_ms", "iqr_ms", "q1_ms", "q3_ms", "n", "threads", "artefact"`` (path or None)
        ``, "size_bytes"`` (file size on disk; None for torch.compile)``, "speedup"`` (the same model's eager
        median / this median)``, "opset"`` (ONNX rows)``, "quantization"`` (int8 row: ``"dynamic"`` or
        ``"static"``)``, "check"`` (ONNX rows with ``check_outputs``: ``within_tolerance``,
        ``max_rel_error``, ``mean_cosine``, ``top1_agreement``, ``tolerance``)``}``.

    Raises:
        TypeError: a model that is not an ``nn.Module``. ConfigError: empty models, bad batch sizes, an
            unknown ``compiled``/``quantize``, static quantisation without calibration, inputs the exported
            graph does not take. ImportError: onnx, onnxscript or onnxruntime missing (``secateur[onnx]``).
    """
    models = dict(model) if isinstance(model, Mapping) else {"model": model}
    _check(models, batch_sizes, compiled, quantize)
    if quantize == "static" and calibration is None:
        raise ConfigError("measure_deployment: quantize='static' needs calibration batches (calibration=...)")
    calibration = list(calibration) if calibration is not None else None  # read once per model
    modes = {m: m.training for mdl in models.values() for m in mdl.modules()}
    n_steps = len(models) * (2 + (compiled is not None) + (quantize is not None)) + len(batch_sizes)
    with contextlib.ExitStack() as stack:
        if out_dir is None:
            out_dir_used = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        else:
            out_dir_used = Path(out_dir)
        steps = stack.enter_context(Steps("deployment", n_steps, progress))
        try:
            arts = {name: _Artefacts(name, m.eval(), out_dir_used) for name, m in models.items()}
            for a in arts.values():
                a.build(example_inputs, steps, compiled, quantize, calibration)
            rows: list[dict[str, Any]] = []
            for b in batch_sizes:
                with steps.step(f"timing batch {b}"):
                    rows += _time_batch(arts, inputs_at_batch(example_inputs, b), b, threads, repeats, warmup,
                                        block_ms, check_outputs, keep_paths=out_dir is not None)
        finally:
            for m, t in modes.items():
                m.training = t
    return rows


def _time_batch(
    arts: Mapping[str, _Artefacts], inputs: Any, batch: int, threads: int, repeats: int, warmup: int,
    block_ms: float, check_outputs: bool, keep_paths: bool,
) -> list[dict[str, Any]]:
    runners = {(name, rt): fn for name, a in arts.items() for rt, fn in a.runners(inputs, threads).items()}
    keys = list(runners)
    timed = compare_callables({f"{n}/{rt}": runners[(n, rt)] for n, rt in keys}, threads=threads,
                              repeats=repeats, warmup=warmup, block_ms=block_ms)
    rows = []
    for name, rt in keys:
        a, t = arts[name], timed[f"{name}/{rt}"]
        eager = timed[f"{name}/eager"]["median_ms"]
        path = a.files.get(rt)
        row: dict[str, Any] = {
            "model": name, "runtime": rt, "batch_size": batch,
            **{k: t[k] for k in ("median_ms", "iqr_ms", "q1_ms", "q3_ms", "n", "threads")},
            "artefact": str(path) if path is not None and keep_paths else None,
            "size_bytes": path.stat().st_size if path is not None else None,
            "speedup": eager / t["median_ms"],
        }
        if rt.startswith("onnxruntime"):
            row["opset"] = onnx_opset(path)
            if rt == "onnxruntime-int8":
                row["quantization"] = a.int8_mode
            if check_outputs:
                c = compare_onnx_outputs(a.model, path, inputs, threads=threads,
                                         precision="int8" if rt.endswith("int8") else "fp32")
                row["check"] = {k: c[k] for k in ("within_tolerance", "max_rel_error", "mean_cosine",
                                                  "top1_agreement", "tolerance")}
        if rt == "torchscript" and check_outputs and a.traced is not None:
            row["check"] = _compiled_check(a.model, a.traced, inputs)
        if a.notes and rt == "torch.compile":
            row["note"] = "; ".join(a.notes)
        rows.append(row)
    return rows


def _compiled_check(model: nn.Module, compiled: Callable[..., Any], inputs: Any) -> dict[str, Any]:
    """The traced model's outputs against the eager model's, float64, with the float32 ONNX tolerance."""
    ref = [t.double() for t in flatten_outputs(_call(model, inputs))]
    got = [t.double() for t in flatten_outputs(_call(compiled, inputs))]
    res: dict[str, Any] = {"within_tolerance": False, "max_rel_error": None, "mean_cosine": None,
                           "top1_agreement": None, "tolerance": tolerance_text("fp32")}
    if len(ref) != len(got) or any(r.shape != g.shape for r, g in zip(ref, got)):
        return res
    ok, rel = True, 0.0
    for r, g in zip(ref, got):
        scale = float(r.abs().max()) if r.numel() else 0.0
        err = float((r - g).abs().max()) if r.numel() else 0.0
        ok = ok and err <= FP32_RTOL * scale + FP32_ATOL
        rel = max(rel, err / scale if scale else err)
    res.update(within_tolerance=ok, max_rel_error=rel)
    return res


def format_deployment(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of :func:`measure_deployment` rows (one line per model, runtime and batch size)."""
    head = ["model", "runtime", "batch", "median ms (IQR)", "vs eager", "size on disk (MiB)", "vs PyTorch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 4 + ["---"]) + "|"]
    for r in rows:
        size = "—" if r.get("size_bytes") is None else f"{r['size_bytes'] / 2**20:.2f}"
        check = "—"
        if r.get("check"):
            c = r["check"]
            ok = "ok" if c["within_tolerance"] else "OUTSIDE"
            check = (f"{ok}: cosine {c['mean_cosine']:.4f}" if r["runtime"].endswith("int8")
                     else f"{ok}: rel err {c['max_rel_error']:.1e}")
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['batch_size']} | {r['median_ms']:.3f} ({r['iqr_ms']:.3f}) "
            f"| {r['speedup']:.2f}x | {size} | {check} |"
        )
    return "\n".join(lines)
