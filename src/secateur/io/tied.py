"""Tied tensors (one storage under several names) written once: detection at save, checks at load.

A model whose ``lm_head.weight`` *is* ``transformer.wte.weight`` (the same ``nn.Parameter``) lists the
tensor under both names in its ``state_dict``. safetensors refuses tensors that share memory, and cloning
each one stores the largest tensor of a language model twice. :func:`tied_aliases` finds true aliases (same
storage, offset, shape, stride and dtype: *not* merely equal values) so the writers store each tensor once
and record ``{alias: stored name}``; :func:`check_tied_file` checks such a record against a file's tensor
names before anything is loaded. The same convention as Hugging Face's ``save_pretrained`` (tied weights
written once, re-tied by the rebuilt model).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from secateur.errors import SerializationError

__all__ = ["check_tied_file", "tied_aliases"]


def _storage_key(t: torch.Tensor) -> tuple[object, ...] | None:
    """What makes two tensors the same memory seen the same way; ``None`` for an empty tensor (no storage
    to share: two distinct empty tensors can report the same null pointer)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
    )


def tied_aliases(tensors: Mapping[str, torch.Tensor], skip_prefix: str | None = None) -> dict[str, str]:
    """``{alias: first name}`` for every tensor of ``tensors`` that is a true alias of an earlier-named one.

    Args:
        tensors: named tensors in their order (e.g. a ``state_dict``, whose tensors share storage with the
            parameters they detach from); not modified.
        skip_prefix: names starting with it (e.g. secateur's element-mask prefix) are never aliases nor
            targets.

    Returns ``{alias: name}`` where ``name`` is the first name, in ``tensors``' order, of the same storage,
    storage offset, shape, stride, dtype and device; ``name`` itself is never an alias (no chains). Tensors
    that merely hold equal values, views of another shape or offset, and empty tensors are not aliases.
    """
    first: dict[tuple[object, ...], str] = {}
    out: dict[str, str] = {}
    for name, t in tensors.items():
        if skip_prefix is not None and name.startswith(skip_prefix):
            continue
        key = _storage_key(t)
        if key is None:
            continue
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


def check_tied_file(
    tied: Mapping[str, str], stored: Mapping[str, object], source: str, field: str = "tied"
) -> None:
    """Check a recorded ``{alias: stored name}`` map (already checked as data) against a file's tensors.

    Args:
        tied: the aliases as the folder records them.
        stored: the names the weights file holds (e.g. ``{name: shape}`` from its header).
        source: the file recording ``tied`` (plan.json), named in messages with ``field``.

    Raises:
        SerializationError: an alias the file also stores (which value would win?) or an alias whose target
            the file does not hold, naming ``source`` and ``field[alias]``.
    """
    for alias, target in tied.items():
        if alias in stored:
            raise SerializationError(
                f"{source}: {field}[{alias!r}]: the weights file also stores {alias!r} "
                "(an alias is written once)"
            )
        if target not in stored:
            raise SerializationError(
                f"{source}: {field}[{alias!r}]: names {target!r}, which the weights file does not hold"
            )
