"""Compressed storage of element-sparse weights (unstructured or N:M), in a safetensors file.

safetensors stores every tensor dense: a 50%-sparse weight costs as many bytes as the dense one, and
``secateur.save`` / ``save_pretrained`` write such files. One-shot and unstructured pruning therefore save
no disk space unless the zeros are encoded away. This module writes the *bitmask* encodings of the
``compressed-tensors`` library (the format of llm-compressor checkpoints, ``"sparse-bitmask"`` and
``"sparse-24-bitmask"``), with their tensor names and bit order, in an ordinary safetensors file:

For a compressed weight ``<module>.weight`` of dense shape ``S``, viewed row-major as a matrix of
``R = S[0]`` rows and ``C = prod(S[1:])`` columns:

- ``<module>.shape``: int64, the dense shape ``S`` (``(len(S),)``; ``(len(S), 1)`` in the 2:4 format);
- ``<module>.bitmask``: uint8 ``(R, ceil(C / 8))``, bit ``j % 8`` (least significant first) of byte
  ``j // 8`` of row ``i`` set where element ``(i, j)`` is stored (``numpy.packbits(..., bitorder="little")``);
- ``<module>.compressed``: the stored values in row-major order, the weight's dtype: 1-D in
  ``"sparse-bitmask"`` (the non-zeros), ``(R, C / 2)`` in ``"sparse-24-bitmask"`` (two per group of four;
  a group with fewer than two non-zeros stores zeros to fill its two slots);
- ``<module>.row_offsets``: int64 ``(R,)``, where row ``i`` starts in ``compressed`` (``"sparse-bitmask"``
  only).

Other tensors are stored as they are. The file's metadata says ``"format": "secateur-compressed"``, the
encoding (``"compression"``) and the names of the compressed weights (``"compressed_weights"``, JSON).
A tied tensor (one storage under several names, e.g. a language model's LM head and embedding) is stored
once, under its first name; ``"tied"`` (JSON ``{alias: stored name}``, only when there is one) records the
others, and :func:`load_compressed` returns the stored tensor under every name (the same tensor object).
For 2-D weights (Linear layers) this is exactly compressed-tensors' layout; weights of more dimensions
(convolutions) are flattened to ``(S[0], prod(S[1:]))`` as above, an extension of secateur's.

Reading (:func:`load_compressed`) gives back the dense state dict bit for bit, with one exception that
follows from the encoding: a stored ``-0.0`` (a zero) reads back as ``+0.0``.

Status of the standard (checked with compressed-tensors 0.20.1, the version on PyPI today): the library
still defines the two formats (``CompressionFormat.sparse_bitmask``, marked "legacy format") and their
bit packing (``compressed_tensors.utils.pack_bitmasks`` / ``unpack_bitmasks``), but no longer ships their
compressors, so it cannot write or read such files itself; this module needs only numpy and safetensors.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from secateur.errors import ConfigError, DataError, SerializationError, did_you_mean
from secateur.io.tied import check_tied_file, tied_aliases
from secateur.io.validate import validate_tied

__all__ = ["COMPRESSIONS", "FORMAT_NAME", "load_compressed", "save_compressed"]

#: Encodings: compressed-tensors' names.
COMPRESSIONS = ("sparse-bitmask", "sparse-24-bitmask")
#: The value of the ``"format"`` metadata field of a compressed file.
FORMAT_NAME = "secateur-compressed"
_PARTS = {"sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"),
          "sparse-24-bitmask": ("shape", "compressed", "bitmask")}


def _effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under plain names, masks applied (what it computes with)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if ".parametrizations." in name or name.startswith("parametrizations."):
            continue
        out[name] = t
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for pname in module.parametrizations.keys():
                out[f"{path}.{pname}" if path else pname] = getattr(module, pname)
    return out


def _is_candidate(name: str, t: torch.Tensor) -> bool:
    return (name == "weight" or name.endswith(".weight")) and t.dim() >= 2


def _part(weight_name: str, part: str) -> str:
    """compressed-tensors' name of ``part`` of ``weight_name``: ``"fc.weight"`` -> ``"fc.<part>"``."""
    prefix = weight_name[: -len("weight")].rstrip(".")
    return f"{prefix}.{part}" if prefix else part


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().reshape(t.shape[0], -1)


