"""Example inputs for any model: ``--input-spec`` / ``--input-shape`` on the command line, or derived.

An *input spec* names each input of one forward pass: ``input_ids:int64[1,128]``,
``pixel_values:float32[1,3,224,224]``; several are separated by ``;`` or by commas outside brackets
(``input_ids:int64[1,128],attention_mask:int64[1,128]``). A field without a name (``float32[1,1,28,28]``)
is positional; named fields are keyword arguments of ``forward``. ``--input-shape N,C,H,W`` is the
float32 positional shorthand.

Without a spec the inputs are derived from the model (:func:`derive_fields`):

* a secateur zoo model: its own shape, ``(1, in_chans, img_size, img_size)`` (28 unless built otherwise);
* a Hugging Face model whose main input is ``pixel_values``: ``(1, config.num_channels, H, W)`` with
  ``config.image_size`` (224 when the config has none);
* a Hugging Face model whose main input is ``input_ids``: ``input_ids`` and ``attention_mask`` of
  ``(1, seq_len)`` tokens (``seq_len`` capped by ``config.max_position_embeddings``);
* a folder written by ``secateur prune`` / ``finetune``: the spec recorded in its ``plan.json`` metadata
  (``input_spec``);
* any other model: one 28x28 one-channel image (Fashion-MNIST, the command line's default data) when the
  model runs on it, else ``(1, in_features)`` when its first layer is a ``Linear``; otherwise a ConfigError
  asks for ``--input-spec``.

Values: float inputs are standard normal (seeded), ``*mask`` integer inputs are ones, ``token_type_ids``
zeros, other integer inputs token ids drawn uniformly below the model's vocabulary size (zeros when it is
unknown). They serve tracing, counting and timing, never evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from secateur.errors import ConfigError, did_you_mean

__all__ = [
    "DTYPES",
    "InputField",
    "ModelKind",
    "derive_fields",
    "fields_from_shape",
    "format_input_spec",
    "make_inputs",
    "model_kind",
    "parse_input_spec",
    "resolve_fields",
]

#: dtype names an input spec accepts (PyTorch's names; ``long``/``float``/``int`` are aliases).
DTYPES: tuple[str, ...] = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)
_ALIASES = {"float": "float32", "long": "int64", "int": "int32", "half": "float16", "double": "float64"}
_FIELD = re.compile(
    r"^(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*:\s*)?(?P<dtype>[A-Za-z0-9_]+)\s*\[(?P<dims>[^\]]*)\]$"
)
#: Largest number of elements one input may have (2**31: a typo such as 1,3,2240,2240 is refused early).
MAX_ELEMENTS = 2**31
#: Default sequence length of derived text inputs (tokens).
DEFAULT_SEQ_LEN = 128
#: Image side used for a Hugging Face vision config without ``image_size`` (ImageNet's 224).
DEFAULT_IMAGE_SIZE = 224
FASHION_MNIST_SHAPE = (1, 1, 28, 28)


@dataclass(frozen=True)
class InputField:
    """One input of a forward pass: ``name`` (None: positional), ``dtype`` (a :data:`DTYPES` name) and
    ``shape`` (a tuple of positive ints, batch first)."""

    name: str | None
    dtype: str
    shape: tuple[int, ...]

    def spec(self) -> str:
        """The field as input-spec text, e.g. ``input_ids:int64[1,128]``."""
        dims = ",".join(str(d) for d in self.shape)
        return f"{self.name}:{self.dtype}[{dims}]" if self.name else f"{self.dtype}[{dims}]"


@dataclass(frozen=True)
class ModelKind:
    """What a model computes, as far as the command line needs to know.

    ``task``: ``"classifier"`` (logits over classes: zoo models, ``*ForImageClassification``,
    ``*ForSequenceClassification``, user factories), ``"causal-lm"`` (``*ForCausalLM`` / ``*LMHeadModel``)
    or ``"encoder"`` (a Hugging Face base model without a head: hidden states). ``modality``: ``"image"``,
    ``"text"`` or ``"other"``. ``label`` is the two joined (``"image-classifier"``, ``"causal-lm"``,
    ``"text-encoder"``), the vocabulary of ``secateur recipes``.
    """

    task: str
    modality: str

    @property
    def label(self) -> str:
        """``"causal-lm"``, or ``modality-task`` (``"image-classifier"``, ``"text-encoder"``, ...)."""
        return self.task if self.task == "causal-lm" else f"{self.modality}-{self.task}"


def _split_tokens(text: str) -> list[str]:
    """Split on ``;`` and on commas outside brackets (or parentheses, so a mistyped ``(1,8)`` stays whole)."""
    tokens, depth, cur = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if (ch == ";" or (ch == "," and depth == 0)) and depth <= 0:
            tokens.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    tokens.append("".join(cur).strip())
    return tokens


def _parse_field(token: str) -> InputField:
    where = f"--input-spec: token {token!r}"
    match = _FIELD.match(token)
    if match is None:
        raise ConfigError(
            f"{where}: expected NAME:DTYPE[D0,D1,...] or DTYPE[D0,D1,...], e.g. input_ids:int64[1,128]"
        )
    dtype = _ALIASES.get(match["dtype"], match["dtype"])
    if dtype not in DTYPES:
        raise ConfigError(
            f"{where}: unknown dtype {match['dtype']!r}{did_you_mean(match['dtype'], DTYPES)}; "
            f"allowed: {list(DTYPES)}"
        )
    dims_text = [d.strip() for d in match["dims"].split(",")]
    if dims_text == [""]:
        raise ConfigError(f"{where}: no dimensions between the brackets (a batch dimension at least)")
    shape = []
    for d in dims_text:
        if not d.isdigit() or int(d) < 1:
            raise ConfigError(f"{where}: dimension {d!r} is not a positive integer")
        shape.append(int(d))
    n = 1
    for d in shape:
        n *= d
    if n > MAX_ELEMENTS:
        raise ConfigError(f"{where}: {n:,} elements is more than {MAX_ELEMENTS:,}")
    return InputField(match["name"], dtype, tuple(shape))


def parse_input_spec(text: str) -> tuple[InputField, ...]:
    """Parse ``--input-spec`` text (see the module docstring) into fields, in order.

    Raises:
        ConfigError: an empty spec, a token that is not ``NAME:DTYPE[dims]``, an unknown dtype (with a
            did-you-mean), a dimension that is not a positive integer, an input over :data:`MAX_ELEMENTS`
            elements, a name given twice, or named and unnamed fields mixed. The message names the token.
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("--input-spec: empty; e.g. 'input_ids:int64[1,128]' or 'float32[1,3,224,224]'")
    fields = [_parse_field(t) for t in _split_tokens(text) if t]
    names = [f.name for f in fields]
    if any(n is None for n in names) and any(n is not None for n in names):
        raise ConfigError(
            f"--input-spec {text!r}: mixes named and positional fields; name all of them or none"
        )
    seen: set[str] = set()
    for f in fields:
        if f.name is not None and f.name in seen:
            raise ConfigError(f"--input-spec: token {f.spec()!r}: input {f.name!r} given twice")
        seen.add(f.name or "")
    return tuple(fields)


