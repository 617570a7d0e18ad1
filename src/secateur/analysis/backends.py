"""Latency backends: a model's forward timed in a named runtime, eager PyTorch or ONNX Runtime.

A measured latency target (:class:`secateur.allocation.targets.LatencyTarget`) times many candidate models
against the dense one. A backend turns a model into a zero-argument *runner* (one forward of the whole
batch) once, and runners are timed interleaved (:func:`secateur.analysis.latency.compare_callables`: one
block of each in turn, the order reversed every other round, median over blocks), so a change in machine
load hits the dense model and the candidate alike.

- ``"eager"``: the PyTorch module itself, eval mode, ``torch.no_grad()``.
- ``"onnxruntime"``: the module exported to ONNX *in memory* (no file is written) and run by an ONNX Runtime
  ``InferenceSession`` on the CPU provider with ``intra_op_num_threads = threads`` and one inter-op thread.
  The export traces the given inputs, so the batch is the one given (no dynamic axes). The exporter is
  the TorchScript-based one of ``torch.onnx.export`` (``dynamo=False``: 0.3-1.2 s for ResNet-20 or
  MobileNetV2 on this project's CPU, against 4-6 s for the ``torch.export``-based one), with the
  ``torch.export``-based exporter as the fallback when it fails (``exporter="auto"``). A masked model is
  exported from a copy with its masks baked in (:func:`secateur.analysis.onnx.baked_copy`).

Optional dependencies for ``"onnxruntime"``: ``pip install onnx onnxruntime`` (and ``onnxscript`` for the
``torch.export``-based exporter): the ``onnx`` extra.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from secateur.analysis.latency import compare_callables
from secateur.errors import ConfigError, did_you_mean

__all__ = [
    "EXPORTERS",
    "LATENCY_BACKENDS",
    "Runner",
    "backend_latency",
    "check_backend",
    "compare_backend",
    "onnx_bytes",
    "prepare_runner",
]

#: Runtimes a latency can be measured in.
LATENCY_BACKENDS = ("eager", "onnxruntime")
#: ONNX exporters: ``"auto"`` (TorchScript-based, then ``torch.export``-based on failure), or one of them.
EXPORTERS = ("auto", "torchscript", "dynamo")

#: A zero-argument callable running one forward pass of a prepared model.
Runner = Callable[[], Any]


def check_backend(backend: Any) -> str:
    """``backend`` if it names a latency backend (:data:`LATENCY_BACKENDS`).

    For ``"onnxruntime"`` the package must be importable.

    Raises:
        ConfigError: an unknown name (the message lists the backends, with a close match if any).
        ImportError: ``"onnxruntime"`` without the ``onnxruntime`` package (says what to install).
    """
    if not isinstance(backend, str) or backend not in LATENCY_BACKENDS:
        raise ConfigError(
            f"unknown latency backend {backend!r}{did_you_mean(backend, LATENCY_BACKENDS)}; "
            f"choose one of {LATENCY_BACKENDS}"
        )
    if backend == "onnxruntime":
        _require("onnxruntime")
    return backend


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is required for the 'onnxruntime' latency backend: pip install onnx onnxruntime "
            "onnxscript (or pip install 'secateur[onnx]')"
        ) from exc


def _positional(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def _export_torchscript(model: nn.Module, args: tuple, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter warns that it is legacy on every call
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buf, input_names=names, dynamo=False, verbose=False)
    return buf.getvalue()


def _export_dynamo(model: nn.Module, args: tuple, kwargs: dict[str, Any], names: list[str]) -> bytes:
    _require("onnxscript")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, args, kwargs=kwargs or None, input_names=names, dynamo=True, verbose=False
        )
    return program.model_proto.SerializeToString()


def onnx_bytes(model: nn.Module, example_inputs: Any, *, exporter: str = "auto") -> bytes:
    """``model`` (eval mode, masks baked into a copy) exported to an ONNX model in memory.

    Inputs are named ``input_0, input_1, ...`` (a tensor or a tuple of positional tensors) or by their
    keyword (a dict: only the ``torch.export``-based exporter takes keyword inputs). The model's mode is
    restored afterwards.

    Args:
        exporter: ``"auto"``, ``"torchscript"`` or ``"dynamo"`` (:data:`EXPORTERS`).

    Returns:
        The serialised ``ModelProto``.

    Raises:
        ConfigError: an unknown exporter. ImportError: onnx (or onnxscript, for ``"dynamo"``) missing.
        Exception: from ``torch.onnx.export`` when the model does not export.
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown ONNX exporter {exporter!r}; choose one of {EXPORTERS}")
    _require("onnx")
    from secateur.analysis.onnx import baked_copy
    from secateur.masks.element import masked_parameters

    export_model = baked_copy(model) if any(True for _ in masked_parameters(model)) else model
    args, kwargs = _positional(example_inputs)
    names = list(kwargs) if kwargs else [f"input_{i}" for i in range(len(args))]
    was_training = export_model.training
    export_model.eval()
    try:
        with torch.no_grad():
            if exporter == "dynamo" or (kwargs and exporter == "auto"):
                return _export_dynamo(export_model, args, kwargs, names)
            if exporter == "torchscript":
                if kwargs:
                    raise ConfigError("the TorchScript ONNX exporter takes positional inputs, got a dict")
                return _export_torchscript(export_model, args, names)
            try:
                return _export_torchscript(export_model, args, names)
            except Exception:  # noqa: BLE001 - the other exporter may handle what this one cannot
                return _export_dynamo(export_model, args, kwargs, names)
    finally:
        export_model.train(was_training)