def _keep_24(m: torch.Tensor) -> torch.Tensor | None:
    """The 2-per-4 stored positions of matrix ``m`` (non-zeros first, then the earliest zeros), or None when
    a row length is not a multiple of 4 or a group of four holds more than two non-zeros."""
    rows, cols = m.shape
    if cols % 4:
        return None
    nz = (m != 0).reshape(rows, cols // 4, 4)
    if bool((nz.sum(-1) > 2).any()):
        return None
    rank = nz.to(torch.int64) * 8 + torch.arange(3, -1, -1)  # non-zeros first, then by position
    top = rank.topk(2, dim=-1).indices
    keep = torch.zeros_like(nz).scatter_(-1, top, True)
    return keep.reshape(rows, cols)


def _pack(keep: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little"))


def _encode(name: str, t: torch.Tensor, compression: str) -> dict[str, torch.Tensor] | None:
    """The encoded tensors of weight ``name`` (named without ``.weight``), or None to store it dense."""
    m = _as_matrix(t)
    if compression == "sparse-24-bitmask":
        keep = _keep_24(m)
        if keep is None:
            return None
        return {
            _part(name, "shape"): torch.tensor(list(t.shape), dtype=torch.int64).reshape(-1, 1),
            _part(name, "compressed"): m[keep].reshape(m.shape[0], m.shape[1] // 2).contiguous(),
            _part(name, "bitmask"): _pack(keep),
        }
    keep = m != 0
    n_kept = int(keep.sum())
    cost = n_kept * t.element_size() + m.shape[0] * (math.ceil(m.shape[1] / 8) + 8)
    if cost >= t.numel() * t.element_size():
        return None  # too dense for the bitmask to pay off
    counts = keep.sum(dim=1)
    return {
        _part(name, "shape"): torch.tensor(list(t.shape), dtype=torch.int64),
        _part(name, "compressed"): m[keep].contiguous(),
        _part(name, "bitmask"): _pack(keep),
        _part(name, "row_offsets"): (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def save_compressed(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    compression: str = "sparse-bitmask",
) -> dict[str, Any]:
    """Write ``model``'s weights to the safetensors file ``path`` with sparse weights bitmask-encoded.

    Every tensor named ``*.weight`` with at least two dimensions is a candidate: ``"sparse-bitmask"``
    encodes it when that is smaller than dense (above about 3% zeros in float32); ``"sparse-24-bitmask"``
    when every group of four consecutive elements of each row holds at most two non-zeros (2:4) and rows
    are a multiple of four long. Other tensors are stored dense. Masked models are written as they compute
    (masks applied, the masks themselves not stored). The file is written beside ``path`` and renamed,
    with the user's umask.

    Args:
        model: an ``nn.Module`` (possibly carrying secateur masks) or a state dict of tensors.
        compression: ``"sparse-bitmask"`` (any sparsity) or ``"sparse-24-bitmask"`` (2:4).

    Returns:
        ``{"path", "compression", "compressed_weights" (names), "dense_weights" (candidates stored dense),
        "bytes" (file size on disk), "dense_bytes" (the stored tensors' dense size, a tied tensor counted
        once, header excluded)}``.

    Raises:
        ConfigError: an unknown ``compression``, ``model`` neither a module nor a dict of tensors, or a
            compressed tensor name that collides with another tensor (named).
    """
    if compression not in COMPRESSIONS:
        raise ConfigError(
            f"unknown compression {compression!r}{did_you_mean(compression, COMPRESSIONS)}; "
            f"choose one of {COMPRESSIONS}"
        )
    if isinstance(model, nn.Module):
        state = _effective_state(model)
    elif isinstance(model, Mapping) and all(isinstance(v, torch.Tensor) for v in model.values()):
        state = dict(model)
    else:
        raise ConfigError(
            f"save_compressed: model must be an nn.Module or a dict of tensors, got {type(model).__name__}"
        )
    tied = tied_aliases(state)  # a tied weight (lm_head is the embedding) is stored once
    state = {k: v for k, v in state.items() if k not in tied}
    out: dict[str, torch.Tensor] = {}
    encoded, dense = [], []
    for name, t in state.items():
        parts = _encode(name, t, compression) if _is_candidate(name, t) else None
        if parts is None:
            if _is_candidate(name, t):
                dense.append(name)
            parts = {name: t.detach().cpu().contiguous().clone()}
        else:
            encoded.append(name)
        for key, value in parts.items():
            if key in out:  # e.g. a tensor named "fc.shape" beside the encoded "fc.weight"
                raise ConfigError(f"save_compressed: tensor name {key!r} (from {name!r}) is used twice")
            out[key] = value
    metadata = {"format": FORMAT_NAME, "compression": compression, "compressed_weights": json.dumps(encoded)}
    if tied:
        metadata["tied"] = json.dumps(tied)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return {
        "path": path,
        "compression": compression,
        "compressed_weights": encoded,
        "dense_weights": dense,
        "bytes": path.stat().st_size,
        "dense_bytes": sum(t.numel() * t.element_size() for t in state.values()),
    }


def _unpack(bits: torch.Tensor, cols: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=cols, bitorder="little").astype(bool))


def _decode(path: Path, weight: str, parts: dict[str, torch.Tensor], compression: str) -> torch.Tensor:
    shape = [int(v) for v in parts["shape"].reshape(-1).tolist()]
    rows = shape[0] if shape else 0
    cols = math.prod(shape[1:])
    bits, values = parts["bitmask"], parts["compressed"]
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (rows, math.ceil(cols / 8)):
        raise DataError(f"{path}: {_part(weight, 'bitmask')} has shape {list(bits.shape)} ({bits.dtype}), "
                        f"expected [{rows}, {math.ceil(cols / 8)}] uint8 for dense shape {shape}")
    keep = _unpack(bits, cols)
    if int(keep.sum()) != values.numel():
        raise DataError(f"{path}: {_part(weight, 'bitmask')} marks {int(keep.sum())} values but "
                        f"{_part(weight, 'compressed')} holds {values.numel()}")
    if compression == "sparse-24-bitmask" and tuple(values.shape) != (rows, cols // 2):
        raise DataError(
            f"{path}: {_part(weight, 'compressed')} has shape {list(values.shape)}, "
            f"expected [{rows}, {cols // 2}]"
        )
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[keep] = values.reshape(-1)
    return dense.reshape(shape)


def load_compressed(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The dense state dict of a file written by :func:`save_compressed` (exact, ``-0.0`` read as ``0.0``).

    Load it into a model of the same architecture with ``model.load_state_dict(state)`` (a compacted
    model: rebuild it first, e.g. with ``secateur.load``).

    Raises:
        ConfigError: the file does not exist. DataError: it is not a secateur compressed file, or a
            compressed weight is incomplete or inconsistent (the message names the file and the tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"compressed file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise DataError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != FORMAT_NAME or meta.get("compression") not in COMPRESSIONS:
        raise DataError(f"{path} is not a secateur compressed file (metadata format={meta.get('format')!r}, "
                        f"compression={meta.get('compression')!r}); a plain safetensors file loads with "
                        "safetensors.torch.load_file")
    compression = meta["compression"]
    try:
        names = json.loads(meta.get("compressed_weights", "[]"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: metadata compressed_weights is not JSON") from exc
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in names:
        keys = {p: _part(name, p) for p in _PARTS[compression]}
        missing = [k for k in keys.values() if k not in tensors]
        if missing:
            raise DataError(f"{path}: compressed weight {name} lacks {missing}")
        out[name] = _decode(path, name, {p: tensors[k] for p, k in keys.items()}, compression)
        used.update(keys.values())
    out.update({k: v for k, v in tensors.items() if k not in used})
    out.update(_tied_entries(path, meta.get("tied"), out))
    return out


def _tied_entries(path: Path, text: str | None, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{alias: the stored tensor}`` for the file's ``"tied"`` metadata (absent: none).

    Raises:
        DataError: the metadata is not a JSON object of names, an alias is stored too, or a target is not.
    """
    if text is None:
        return {}
    try:
        tied = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: metadata tied is not JSON ({exc})") from exc
    try:
        validate_tied(tied, str(path), "metadata tied")
        check_tied_file(tied, state, str(path), "metadata tied")
    except SerializationError as exc:  # the same checks as plan.json's "tied", reported as bad data
        raise DataError(str(exc)) from exc
    return {alias: state[target] for alias, target in tied.items()}