def fields_from_shape(text: str) -> tuple[InputField, ...]:
    """``--input-shape N,C,H,W`` (any rank): one positional float32 field.

    Raises:
        ConfigError: a dimension that is not a positive integer (named).
    """
    dims = [d.strip() for d in text.split(",")]
    bad = [d for d in dims if not (d.isdigit() and int(d) > 0)]
    if bad:
        raise ConfigError(
            f"--input-shape {text!r}: dimension {bad[0]!r} is not a positive integer; write the shape as "
            "comma-separated positive integers, e.g. 1,3,224,224"
        )
    return (_parse_field(f"float32[{text}]"),)


def format_input_spec(fields: Sequence[InputField]) -> str:
    """The fields as one input-spec string (``;``-separated); ``parse_input_spec`` reads it back."""
    return ";".join(f.spec() for f in fields)


def _hf_config(model: Any) -> Any:
    """The model's Hugging Face config, or None for a model that is not a transformers model."""
    config = getattr(model, "config", None)
    return config if config is not None and hasattr(config, "to_dict") else None


def model_kind(model: Any) -> ModelKind:
    """What ``model`` computes (:class:`ModelKind`), read from its class name and Hugging Face config.

    Source: the transformers naming convention (``*ForCausalLM``, ``*LMHeadModel``,
    ``*For...Classification``, base ``*Model`` classes without a head) and ``main_input_name``.
    """
    name = type(model).__name__
    config = _hf_config(model)
    if config is None:
        zoo = getattr(model, "secateur_zoo", None)
        return ModelKind("classifier", "image" if zoo is not None or _first_conv(model) else "other")
    main = getattr(model, "main_input_name", "input_ids")
    modality = {"pixel_values": "image", "input_ids": "text"}.get(main, "other")
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return ModelKind("causal-lm", "text")
    if "Classification" in name:
        return ModelKind("classifier", modality)
    return ModelKind("encoder", modality)


