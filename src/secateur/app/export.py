"""Deployment from the command line: ``secateur export`` (ONNX, optionally int8) and ``measure --latency``
(eager, TorchScript or torch.compile, ONNX Runtime fp32 and int8 side by side, with sizes on disk).

The library does the work (:mod:`secateur.analysis.onnx`, :mod:`secateur.analysis.quantize`,
:mod:`secateur.analysis.deploy`); this module adds what a command line needs: the model's example inputs
(:mod:`secateur.app.inputs`), the model as a deployment runs it (:func:`serving_module`: a Hugging Face
model's first output tensor, a causal LM without its key/value cache), calibration batches from ``--data``,
and the size on disk of a model folder (:func:`disk_sizes`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from secateur.errors import ConfigError

__all__ = [
    "FirstOutput",
    "compressed_size",
    "static_int8",
    "deployment_rows",
    "disk_sizes",
    "export_model",
    "heldout_example",
    "serving_module",
]


def _zero_fraction(model: Any) -> float:
    from torch import nn

    total = zeros = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            w = m.weight.detach()
            total += w.numel()
            zeros += int((w == 0).sum())
    return zeros / max(total, 1)


def disk_sizes(spec: str, model: Any = None) -> dict[str, Any]:
    """Size on disk of an ``hf:`` or ``saved:`` model's weight files (``size_on_disk_bytes``, and the
    files); other specs give ``{}``. safetensors stores every zero of a pruned weight: when more than 10%
    of ``model``'s conv/linear weights are zero, ``compressed`` adds the size of the same weights in the
    compressed-tensors ``sparse-bitmask`` layout (:func:`compressed_size`).
    """
    from secateur.app.models import HF_WEIGHT_FILES, model_folder

    folder = model_folder(spec)
    if folder is None or not folder.is_dir():
        return {}
    names = ("model.safetensors", "plan.json") if spec.startswith("saved:") else HF_WEIGHT_FILES
    files = [folder / n for n in names if (folder / n).is_file()]
    files += sorted(folder.glob("model-*.safetensors"))
    if not files:
        return {}
    out: dict[str, Any] = {
        "size_on_disk_bytes": sum(f.stat().st_size for f in files),
        "files_on_disk": [f.name for f in files],
    }
    if model is not None and _zero_fraction(model) > 0.1:
        out["compressed"] = compressed_size(model)
    return out


def compressed_size(model: Any, compression: str = "sparse-bitmask") -> dict[str, Any]:
    """Bytes of ``model``'s weights written by :func:`secateur.io.compressed.save_compressed` (to a temporary
    file, removed): ``{"format", "bytes", "note"}``."""
    import tempfile

    from secateur.io.compressed import save_compressed

    with tempfile.TemporaryDirectory() as tmp:
        info = save_compressed(model, Path(tmp) / "model.safetensors", compression=compression)
    return {
        "format": f"compressed-tensors {compression} in safetensors",
        "bytes": info["bytes"],
        "note": "non-zero values + one bit per weight; secateur.io.compressed.load_compressed reads it back",
    }


# ------------------------------------------------------------------------------------------------ serving
def serving_module(model: Any, fields: Sequence[Any]) -> Any:
    """What a deployment runs: ``model`` itself, or for a Hugging Face model a :class:`FirstOutput` wrapper
    that returns its first output tensor (logits, or ``last_hidden_state`` for an encoder) and runs a causal
    LM without its key/value cache (``use_cache=False``: one forward of the whole sequence, which tracing
    and ONNX export need)."""
    from secateur.app.inputs import model_kind

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return model
    extra = {"use_cache": False} if model_kind(model).task == "causal-lm" else {}
    names = [f.name for f in fields if f.name]
    return _with_signature(names)(model, names, extra)


def _with_signature(names: Sequence[str]) -> type:
    """A :class:`FirstOutput` subclass whose ``forward`` declares ``names`` as its parameters: TorchScript
    (``example_kwarg_inputs``) and ``torch.export`` bind keyword inputs by the signature."""
    import inspect

    param = inspect.Parameter
    kind = param.POSITIONAL_OR_KEYWORD
    sig = inspect.Signature([param("self", kind)] + [param(n, kind) for n in names])

    def forward(self: FirstOutput, *args: Any, **kwargs: Any) -> Any:
        return FirstOutput.forward(self, *args, **kwargs)

    forward.__signature__ = sig  # type: ignore[attr-defined]
    forward.__doc__ = FirstOutput.forward.__doc__
    return type("FirstOutput", (FirstOutput,), {"forward": forward})


class FirstOutput(nn.Module):
    """``model``'s first output tensor as a function of its inputs, given by keyword or positionally in the
    order of ``names`` (TorchScript traces positional inputs); ``extra`` keyword arguments are added to
    every call."""

    def __init__(self, model: Any, names: Sequence[str], extra: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        self.extra = dict(extra)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The first tensor of ``model(**inputs, **extra)``."""
        from secateur.analysis.onnx import flatten_outputs

        return flatten_outputs(self.model(**dict(zip(self.names, args)), **kwargs, **self.extra))[0]


