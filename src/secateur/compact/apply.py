"""Applying a plan (:mod:`secateur.compact.plan`): structured masks or physical compaction.

:func:`mask_model` zeroes, in place, what the plan removes (and makes the listed norms compute their
statistics over the kept channels), so the masked model computes what the compacted one will.
:func:`compact` slices every listed tensor, updates module attributes (channels, features, groups, heads)
and the Hugging Face config, all inside a :class:`~secateur.compact.transaction.Journal`: any exception,
``KeyboardInterrupt`` included, restores the model bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur._torch import scratch_view
from secateur.errors import CompactionError
from secateur.graph.rules_recurrent import GATES
from secateur.graph.tracer import walk_model

from .norms import remove_norm_masks, set_norm_masks
from .plan import HEAD_ATTRS, KV_HEAD_ATTRS, ModuleLookup, check_plan, hf_configs
from .transaction import Journal, restoring

__all__ = ["compact", "mask_model"]


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    d = dict(model.named_parameters(remove_duplicate=False))
    d.update(dict(model.named_buffers(remove_duplicate=False)))
    return d


@torch.no_grad()
def mask_model(model: nn.Module, plan: Mapping) -> nn.Module:
    """Zero, in place, every index that :func:`compact` would remove (structured masks on groups), and
    make the norms listed in ``plan["norms"]`` compute their statistics over the kept channels only (a
    forward hook, :mod:`secateur.compact.norms`; removed by :func:`compact`).

    The masked model computes what the compacted one will (checked by
    :func:`secateur.compact.verify.check_equivalence`).

    Raises:
        KeyError: the plan names a tensor the model does not have.
        CompactionError: a malformed plan (:func:`~secateur.compact.plan.check_plan`), or the plan names a
            norm the model does not have or of another width.
    """
    check_plan(plan)
    named = _named_tensors(model)
    for name, dims in plan["tensors"].items():
        t = named[name]
        for d, kept in dims.items():
            d = int(d)
            keep = np.zeros(t.shape[d], dtype=bool)
            keep[np.asarray(kept, dtype=np.int64)] = True
            gone = np.flatnonzero(~keep)
            if gone.size:  # writes zeros into the removed slices only (not mul_: inf * 0 would be nan)
                t.index_fill_(d, torch.from_numpy(gone).to(t.device), 0)
    set_norm_masks(model, plan.get("norms") or {})
    return model


def compact(model: nn.Module, plan: Mapping, check: Any = None) -> nn.Module:
    """Physically remove what ``plan`` drops: slice every listed parameter/buffer (tied tensors once),
    update layer attributes (in/out_channels, groups, in/out_features, num_features, normalized_shape,
    num_heads and the like) and the Hugging Face config. Returns ``model`` (changed in place). Mask-aware
    norm hooks (:func:`mask_model`, :class:`secateur.ChannelPruner`) are removed.

    Transactional (a :class:`Journal`): on *any* exception the model's tensors, attributes, hooks and
    config are restored bit-identical first. An ordinary ``Exception`` is then raised as CompactionError
    (chained to the cause; a CompactionError as it is); a ``KeyboardInterrupt``, ``SystemExit`` or
    ``GeneratorExit`` is re-raised unchanged. ``check(model)``, if given, runs inside the transaction after
    the changes (e.g. the equivalence oracle); if it raises, the changes are undone.

    Raises:
        CompactionError: a malformed plan (not a mapping of tensors, a tensor the model lacks, a tied
            tensor sliced two ways, an index out of range), a failed slice or a failed ``check``.
    """
    journal = Journal()
    try:
        with restoring(journal.rollback):
            _apply_plan(model, plan, journal)
            if check is not None:
                check(model)
    except Exception as e:
        if isinstance(e, CompactionError):
            raise
        raise CompactionError(f"compaction failed and was rolled back: {e!r}") from e
    return model


def _apply_plan(model: nn.Module, plan: Mapping, journal: Journal) -> None:
    """The changes of :func:`compact`, each journaled before it is made."""
    check_plan(plan)
    walk = walk_model(model)  # one walk of the module tree for tensors, modules and norm hooks
    remove_norm_masks(model, journal=journal.record, modules=[m for _, m in walk.unique])
    named = {**walk.params, **walk.buffers}
    paths_of: dict[int, list[str]] = {}  # every name of a tensor (tied weights have several)
    for n, u in named.items():
        paths_of.setdefault(id(u), []).append(n)
    modules = ModuleLookup(model, walk.by_path)
    done: dict[int, Mapping] = {}
    touched_modules: dict[str, nn.Module] = {}
    scratch: dict = {}  # one reused buffer for the intermediate of two-dim gathers
    for name, dims in plan["tensors"].items():
        if name not in named:
            raise CompactionError(f"plan names tensor {name!r}, which the model does not have")
        t = named[name]
        if id(t) in done:
            if _slicing_key(done[id(t)]) != _slicing_key(dims):
                raise CompactionError(f"tied tensor {name} is sliced two different ways")
            continue
        done[id(t)] = dims
        journal.set_data(t, _sliced(t.data, dims, scratch))
        for other in paths_of[id(t)]:  # every module holding the tensor (a tied LM head too)
            path = other.rpartition(".")[0]
            touched_modules[path] = modules[path]
    for mod in touched_modules.values():
        _update_module(mod, journal)
    for path, spec in (plan.get("norms") or {}).items():  # norms without weights have no sliced tensor
        mod = modules[path]
        _update_norm_width(mod, len(spec["kept"]), journal)
    for path, d in plan.get("attributes", {}).items():
        mod = modules[path]
        for a, (_old, new) in d.items():
            journal.set_attr(mod, a, _like_stored(getattr(mod, a, None), new))
        if any(a in HEAD_ATTRS for a in d) and hasattr(mod, "num_key_value_groups"):
            h = next(d[a][1] for a in d if a in HEAD_ATTRS)
            kv = next((d[a][1] for a in d if a in KV_HEAD_ATTRS), None)
            if kv:
                journal.set_attr(mod, "num_key_value_groups", h // kv)
    cfgs = hf_configs(model)
    for ck, d in plan.get("config", {}).items():
        cfg = cfgs.get(ck)
        if cfg is None:
            continue
        for k, (_old, new) in d.items():
            if not k.startswith("_inconsistent_"):
                journal.set_attr(cfg, k, new)


def _like_stored(current: Any, new: Any) -> Any:
    """A plan's new value in the form of the attribute it replaces: JSON turns tuples into lists, so a
    stored tuple (a split-size tuple) gets a tuple back."""
    if isinstance(current, tuple) and isinstance(new, list):
        return tuple(new)
    return new


def _slice(t: torch.Tensor, dim: int, kept: np.ndarray) -> torch.Tensor:
    """Keep the ``kept`` indices (int64 array) of ``t`` along ``dim``: a view (``narrow``, no copy) when they
    are one contiguous range (``t`` itself when that is the whole dim), else a gathered copy."""
    if _is_range(kept):
        n = kept.size
        return t if n == t.shape[dim] and kept[0] == 0 else t.narrow(dim, int(kept[0]), n)
    return t.index_select(dim, torch.from_numpy(kept).to(t.device))


def _sliced(t: torch.Tensor, dims: Mapping, scratch: dict | None = None) -> torch.Tensor:
    """``t`` with only the kept indices of each listed dim (``{dim: kept indices}``), as a fresh contiguous
    tensor: what ``index_select`` dim after dim would give, with fewer copies. Contiguous ranges are narrowed
    first (views), then the other dims gathered in increasing dim order (each gather copies only what is
    left, into a new contiguous tensor), and ``t`` is copied once at the end when no gather copied it.

    ``scratch`` (a dict kept across the tensors of one compaction): the first of two or more gathers writes
    into one reused buffer instead of a fresh tensor (its result is read once, by the next gather; a fresh
    large tensor costs its page faults). The values are the same; the result is always a fresh tensor."""
    items = []
    for d, k in dims.items():
        kept = np.asarray(k, dtype=np.int64)
        items.append((not _is_range(kept), int(d), kept))
    items.sort(key=lambda item: item[:2])  # views first, then gathers by dim
    out = t
    first_gather = True
    for i, (gather, d, kept) in enumerate(items):
        if gather and first_gather and scratch is not None and i < len(items) - 1:
            out = _gather_into(out, d, kept, scratch)
        else:
            out = _slice(out, d, kept)
        first_gather = first_gather and not gather
    if not items or not items[-1][0]:  # no gather: only views of t so far
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def _gather_into(t: torch.Tensor, dim: int, kept: np.ndarray, scratch: dict) -> torch.Tensor:
    """``t.index_select(dim, kept)`` written into ``scratch``'s reused buffer (a view of it, contiguous)."""
    shape = list(t.shape)
    shape[dim] = kept.size
    out = scratch_view(scratch, shape, t)
    return torch.index_select(t, dim, torch.from_numpy(kept).to(t.device), out=out)