def _ort_runner(model: nn.Module, example_inputs: Any, threads: int, exporter: str) -> Runner:
    ort = _require("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        onnx_bytes(model, example_inputs, exporter=exporter),
        sess_options=opts,
        providers=["CPUExecutionProvider"],
    )
    args, kwargs = _positional(example_inputs)
    values = dict(kwargs) if kwargs else {f"input_{i}": a for i, a in enumerate(args)}
    feed = {}
    for inp in sess.get_inputs():  # an input the trace did not use is absent from the graph
        if inp.name not in values:
            raise ConfigError(f"the exported model takes input {inp.name!r}, which the inputs given lack")
        v = values[inp.name]
        feed[inp.name] = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
    sess.run(None, feed)  # the first run allocates and plans
    return lambda: sess.run(None, feed)


def _call(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(*args, **kwargs)


def prepare_runner(
    model: nn.Module, example_inputs: Any, backend: str, *, threads: int = 1, exporter: str = "auto"
) -> Runner:
    """A zero-argument runner of one forward of ``model`` on ``example_inputs`` in ``backend``.

    ``"eager"`` puts ``model`` in eval mode (the caller restores it, or passes a copy) and runs it under
    ``torch.no_grad()``; ``"onnxruntime"`` exports it in memory (:func:`onnx_bytes`) and runs an ONNX Runtime
    session with ``threads`` intra-op threads on the same inputs (as NumPy arrays, converted once).

    Args:
        backend: ``"eager"`` or ``"onnxruntime"`` (:data:`LATENCY_BACKENDS`).
        threads: ONNX Runtime's intra-op threads (eager: set by the timer, :func:`compare_backend`).
        exporter: for ``"onnxruntime"``, :data:`EXPORTERS`.

    Raises:
        ConfigError: unknown backend or exporter, inputs the exported graph lacks. ImportError: see
            :func:`check_backend`.
    """
    check_backend(backend)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
    if backend == "onnxruntime":
        return _ort_runner(model, example_inputs, threads, exporter)
    model.eval()
    args, kwargs = _positional(example_inputs)
    return lambda: _call(model, args, kwargs)


def compare_backend(
    models: Mapping[str, nn.Module],
    example_inputs: Any,
    backend: str = "eager",
    *,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    block_ms: float = 10.0,
    exporter: str = "auto",
) -> dict[str, dict[str, Any]]:
    """Latency of several models in one runtime, timed interleaved (one block of each in turn).

    The models' train/eval modes are restored afterwards; ONNX Runtime reads an in-memory export of each.

    Returns:
        ``{name: {"median_ms", "iqr_ms", "q1_ms", "q3_ms", "mean_ms", "min_ms", "n", "calls_per_block",
        "threads", "device" ("cpu" or "onnxruntime:cpu"), "batch_size": None, "backend"}}`` (ms per forward
        of the whole batch).

    Raises:
        As :func:`prepare_runner` and :func:`secateur.analysis.latency.compare_callables`.
    """
    modes = {m: m.training for model in models.values() for m in model.modules()}
    try:
        runners = {
            name: prepare_runner(m, example_inputs, backend, threads=threads, exporter=exporter)
            for name, m in models.items()
        }
        res = compare_callables(runners, threads=threads, repeats=repeats, warmup=warmup, block_ms=block_ms)
    finally:
        for m, t in modes.items():
            m.training = t
    for r in res.values():
        r["backend"] = backend
        r["device"] = "onnxruntime:cpu" if backend == "onnxruntime" else "cpu"
    return res


def backend_latency(
    model: nn.Module,
    example_inputs: Any,
    backend: str = "eager",
    *,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    block_ms: float = 10.0,
    exporter: str = "auto",
) -> dict[str, Any]:
    """Latency of one model in ``backend`` (:func:`compare_backend` with one model): ms per forward,
    median and IQR over ``repeats`` blocks.

    Raises:
        As :func:`compare_backend`.
    """
    return compare_backend(
        {"model": model},
        example_inputs,
        backend,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        block_ms=block_ms,
        exporter=exporter,
    )["model"]