# ------------------------------------------------------------------------------------------------ latency
def deployment_rows(
    model: Any,
    fields: Sequence[Any],
    *,
    batch_sizes: Sequence[int] = (1,),
    compiled: str | None = "auto",
    int8: bool = False,
    calibration: Any = None,
    repeats: int = 20,
    threads: int = 1,
    out_dir: str | Path | None = None,
    example: Any = None,
) -> list[dict[str, Any]]:
    """Latency and size on disk of ``model`` in eager PyTorch, TorchScript (or torch.compile), ONNX Runtime
    float32 and, with ``int8``, ONNX Runtime int8, side by side at each batch size
    (:func:`secateur.analysis.deploy.measure_deployment` on :func:`serving_module`; every ONNX row's outputs
    checked against PyTorch's on ``example``: real inputs such as :func:`heldout_example` gives, rows repeated
    to each batch size; default: :func:`secateur.app.inputs.make_inputs`' synthetic ones, on which an int8
    model calibrated on real data can look worse than it is).

    Returns:
        ``measure_deployment``'s rows (``runtime``, ``batch_size``, ``median_ms``, ``iqr_ms``, ``size_bytes``,
        ``speedup`` over eager, ``check`` ...).

    Raises:
        ConfigError / ImportError: as :func:`~secateur.analysis.deploy.measure_deployment`.
    """
    from secateur.analysis.deploy import measure_deployment
    from secateur.app.inputs import make_inputs

    serving = serving_module(model, fields)
    if example is None:
        example = make_inputs(fields, model)
    return measure_deployment(
        serving,
        example,
        batch_sizes=tuple(batch_sizes),
        out_dir=out_dir,
        compiled=compiled,
        quantize="auto" if int8 else None,
        calibration=calibration,
        threads=threads,
        repeats=repeats,
    )


def heldout_example(s: Any, n: int = 32) -> tuple[Any, str] | None:
    """Up to ``n`` held-out examples of a session's loaded data as model inputs, and what they are: images
    ``(B, C, H, W)`` (``"32 held-out images"``), or text blocks ``{"input_ids": (B, L), ...}`` with each input
    the blocks do not hold (``token_type_ids``) as zeros; None when the session has no held-out data."""
    import torch

    data = getattr(s, "data", None)
    if data is None or data.test is None or data.kind not in ("images", "text"):
        return None
    batch = next(iter(data.test), None)
    if batch is None:
        return None
    if data.kind == "images":
        x = batch[0][:n]
        return ({s.input_name: x} if s.input_name else x), f"{len(x)} held-out images"
    ids = batch["input_ids"][:n]
    dtypes = {f.name: getattr(torch, f.dtype) for f in s.fields}
    held = {k: batch[k][:n] if k in batch else torch.zeros_like(ids, dtype=dt) for k, dt in dtypes.items()}
    return held, f"{ids.shape[0]} held-out text blocks of {ids.shape[1]} tokens ({data.form})"