def _is_range(kept: np.ndarray) -> bool:
    """``kept`` (sorted int64) is one run of consecutive indices (a view can keep it)."""
    n = kept.size
    return bool(n and kept[0] >= 0 and kept[-1] - kept[0] == n - 1 and (n < 3 or (np.diff(kept) == 1).all()))


def _slicing_key(dims: Mapping) -> tuple:
    return tuple(sorted((int(d), tuple(k)) for d, k in dims.items()))


class _Changes:
    """Journal only the attribute writes that change a value (a write of the value already there is a
    no-op, so nothing needs undoing)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.old_shape = journal.old_shape

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        if name not in obj.__dict__ or obj.__dict__[name] != value:
            self.journal.set_attr(obj, name, value)


def _update_module(mod: nn.Module, journal: Journal) -> None:
    """Refresh the size attributes of standard layers from their (new) parameter shapes, and empty the
    tensor caches of a module whose tensors were sliced (a ``dict`` attribute whose name contains "cache"
    and whose values are tensors, such as timm's ``attention_bias_cache``: computed from the old weights,
    recomputed on the next forward)."""
    undo = _Changes(journal)
    for name, v in list(vars(mod).items()):  # tensors cached from the old weights (timm's attention biases)
        if type(v) is dict and v and "cache" in name.lower() and all(torch.is_tensor(t) for t in v.values()):
            journal.set_attr(mod, name, {})
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.modules.conv._ConvNd):
        old_shape = undo.old_shape.get(id(mod.weight))
        g = mod.groups
        if mod.transposed:  # weight (in, out/g, k)
            if old_shape is not None and g > 1:
                g = g * w.shape[0] // old_shape[0]
            undo.set_attr(mod, "groups", g)
            undo.set_attr(mod, "in_channels", w.shape[0])
            undo.set_attr(mod, "out_channels", w.shape[1] * g)
        else:
            if old_shape is not None and g > 1:
                g = g * w.shape[0] // old_shape[0]
            undo.set_attr(mod, "groups", g)
            undo.set_attr(mod, "out_channels", w.shape[0])
            undo.set_attr(mod, "in_channels", w.shape[1] * g)
    elif isinstance(mod, nn.Linear):
        undo.set_attr(mod, "out_features", w.shape[0])
        undo.set_attr(mod, "in_features", w.shape[1])
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        n = (w if w is not None else mod.running_mean).shape[0]
        undo.set_attr(mod, "num_features", n)
    elif isinstance(mod, nn.GroupNorm):
        if w is not None:  # one group (pruned through the norm, kept channels normalised together) stays one
            g = mod.num_groups if mod.num_groups == 1 else mod.num_groups * w.shape[0] // mod.num_channels
            undo.set_attr(mod, "num_groups", g)
            undo.set_attr(mod, "num_channels", w.shape[0])
    elif isinstance(mod, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        if w is not None:
            undo.set_attr(mod, "normalized_shape", tuple(w.shape))
    elif isinstance(mod, nn.Embedding):
        undo.set_attr(mod, "num_embeddings", w.shape[0])
        undo.set_attr(mod, "embedding_dim", w.shape[1])
    elif type(mod).__name__ == "Conv1D" and w is not None and w.dim() == 2:  # Hugging Face GPT-2
        undo.set_attr(mod, "nf", w.shape[1])
        if hasattr(mod, "nx"):
            undo.set_attr(mod, "nx", w.shape[0])
    elif isinstance(mod, (nn.RNNBase, nn.RNNCellBase)):
        _update_recurrent(mod, undo)


def _update_recurrent(mod: nn.Module, undo: _Changes) -> None:
    """``input_size``, ``hidden_size`` (and an LSTM's ``proj_size``) of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``
    and their cells from the sliced weights: ``weight_ih`` is ``(gates * hidden, input)``, ``weight_hr``
    ``(proj, hidden)``. The module's flat weight list holds the same parameters (sliced in place)."""
    if isinstance(mod, nn.RNNCellBase):
        undo.set_attr(mod, "input_size", mod.weight_ih.shape[1])
        undo.set_attr(mod, "hidden_size", mod.weight_hh.shape[1])
        return
    w_ih = mod.weight_ih_l0
    undo.set_attr(mod, "input_size", w_ih.shape[1])
    undo.set_attr(mod, "hidden_size", w_ih.shape[0] // GATES[mod.mode])
    if getattr(mod, "proj_size", 0):
        undo.set_attr(mod, "proj_size", mod.weight_hr_l0.shape[0])


def _update_norm_width(mod: nn.Module, k: int, undo: Journal) -> None:
    """The width attribute of a norm module whose normalised dim now has ``k`` channels."""
    if isinstance(mod, nn.GroupNorm):
        undo.set_attr(mod, "num_channels", k)
    else:
        shape = getattr(mod, "normalized_shape", None)
        if isinstance(shape, tuple) and len(shape) == 1 and shape[0] != k:
            undo.set_attr(mod, "normalized_shape", (k,))
