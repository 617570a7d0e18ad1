"""ONNX export of a (pruned, compacted) model and its latency under ONNX Runtime.

A compacted model is a plain PyTorch model with fewer channels, so it exports like any other; a
model that still carries secateur's masks (parametrizations) is exported from a copy with the
masks baked in, so the graph holds plain weights with exact zeros. ONNX Runtime does not exploit
element-wise zeros, so only compaction (physical removal) makes the exported model faster.

Optional dependencies: ``pip install onnx onnxruntime onnxscript`` (the ``onnx`` extra). Every
function imports them lazily and raises ``ImportError`` naming the missing package.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.analysis.latency import compare_callables, time_callable
from secateur.errors import ConfigError

__all__ = ["baked_copy", "compare_onnx_latency", "export_onnx", "onnx_latency"]


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
) -> Path:
    """Export ``model`` (eval mode) to an ONNX file traced on ``example_inputs``.

    ``example_inputs`` is a tensor, a tuple of positional tensors or a dict of keyword tensors;
    the ONNX inputs are named ``input_0, input_1, ...`` (positional) or by their keyword. Masked
    models are exported from a deep copy with the masks baked in; the caller's model and its mode
    are not changed. Uses ``torch.onnx.export`` (the ``torch.export``-based exporter, which needs
    ``onnxscript``).

    Args:
        opset: ONNX opset version (default: the exporter's default).
        dynamic_batch: make the leading dimension of every input dynamic.

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
        with torch.no_grad():
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
    return path


def _session(path: Path, threads: int) -> Any:
    ort = _require("onnxruntime")
    if not path.is_file():
        raise ConfigError(f"ONNX file not found: {path}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _feed(sess: Any, path: Path, example_inputs: Any) -> tuple[dict[str, Any], int | None]:
    args, kwargs = _as_args(example_inputs)
    values = list(kwargs.values()) if kwargs else list(args)
    onnx_inputs = sess.get_inputs()
    if len(onnx_inputs) != len(values):
        raise ConfigError(
            f"{path.name} takes {len(onnx_inputs)} inputs ({[i.name for i in onnx_inputs]}), "
            f"got {len(values)}"
        )
    feed = {i.name: v.detach().cpu().numpy() for i, v in zip(onnx_inputs, values)}
    first = values[0] if values else None
    batch = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else None
    return feed, batch


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
    sess = _session(path, n_threads)
    feed, batch = _feed(sess, path, example_inputs)
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
        sess = _session(p, n_threads)
        feed, batches[key] = _feed(sess, p, example_inputs)
        sess.run(None, feed)
        fns[key] = (lambda s, f: lambda: s.run(None, f))(sess, feed)
    res: dict[str, Any] = compare_callables(fns, threads=n_threads, repeats=repeats, warmup=warmup,
                                            block_ms=block_ms)
    for key in ("dense", "pruned"):
        res[key]["device"] = "onnxruntime:cpu"
        res[key]["batch_size"] = batches[key]
    res["speedup"] = res["dense"]["median_ms"] / res["pruned"]["median_ms"]
    return res