# ------------------------------------------------------------------------------------------------- export
def static_int8(model: nn.Module) -> bool:
    """Whether ``model`` is a CNN, whose int8 model ONNX Runtime's documentation recommends to quantise
    statically (activation ranges calibrated): it has convolutions and no attention (a module whose class
    name contains ``Attention``, ``attn`` by name, or a Hugging Face config with ``num_attention_heads``).
    Transformers, a ViT with its patch-embedding convolution included, get dynamic int8."""
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    config = getattr(model, "config", None)
    attention = getattr(config, "num_attention_heads", None) is not None or any(
        "attention" in type(m).__name__.lower() or name.rsplit(".", 1)[-1] in ("attn", "attention")
        for name, m in model.named_modules()
    )
    return has_conv and not attention


def _calibration(s: Any, batches: int) -> list[Any]:
    """The first ``batches`` training batches of the session's data, as model inputs."""
    out = []
    for b in s.data.train:
        if isinstance(b, Mapping):
            out.append({k: v for k, v in b.items() if any(f.name == k for f in s.fields)})
        else:
            x = b[0] if isinstance(b, (tuple, list)) else b
            out.append({s.input_name: x} if s.input_name else x)
        if len(out) >= batches:
            break
    return out


def export_model(
    model_spec: str,
    out_path: str | Path,
    *,
    opset: int | None = None,
    quantize: str | None = None,
    input_spec: str | None = None,
    input_shape: str | None = None,
    seq_len: int | None = None,
    data: str = "auto",
    calibration_batches: int = 8,
    dynamic_batch: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    trust_factory: Sequence[str] = (),
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``secateur export``: write ``out_path`` (ONNX) and, with ``quantize="int8"``, ``<stem>.int8.onnx``.

    The model as :func:`serving_module` runs it is exported on its example inputs
    (:func:`secateur.app.run.open_session`) with :func:`secateur.analysis.onnx.export_onnx` (``opset``:
    the exporter's default when None; the file's opset is returned), the batch axis dynamic unless
    ``dynamic_batch`` is False. ONNX Runtime then runs it on a batch of 2 example inputs and every output is
    compared with PyTorch's (:func:`secateur.analysis.quantize.compare_onnx_outputs`, float64; tolerance
    ``max|onnx - torch| <= 1e-4 * max|torch| + 1e-5``). int8
    (:func:`secateur.analysis.quantize.quantize_onnx`): dynamic for models without convolutions
    (transformers), static (QDQ) with ``calibration_batches`` batches of ``data`` for CNNs, as ONNX
    Runtime's documentation recommends (:func:`static_int8` decides: a ViT's patch-embedding convolution
    does not make it a CNN); its outputs are compared too (mean cosine >= 0.98 stated, not enforced: the
    figures are returned).

    Returns:
        ``{"onnx", "opset", "bytes", "input_spec", "dynamic_batch", "check", "int8": {"onnx", "mode", "bytes",
        "calibration_batches", "check"}}`` (``check``: ``compare_onnx_outputs``' summary).

    Raises:
        ConfigError: ``out_path`` not ending in ``.onnx``, an unknown ``quantize``, static int8 without
            data, the fp32 file outside the tolerance (the file is kept and named), and what
            :func:`~secateur.app.run.open_session` raises. ImportError: onnx / onnxruntime / onnxscript
            missing (``secateur[onnx]``).
    """
    from secateur.analysis.onnx import export_onnx, onnx_opset
    from secateur.analysis.quantize import compare_onnx_outputs, quantize_onnx
    from secateur.app.inputs import make_inputs
    from secateur.app.run import open_session

    say = echo or (lambda _: None)
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize {quantize!r}: allowed: int8")
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ConfigError(f"--out {out_path}: an ONNX file name ending in .onnx")
    static = False
    s = open_session(
        model_spec,
        data="none",
        input_spec=input_spec,
        input_shape=input_shape,
        seq_len=seq_len,
        model_kwargs=model_kwargs,
        trust_factory=trust_factory,
    )
    if quantize:
        static = static_int8(s.model)
        if static:
            s = open_session(
                model_spec,
                data=data,
                input_spec=input_spec,
                input_shape=input_shape,
                seq_len=seq_len,
                model_kwargs=model_kwargs,
                trust_factory=trust_factory,
                model=s.model,
            )
            if s.data.kind == "none":
                raise ConfigError("static int8 quantisation of a CNN needs calibration data: give --data")
    say(f"exporting {model_spec} ({s.input_spec}) to {out_path} ...")
    model = serving_module(s.model, s.fields)
    inputs = make_inputs(s.fields, s.model, batch=2 if dynamic_batch else None)
    export_onnx(model, inputs, out_path, opset=opset, dynamic_batch=dynamic_batch)
    check = compare_onnx_outputs(model, out_path, inputs, precision="fp32")
    result: dict[str, Any] = {
        "onnx": str(out_path),
        "opset": onnx_opset(out_path),
        "bytes": out_path.stat().st_size,
        "input_spec": s.input_spec,
        "dynamic_batch": dynamic_batch,
        "check": {k: v for k, v in check.items() if k != "outputs"},
    }
    if not check["within_tolerance"]:
        raise ConfigError(
            f"{out_path}: ONNX Runtime's outputs differ from PyTorch's (max relative error "
            f"{check['max_rel_error']:.3g}; tolerance: {check['tolerance']}); the file is kept for inspection"
        )
    if quantize:
        q_path = out_path.with_suffix(".int8.onnx")
        mode = "static" if static else "dynamic"
        say(f"quantising to int8 ({mode}) -> {q_path} ...")
        calib = _calibration(s, calibration_batches) if static else None
        quantize_onnx(out_path, q_path, mode=mode, calibration=calib)
        # checked on held-out data when there is some (images: loaded for static; text: loaded now), else on
        # the example inputs
        q_inputs, on = inputs, "the example inputs"
        if s.data.kind == "images":
            x = next(iter(s.data.test))[0][:32]
            q_inputs, on = ({s.input_name: x} if s.input_name else x), f"{len(x)} held-out images"
        else:
            q_inputs, on = _heldout_text(s, model_spec, data, inputs, on, trust_factory, model_kwargs)
        q_check = compare_onnx_outputs(model, q_path, q_inputs, precision="int8")
        result["int8"] = {
            "onnx": str(q_path),
            "mode": mode,
            "bytes": q_path.stat().st_size,
            "calibration_batches": len(calib) if calib else 0,
            "check": {k: v for k, v in q_check.items() if k != "outputs"},
            "checked_on": on,
        }
    return result


def _heldout_text(
    s: Any,
    model_spec: str,
    data: str,
    inputs: Any,
    on: str,
    trust_factory: Sequence[str],
    model_kwargs: dict[str, Any] | None,
) -> tuple[Any, str]:
    """Held-out text blocks for the int8 check of a text model (``input_ids`` among its inputs): the first
    batch (:data:`~secateur.app.datasources.TEXT_BATCH` blocks) of the held-out split of ``data``
    (``"auto"``: the text a saved folder recorded, else the default), each input the blocks do not hold
    (``token_type_ids``) taken as zeros. Returns ``(inputs, what they are)``; the example inputs as given
    when the model takes no text, ``data`` is ``"none"``, or ``"auto"`` data cannot be read.
    """
    import torch

    from secateur.app.run import open_session
    from secateur.errors import SecateurError

    names = [f.name for f in s.fields]
    if "input_ids" not in names or data == "none" or not isinstance(inputs, dict):
        return inputs, on
    try:
        t = open_session(model_spec, data=data, input_spec=s.input_spec, subset=16, model=s.model,
                         trust_factory=trust_factory, model_kwargs=model_kwargs)
    except SecateurError:
        if data != "auto":
            raise
        return inputs, on
    if t.data.kind != "text":
        return inputs, on
    batch = next(iter(t.data.test))
    ids = batch["input_ids"]
    held = {n: batch[n] if n in batch else torch.zeros_like(ids, dtype=inputs[n].dtype) for n in names}
    return held, f"{ids.shape[0]} held-out text blocks of {ids.shape[1]} tokens ({t.data.form})"