def _first_conv(model: Any) -> Any:
    from torch import nn

    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            return m if isinstance(m, nn.Conv2d) else None
    return None


def _image_size(config: Any) -> tuple[int, int]:
    size = getattr(config, "image_size", None)
    if size is None:
        return DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE
    if isinstance(size, int):
        return size, size
    if isinstance(size, Mapping):
        h, w = size.get("height"), size.get("width")
        if h and w:
            return int(h), int(w)
        edge = size.get("shortest_edge", DEFAULT_IMAGE_SIZE)
        return int(edge), int(edge)
    h, w = (list(size) + list(size))[:2]
    return int(h), int(w)


def max_positions(config: Any) -> int | None:
    """The longest sequence a text config accepts (``max_position_embeddings`` / ``n_positions``), or None."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _text_fields(config: Any, seq_len: int | None) -> tuple[InputField, ...]:
    limit = max_positions(config)
    n = seq_len or (min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN)
    if limit is not None and n > limit:
        raise ConfigError(f"--seq-len {n} is longer than the model accepts (max_position_embeddings {limit})")
    return (InputField("input_ids", "int64", (1, n)), InputField("attention_mask", "int64", (1, n)))


def derive_fields(model: Any, seq_len: int | None = None) -> tuple[InputField, ...]:
    """The example input fields of ``model`` (batch 1), derived as the module docstring says.

    Raises:
        ConfigError: a model whose inputs cannot be derived (the message asks for ``--input-spec``), or a
            ``seq_len`` beyond the model's position limit.
    """
    from torch import nn

    zoo = getattr(model, "secateur_zoo", None)
    if isinstance(zoo, Mapping):
        size = int(zoo.get("img_size", 28))
        return (InputField(None, "float32", (1, int(zoo.get("in_chans", 1)), size, size)),)
    config = _hf_config(model)
    if config is not None:
        main = getattr(model, "main_input_name", "input_ids")
        if main == "pixel_values":
            h, w = _image_size(config)
            return (
                InputField("pixel_values", "float32", (1, int(getattr(config, "num_channels", 3)), h, w)),
            )
        if main == "input_ids":
            return _text_fields(config, seq_len)
        raise ConfigError(
            f"cannot derive example inputs of {type(model).__name__} (main input {main!r}); "
            "give them with --input-spec, e.g. 'input_values:float32[1,16000]'"
        )
    if _runs_on(model, FASHION_MNIST_SHAPE):
        return (InputField(None, "float32", FASHION_MNIST_SHAPE),)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            return (InputField(None, "float32", (1, m.in_features)),)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            break
    raise ConfigError(
        f"cannot derive example inputs of {type(model).__name__}: give them with --input-spec "
        "(e.g. 'float32[1,3,224,224]') or --input-shape N,C,H,W"
    )


def _runs_on(model: Any, shape: tuple[int, ...]) -> bool:
    """Whether ``model`` (eval mode, no gradients, modes restored) runs on one zero tensor of ``shape``."""
    import torch

    from secateur._torch import eval_mode

    try:
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(shape))
    except Exception:  # noqa: BLE001 - any failure means "not this shape"
        return False
    return True


def resolve_fields(
    model: Any,
    *,
    input_spec: str | None = None,
    input_shape: str | None = None,
    seq_len: int | None = None,
    recorded: str | None = None,
) -> tuple[tuple[InputField, ...], str]:
    """The input fields to use and where they came from (``"--input-spec"``, ``"--input-shape"``,
    ``"recorded in the saved folder"`` or ``"derived from the model"``).

    ``recorded``: the spec a saved folder's metadata holds. ``seq_len`` replaces the sequence length of
    recorded text inputs (those named ``input_ids`` / ``attention_mask`` / ``token_type_ids``).

    Raises:
        ConfigError: both ``input_spec`` and ``input_shape``, or as :func:`parse_input_spec`,
            :func:`fields_from_shape` and :func:`derive_fields`.
    """
    if input_spec and input_shape:
        raise ConfigError("give --input-spec or --input-shape, not both")
    if input_spec:
        return parse_input_spec(input_spec), "--input-spec"
    if input_shape:
        return fields_from_shape(input_shape), "--input-shape"
    if recorded:
        fields = parse_input_spec(recorded)
        if seq_len:
            text = {"input_ids", "attention_mask", "token_type_ids"}
            fields = tuple(
                InputField(f.name, f.dtype, (f.shape[0], seq_len)) if f.name in text else f for f in fields
            )
        return fields, "recorded in the saved folder"
    return derive_fields(model, seq_len), "derived from the model"


def _vocab_size(model: Any) -> int | None:
    config = _hf_config(model)
    v = getattr(config, "vocab_size", None) if config is not None else None
    if v is None and config is not None and hasattr(config, "get_text_config"):
        v = getattr(config.get_text_config(), "vocab_size", None)
    return int(v) if isinstance(v, int) and v > 0 else None


def make_inputs(
    fields: Sequence[InputField], model: Any = None, *, batch: int | None = None, seed: int = 0
) -> Any:
    """Tensors for ``fields``: one tensor (one positional field), a tuple (several positional) or a dict.

    ``batch`` replaces the leading dimension of every field. Values as the module docstring says; token ids
    are drawn below ``model``'s ``config.vocab_size`` when it has one (a ``torch.Generator`` seeded with
    ``seed``, so the same call gives the same tensors).

    Raises:
        ConfigError: ``batch`` < 1.
    """
    import torch

    if batch is not None and batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    gen = torch.Generator().manual_seed(seed)
    vocab = _vocab_size(model) if model is not None else None
    out: list[tuple[str | None, torch.Tensor]] = []
    for f in fields:
        shape = (batch, *f.shape[1:]) if batch is not None else f.shape
        dtype = getattr(torch, f.dtype)
        name = f.name or ""
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=gen).to(dtype)
        elif dtype == torch.bool or name.endswith("mask"):
            t = torch.ones(shape, dtype=dtype)
        elif vocab and name not in ("token_type_ids", "position_ids"):
            t = torch.randint(0, vocab, shape, generator=gen).to(dtype)
        else:
            t = torch.zeros(shape, dtype=dtype)
        out.append((f.name, t))
    if all(n is None for n, _ in out):
        tensors = tuple(t for _, t in out)
        return tensors[0] if len(tensors) == 1 else tensors
    return {n: t for n, t in out}
