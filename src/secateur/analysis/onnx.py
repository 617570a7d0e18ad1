"""ONNX export of a (pruned, compacted) model and its latency under ONNX Runtime.

A compacted model is a plain PyTorch model with fewer channels, so it exports like any other; a
model that still carries secateur's masks (parametrizations) is exported from a copy with the
masks baked in, so the graph holds plain weights with exact zeros. ONNX Runtime does not exploit
element-wise zeros, so only compaction (physical removal) makes the exported model faster.

Optional dependencies: ``pip install onnx onnxruntime onnxscript`` (the ``onnx`` extra). Every
function imports them lazily and raises ``ImportError`` naming the missing package.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.analysis.latency import compare_callables, time_callable
from secateur.analysis.progress import Steps
from secateur.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "baked_copy",
    "compare_onnx_latency",
    "export_onnx",
    "flatten_outputs",
    "inputs_at_batch",
    "onnx_latency",
    "onnx_opset",
    "ort_session",
    "session_feed",
]


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is required for ONNX export/latency: pip install onnx onnxruntime onnxscript "
            "(or pip install 'secateur[onnx]')"
        ) from exc


def _as_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    return (example_inputs,), {}


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every mask baked into plain weights; ``model`` is unchanged.

    Why not ``detach_masks(copy.deepcopy(model))``: ``torch.nn.utils.parametrize`` gives each
    parametrized module a generated class, and ``deepcopy`` shares that class between original and
    copy, so removing the parametrization from the copy deletes the weight property of the
    *original* too. We give each copied module a private clone of its class first.
    """
    from torch.nn.utils import parametrize

    from secateur.masks import detach_masks

    clone = copy.deepcopy(model)
    for module in clone.modules():
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
    return detach_masks(clone)


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_batch: bool = False,
    progress: bool | None = None,
) -> Path:
    """Export ``model`` (eval mode) to an ONNX file traced on ``example_inputs``.

    ``example_inputs`` is a tensor, a tuple of positional tensors or a dict of keyword tensors;
    the ONNX inputs are named ``input_0, input_1, ...`` (positional) or by their keyword. Masked
    models are exported from a deep copy with the masks baked in; the caller's model and its mode
    are not changed. Uses ``torch.onnx.export`` (the ``torch.export``-based exporter, which needs
    ``onnxscript``).

    Args:
        opset: ONNX opset version (default: the exporter's default; the version written is in the
            file, :func:`onnx_opset` reads it).
        dynamic_batch: make the leading dimension of every input dynamic (one file for every batch size).
        progress: a progress bar on stderr while exporting (``None``: only when stderr is a terminal).

    Returns:
        The path written.

    Raises:
        ImportError: onnx or onnxscript is missing. TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _require("onnx")
    _require("onnxscript")
    from secateur.masks.element import masked_parameters

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model = model
    if any(True for _ in masked_parameters(model)):
        export_model = baked_copy(model)
    was_training = export_model.training
    export_model.eval()
    if dynamic_batch and _first_batch(example_inputs) == 1:
        example_inputs = inputs_at_batch(example_inputs, 2)  # torch.export specialises a size of 1
    args, kwargs = _as_args(example_inputs)
    names = list(kwargs) if kwargs else [f"input_{i}" for i in range(len(args))]
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        if kwargs:
            dynamic_shapes = {k: {0: batch} for k in kwargs}
        else:
            dynamic_shapes = tuple({0: batch} for _ in args)
    try:
        with Steps("ONNX export", 1, progress) as bar, bar.step(path.name), _quiet_exporter():
            torch.onnx.export(
                export_model,
                args,
                str(path),
                kwargs=kwargs or None,
                input_names=names,
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
            )
    finally:
        export_model.train(was_training)
    log.info("exported %s to %s (opset %s)", type(model).__name__, path, onnx_opset(path))
    return path


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """No gradients; the exporter's chatter (warnings, torch.onnx's log lines, its stdout) silenced."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def onnx_opset(path: str | os.PathLike[str]) -> int | None:
    """The default-domain (``ai.onnx``) opset version of the ONNX file at ``path``; None if it has none.

    Raises:
        ImportError: onnx is missing. ConfigError: the file is missing.
    """
    onnx = _require("onnx")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ONNX file not found: {path}")
    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def ort_session(path: str | os.PathLike[str], threads: int = 1) -> Any:
    """An ONNX Runtime ``InferenceSession`` of the file at ``path`` on the CPU execution provider.

    ``threads`` intra-op threads, one inter-op thread; ONNX Runtime's own log is limited to errors.

    Raises:
        ImportError: onnxruntime is missing (names ``secateur[onnx]``). ConfigError: the file is missing.
    """
    ort = _require("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ONNX file not found: {path}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _numpy(v: Any) -> Any:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v


def session_feed(sess: Any, example_inputs: Any, *, source: str = "the ONNX model") -> dict[str, Any]:
    """The ``{input name: NumPy array}`` feed of ``sess`` for ``example_inputs``.

    A dict is matched to the graph's inputs by name (keys the graph does not use are ignored: the
    exporter drops unused inputs); a tensor or a tuple is matched by position. Tensors are converted
    to NumPy once (CPU, no gradient).

    Raises:
        ConfigError: a graph input the dict lacks, or a positional count that differs from the graph's
            (the message names ``source`` and the graph's inputs).
    """
    onnx_inputs = [i.name for i in sess.get_inputs()]
    args, kwargs = _as_args(example_inputs)
    if kwargs:
        missing = [n for n in onnx_inputs if n not in kwargs]
        if missing:
            raise ConfigError(f"{source} takes inputs {onnx_inputs}; the inputs given lack {missing}")
        return {n: _numpy(kwargs[n]) for n in onnx_inputs}
    if len(onnx_inputs) != len(args):
        raise ConfigError(f"{source} takes {len(onnx_inputs)} inputs ({onnx_inputs}), got {len(args)}")
    return {n: _numpy(v) for n, v in zip(onnx_inputs, args)}


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output in the order the ONNX exporter flattens them.

    A tensor gives itself; a tuple or list its items in order; a dict (a Hugging Face ``ModelOutput``
    included, whose ``values()`` skip ``None`` fields) its values in order; ``None`` nothing.
    """
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None:
        return []
    if isinstance(out, Mapping):
        items: Any = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        return []
    return [t for item in items for t in flatten_outputs(item)]


def inputs_at_batch(example_inputs: Any, batch: int) -> Any:
    """``example_inputs`` with every tensor's leading (batch) dimension set to ``batch``.

    Rows are taken cyclically from the given ones (row ``i`` is row ``i mod n``), so a batch of 32
    built from 4 examples holds real inputs; non-tensor values and 0-d tensors are passed unchanged.
    The structure (tensor, tuple or dict) is kept.

    Raises:
        ConfigError: ``batch`` < 1, or a tensor with an empty leading dimension.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be an int >= 1, got {batch!r}")

    def one(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return v
        if v.shape[0] == 0:
            raise ConfigError(f"cannot build a batch of {batch} from an input with batch dimension 0")
        return v[torch.arange(batch) % v.shape[0]].contiguous()

    args, kwargs = _as_args(example_inputs)
    if kwargs:
        return {k: one(v) for k, v in kwargs.items()}
    if isinstance(example_inputs, tuple):
        return tuple(one(v) for v in args)
    return one(example_inputs)


def _first_batch(example_inputs: Any) -> int | None:
    args, kwargs = _as_args(example_inputs)
    values = list(kwargs.values()) if kwargs else list(args)
    first = values[0] if values else None
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else None


def onnx_latency(
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 3,
    block_ms: float = 10.0,
) -> dict[str, Any]:
    """Median and IQR latency (ms per call) of the ONNX model at ``path`` on ONNX Runtime's CPU provider.

    ``example_inputs`` must match the export (same structure as given to :func:`export_onnx`);
    tensors are converted to NumPy once, outside the timing. ``threads`` sets ONNX Runtime's
    intra-op thread count (default: ``torch.get_num_threads()``, so the figure compares with
    :func:`secateur.analysis.latency.measure_latency`).

    Returns:
        As :func:`measure_latency`, with ``"device": "onnxruntime:cpu"``, ``"batch_size"`` and
        ``"outputs"`` (the shapes of the outputs of one call).

    Raises:
        ImportError: onnxruntime is missing. ConfigError: the file is missing or the number of
        inputs does not match the model's.
    """
    path = Path(path)
    n_threads = torch.get_num_threads() if threads is None else int(threads)
    sess = ort_session(path, n_threads)
    feed, batch = session_feed(sess, example_inputs, source=path.name), _first_batch(example_inputs)
    outputs = sess.run(None, feed)
    res = time_callable(lambda: sess.run(None, feed), threads=n_threads, repeats=repeats, warmup=warmup,
                        block_ms=block_ms, label="onnxruntime")
    res["device"] = "onnxruntime:cpu"
    res["batch_size"] = batch
    res["outputs"] = [list(o.shape) for o in outputs]
    return res


def compare_onnx_latency(
    dense_path: str | os.PathLike[str],
    pruned_path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 3,
    block_ms: float = 10.0,
) -> dict[str, Any]:
    """ONNX Runtime latency of two exported models, interleaved in one run (as ``compare_latency``).

    Returns:
        ``{"dense": <onnx_latency-like dict>, "pruned": <dict>, "speedup": dense median / pruned
        median}``.

    Raises:
        As :func:`onnx_latency`.
    """
    n_threads = torch.get_num_threads() if threads is None else int(threads)
    fns, batches = {}, {}
    for key, p in (("dense", Path(dense_path)), ("pruned", Path(pruned_path))):
        sess = ort_session(p, n_threads)
        feed, batches[key] = session_feed(sess, example_inputs, source=p.name), _first_batch(example_inputs)
        sess.run(None, feed)
        fns[key] = (lambda s, f: lambda: s.run(None, f))(sess, feed)
    res: dict[str, Any] = compare_callables(fns, threads=n_threads, repeats=repeats, warmup=warmup,
                                            block_ms=block_ms)
    for key in ("dense", "pruned"):
        res[key]["device"] = "onnxruntime:cpu"
        res[key]["batch_size"] = batches[key]
    res["speedup"] = res["dense"]["median_ms"] / res["pruned"]["median_ms"]
    return res
