"""Structured masks, physical compaction and the equivalence oracle.

Flow: choose units per group -> :func:`make_plan` (plain JSON data: kept indices per tensor and dim, module
attribute and config changes) -> :func:`mask_model` (zeroes what will go: the masked model computes what the
compacted one will) or :func:`compact` (slices every tensor, updates module attributes and the Hugging Face
config). :func:`check_equivalence` is the oracle, used inside compaction and in the tests.

Transactions: every change :func:`compact` makes is first written to a :class:`Journal`, so any exception
*or* ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``) restores the model
bit-identical; :func:`restoring` is the same guard for other code (run a restore function on any
``BaseException``, with Ctrl-C held meanwhile by :func:`interrupts_deferred`, then re-raise unchanged).

The oracle's rule, per floating output tensor pair ``(a, b)`` in float64: both finite (a NaN or Inf is never
equal) and ``max|a - b| <= atol + rtol * max(max|a|, max|b|)``, defaults :data:`ATOL` 0 and :data:`RTOL`
1e-6; inputs must be finite (:func:`require_finite_inputs`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.errors import CompactionError, ConfigError, IncompatibleGroupError
from secateur.graph.groups import DependencyGraph, Group
from secateur.graph.tracer import call_model, iter_tensors

from .norms import norm_plan, remove_norm_masks, set_norm_masks

PLAN_VERSION = 1

HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "attention_heads", "num_attn_heads")
KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "num_key_value_heads_per_partition")
WIDTH_ATTRS = (
    "all_head_size",
    "attn_dim",
    "inner_dim",
    "split_size",
    "inner_size",
    "hidden_size_per_partition",
    "projection_size",
    "dim_head_total",
)
CONFIG_HEAD_KEYS = (
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
)
CONFIG_KV_KEYS = ("num_key_value_heads", "n_kv_heads", "multi_query_group_num")
CONFIG_FF_KEYS = (
    "intermediate_size",
    "n_inner",
    "d_ff",
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "hidden_dim",
)
# the residual width of a transformer; aliases a config maps onto another key (GPT-2's hidden_size ->
# n_embd) are skipped when written
CONFIG_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")


def _attr(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)``, fast when a module lacks the attribute: ``nn.Module.__getattr__``
    raises (slowly) for every missing name, and most names looked for (num_heads, config...) are missing."""
    d = getattr(obj, "__dict__", None)
    if d is not None and name in d:
        return d[name]
    cls = type(obj)
    if (
        isinstance(obj, nn.Module)
        and cls.__getattr__ is nn.Module.__getattr__
        and cls.__getattribute__ is object.__getattribute__
        and not hasattr(cls, name)
        and name not in d.get("_parameters", ())
        and name not in d.get("_buffers", ())
        and name not in d.get("_modules", ())
    ):
        return None
    return getattr(obj, name, None)


def _owner(model: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    path, _, attr = qualname.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def make_plan(graph: DependencyGraph, removed: Mapping[int, Any]) -> dict:
    """The pruning plan: JSON-serialisable dict.

    Args:
        graph: the traced graph.
        removed: ``{group index in graph.groups: unit indices to remove}``.

    Returns ``{"version", "tensors": {qualname: {dim(str): kept indices}}, "groups": [...],
    "attributes": {module path: {attr: [old, new]}}, "config": {config path: {key: [old, new]}}}``, plus
    ``"norms": {module path: {"dim", "size", "kept"}}`` when norm modules lose channels of the dim they
    normalise (graphs built with ``prune_normalized=True``; :func:`secateur.compact.norms.norm_plan`).
    Raises CompactionError if a removal empties a member or touches an unprunable unit.
    """
    model = graph.model
    tensors: dict[str, dict[str, list[int]]] = {}
    groups_out = []
    kept_units: dict[int, np.ndarray] = {}
    gone: dict[int, np.ndarray] = {}
    for gi, units in removed.items():
        g = graph.groups[gi]
        if isinstance(units, np.ndarray):
            rm = units.astype(np.int64, copy=False).ravel()
            if rm.size > 1 and not (rm[1:] > rm[:-1]).all():  # already sorted and unique: as np.unique gives
                rm = np.unique(rm)
        else:
            rm = np.unique(np.asarray(list(units), dtype=np.int64))
        if rm.size == 0:
            continue
        if rm[0] < 0 or rm[-1] >= g.n_units:
            raise CompactionError(f"group {g.name}: unit index out of range 0..{g.n_units - 1}")
        if not g.prunable[rm].all():
            raise CompactionError(
                f"group {g.name}: units {rm[~g.prunable[rm]].tolist()} are not prunable "
                f"({'; '.join(g.reasons) or 'frozen'})"
            )
        keep_mask = np.ones(g.n_units, dtype=bool)
        keep_mask[rm] = False
        keep = np.flatnonzero(keep_mask)
        kept_units[gi] = keep
        gone[gi] = rm
        groups_out.append({"group": g.name, "n_units": g.n_units, "removed": rm.tolist()})
        keep_list = None
        for m in g.members:
            if _is_identity(m.unit_of, g.n_units):  # index i is unit i: the kept indices are the kept units
                if keep_list is None:
                    keep_list = keep.tolist()
                kept = keep_list.copy()  # each member its own list (plans are data a caller may edit)
            else:
                kept = np.nonzero(keep_mask[m.unit_of])[0].tolist()  # indices of this dim whose unit stays
            if not kept:
                raise CompactionError(
                    f"group {g.name}: removing units {rm.tolist()} empties {m.name} dim {m.dim}"
                )
            tensors.setdefault(m.name, {})[str(m.dim)] = kept
    index = _class_index(graph)
    attributes, events = _head_attributes(graph, kept_units, index)
    norms = norm_plan(graph, gone)
    plan = {
        "version": PLAN_VERSION,
        "tensors": tensors,
        "groups": groups_out,
        "attributes": attributes,
        "config": {},
    }
    if norms:
        plan["norms"] = norms
    plan["config"] = _config_changes(model, graph, kept_units, attributes, events, index)
    return plan


def _is_identity(unit_of: np.ndarray, n: int) -> bool:
    """``unit_of == arange(n)``: one index per unit, in order (most channel members)."""
    return unit_of.size == n and (n == 0 or (unit_of[0] == 0 and unit_of[-1] == n - 1)) and (
        n < 3 or bool((unit_of[1:] > unit_of[:-1]).all())
    )


def _class_index(graph: DependencyGraph) -> tuple[np.ndarray, np.ndarray]:
    """``(group_of, unit_of)``: for every atom class label, the index of the group holding it and its unit
    there (``-1`` where no listed group holds it). Every class belongs to one group; if several listed it,
    the later one would win (as a dict filled in group order would)."""
    groups = graph.groups
    if not groups:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    sizes = np.array([g.n_units for g in groups], dtype=np.int64)
    cls = np.concatenate([np.asarray(g.classes, dtype=np.int64) for g in groups])
    n = int(cls.max()) + 1 if cls.size else 0
    group_of = np.full(n, -1, dtype=np.int64)
    unit_of = np.full(n, -1, dtype=np.int64)
    group_of[cls] = np.repeat(np.arange(len(groups), dtype=np.int64), sizes)
    unit_of[cls] = np.arange(cls.size, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return group_of, unit_of


def _lookup_classes(
    index: tuple[np.ndarray, np.ndarray], classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Group and unit of each class in ``classes`` (``-1`` for classes no group holds)."""
    group_of, unit_of = index
    c = np.asarray(classes, dtype=np.int64)
    ok = (c >= 0) & (c < group_of.size)
    if not ok.any():
        return np.full(c.shape, -1, dtype=np.int64), np.full(c.shape, -1, dtype=np.int64)
    cc = np.where(ok, c, 0)
    return np.where(ok, group_of[cc], -1), np.where(ok, unit_of[cc], -1)


def _head_attributes(
    graph: DependencyGraph, kept_units: dict[int, np.ndarray], index: tuple | None = None
) -> tuple[dict, list]:
    """num_heads-like attributes of the modules where a channel dim was split into heads, and the
    changed head splits as ``(innermost module path, old count, new count)``."""
    if index is None:
        index = _class_index(graph)
    attrs: dict[str, dict[str, list]] = {}
    events: list[tuple[str, int, int]] = []
    model = graph.model
    for ev in graph.splits:
        if ev.kind != "heads" or ev.classes is None or len(ev.classes) == 0:
            continue
        gids, units = _lookup_classes(index, ev.classes)
        if (gids < 0).any():
            continue
        gi = int(gids[0])
        if gi in kept_units:  # units of this split kept in the group of its first unit
            keep = np.zeros(graph.groups[gi].n_units, dtype=bool)
            keep[kept_units[gi]] = True
            n_new = int(keep[units[units < keep.size]].sum())
        else:
            n_new = ev.n_outer
        if n_new == ev.n_outer:  # unchanged layers vote for the old count (a config holds one value)
            events.append((ev.module_paths[0], ev.n_outer, n_new))
            continue
        events.append((ev.module_paths[0], ev.n_outer, n_new))
        for path in ev.module_paths[:2]:
            mod = model.get_submodule(path) if path else model
            hit = False
            for names in (HEAD_ATTRS, KV_HEAD_ATTRS):
                for a in names:
                    v = _attr(mod, a)
                    if isinstance(v, int) and not isinstance(v, bool) and v == ev.n_outer:
                        attrs.setdefault(path, {})[a] = [v, n_new]
                        hit = True
            if hit:
                for a in WIDTH_ATTRS:
                    v = _attr(mod, a)
                    if isinstance(v, int) and not isinstance(v, bool) and v == ev.n_outer * ev.inner:
                        attrs.setdefault(path, {})[a] = [v, n_new * ev.inner]
                hd = _attr(mod, "head_dim")
                if isinstance(hd, int) and hd != ev.inner:
                    raise IncompatibleGroupError(
                        f"module {path} ({type(mod).__name__}): its head_dim {hd} differs from the head size "
                        f"{ev.inner} the trace saw, so its heads cannot be removed consistently; protect it"
                    )
                break
    return attrs, events


def _configs(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    out: dict[str, Any] = {}
    if cfg is None or not hasattr(cfg, "to_dict"):
        return out
    out[""] = cfg
    for k in ("text_config", "vision_config", "audio_config", "encoder", "decoder"):
        sub = getattr(cfg, k, None)
        if sub is not None and hasattr(sub, "to_dict"):
            out[k] = sub
    return out


_LAYER_INDEX = re.compile(r"\.\d+\.")


def _layer_free_key(g: Group) -> tuple[str, ...]:
    """A group's members with layer indices blanked: the same group of another layer has the same key."""
    return tuple(sorted(_LAYER_INDEX.sub(".#.", m.name) + f":{m.dim}" for m in g.members))


def _config_changes(
    model: nn.Module,
    graph: DependencyGraph,
    kept_units: dict[int, np.ndarray],
    attributes: dict,
    events: list,
    index: tuple | None = None,
) -> dict:
    """Hugging Face config keys to update, only where every layer agrees on the new value."""
    cfgs = _configs(model)
    if not cfgs:
        return {}
    changes: dict[str, dict[str, list]] = {}
    # which config does a module path use: the closest ancestor with a .config attribute
    cfg_ids = {id(c): k for k, c in cfgs.items()}

    modules = _ModuleLookup(model)
    memo: dict[str, str] = {}

    def cfg_key_of(path: str) -> str:
        key = memo.get(path)
        if key is None:
            c = _attr(modules[path], "config")
            if c is not None and id(c) in cfg_ids:
                key = cfg_ids[id(c)]
            else:
                key = cfg_key_of(path.rpartition(".")[0]) if path else ""
            memo[path] = key
        return key

    values: dict[tuple[str, str], Any] = {}  # config values read once (HF config getattr is slow)

    def value(ck: str, k: str) -> Any:
        if (ck, k) not in values:
            values[(ck, k)] = getattr(cfgs[ck], k, None)
        return values[(ck, k)]

    layer_free: dict[int, tuple[str, ...]] = {}

    def layer_free_key(gi: int) -> tuple[str, ...]:
        if gi not in layer_free:
            layer_free[gi] = _layer_free_key(graph.groups[gi])
        return layer_free[gi]

    proposals: dict[tuple[str, str], set] = {}
    norm_groups = _norm_groups(graph, index)
    for gi, g in enumerate(graph.groups):  # the residual width: a group normalised by norm modules
        if gi not in norm_groups:  # those left whole (frozen ones too) vote for the old width
            continue
        ck = cfg_key_of(g.members[0].module)
        cfg = cfgs[ck]
        aliases = getattr(cfg, "attribute_map", {}) or {}
        for k in CONFIG_HIDDEN_KEYS:
            if k not in aliases and value(ck, k) == g.n_units:
                new = int(kept_units[gi].size) if gi in kept_units else g.n_units
                proposals.setdefault((ck, k), set()).add(new)
    for path, old, new in events:
        ck = cfg_key_of(path)
        for k in CONFIG_HEAD_KEYS + CONFIG_KV_KEYS:
            if value(ck, k) == old:
                proposals.setdefault((ck, k), set()).add(new)
    pruned_kinds = set()
    for gi, keep in kept_units.items():
        g = graph.groups[gi]
        if gi in norm_groups:
            continue
        if any(True for p in attributes for m in g.members if m.module.startswith(p) and p):
            continue
        pruned_kinds.add(layer_free_key(gi))
        ck = cfg_key_of(g.members[0].module)
        for k in CONFIG_FF_KEYS:
            if value(ck, k) == g.n_units:
                proposals.setdefault((ck, k), set()).add(int(keep.size))
    for gi, g in enumerate(graph.groups):  # the same group in layers left alone keeps the old width
        if gi in kept_units or gi in norm_groups or layer_free_key(gi) not in pruned_kinds:
            continue
        ck = cfg_key_of(g.members[0].module)
        for k in CONFIG_FF_KEYS:
            if value(ck, k) == g.n_units:
                proposals.setdefault((ck, k), set()).add(g.n_units)
    for (ck, k), vals in proposals.items():
        cfg = cfgs[ck]
        old = getattr(cfg, k)
        if len(vals) == 1:
            changes.setdefault(ck, {})[k] = [old, vals.pop()]
        else:
            changes.setdefault(ck, {})["_inconsistent_" + k] = [old, sorted(vals)]
    for ck, d in changes.items():
        cfg = cfgs[ck]
        hd = getattr(cfg, "head_dim", None)
        hidden = getattr(cfg, "hidden_size", None)
        if any(k in d for k in CONFIG_HEAD_KEYS):
            heads_key = next(k for k in CONFIG_HEAD_KEYS if k in d)
            if hd is None and hidden is not None:
                d["head_dim"] = [None, hidden // d[heads_key][0]]
        elif any(k in d for k in CONFIG_HIDDEN_KEYS) and hd is None and isinstance(hidden, int):
            # the head width is no longer hidden_size // heads: record it (models reading head_dim use it)
            counts = [getattr(cfg, k, None) for k in CONFIG_HEAD_KEYS]
            heads = next((h for h in counts if isinstance(h, int) and not isinstance(h, bool)), None)
            if heads:
                d["head_dim"] = [None, hidden // heads]
    return changes


def _norm_groups(graph: DependencyGraph, index: tuple | None = None) -> set[int]:
    """Indices of the groups holding the normalised channels of norm modules (graphs built with
    ``prune_normalized=True``): residual widths, whose config keys are :data:`CONFIG_HIDDEN_KEYS`."""
    wanted = [ev.classes for ev in graph.splits if ev.kind == "norm" and ev.classes is not None]
    if not wanted:
        return set()
    gids, _ = _lookup_classes(_class_index(graph) if index is None else index, np.concatenate(wanted))
    gids = gids[gids >= 0]
    return set(np.flatnonzero(np.bincount(gids)).tolist()) if gids.size else set()


class _ModuleLookup:
    """``lookup[path]``: the submodule at ``path`` (``""``: the model), resolved one name at a time through
    the parents' ``_modules`` and remembered, instead of a ``get_submodule`` walk per query (paths that are
    not plain submodule chains fall back to ``get_submodule``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.by_path: dict[str, nn.Module] = {"": model}

    def __getitem__(self, path: str) -> nn.Module:
        mod = self.by_path.get(path)
        if mod is None:
            parent, _, name = path.rpartition(".")
            try:
                mod = self[parent]._modules.get(name) if name else None
            except AttributeError:
                mod = None
            if mod is None:  # not a chain of registered submodules: get_submodule resolves it or raises
                mod = self.model.get_submodule(path)
            self.by_path[path] = mod
        return mod


# ------------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------------
def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    d = dict(model.named_parameters(remove_duplicate=False))
    d.update(dict(model.named_buffers(remove_duplicate=False)))
    return d


@torch.no_grad()
def mask_model(model: nn.Module, plan: Mapping) -> nn.Module:
    """Zero, in place, every index that :func:`compact` would remove (structured masks on groups), and
    make the norms listed in ``plan["norms"]`` compute their statistics over the kept channels only (a
    forward hook, :mod:`secateur.compact.norms`; removed by :func:`compact`).

    The masked model computes what the compacted one will (checked by :func:`check_equivalence`).

    Raises:
        KeyError: the plan names a tensor the model does not have.
        CompactionError: the plan names a norm the model does not have or of another width.
    """
    named = _named_tensors(model)
    for name, dims in plan["tensors"].items():
        t = named[name]
        for d, kept in dims.items():
            d = int(d)
            mask = torch.zeros(t.shape[d], dtype=torch.bool)
            mask[torch.as_tensor(kept, dtype=torch.long)] = True
            shape = [1] * t.dim()
            shape[d] = -1
            t.masked_fill_(~mask.view(shape).to(t.device), 0)  # not mul_: inf * 0 would be nan
    set_norm_masks(model, plan.get("norms") or {})
    return model


# ------------------------------------------------------------------------------------------------------
# compaction
# ------------------------------------------------------------------------------------------------------
def _slice(t: torch.Tensor, dim: int, kept: np.ndarray) -> torch.Tensor:
    """Keep the ``kept`` indices (int64 array) of ``t`` along ``dim``: a view (``narrow``, no copy) when they
    are one contiguous range (``t`` itself when that is the whole dim), else a gathered copy."""
    if _is_range(kept):
        n = kept.size
        return t if n == t.shape[dim] and kept[0] == 0 else t.narrow(dim, int(kept[0]), n)
    return t.index_select(dim, torch.from_numpy(kept).to(t.device))


def _sliced(t: torch.Tensor, dims: Mapping) -> torch.Tensor:
    """``t`` with only the kept indices of each listed dim (``{dim: kept indices}``), as a fresh contiguous
    tensor: what ``index_select`` dim after dim would give, with fewer copies. Contiguous ranges are narrowed
    first (views), then the other dims gathered (each gather copies only what is left), and ``t`` is copied
    once at the end when no gather copied it."""
    items = [(int(d), np.asarray(k, dtype=np.int64)) for d, k in dims.items()]
    items.sort(key=lambda dk: (not _is_range(dk[1]), dk[0]))  # views first, then gathers by dim
    out = t
    copied = False
    for d, kept in items:
        new = _slice(out, d, kept)
        copied = copied or (new is not out and not _is_view_of(new, out))
        out = new
    if not copied:
        return out.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def _is_range(kept: np.ndarray) -> bool:
    n = kept.size
    return bool(n and kept[0] >= 0 and kept[-1] - kept[0] == n - 1 and (n < 3 or (np.diff(kept) == 1).all()))


def _is_view_of(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _slicing_key(dims: Mapping) -> tuple:
    return tuple(sorted((int(d), tuple(k)) for d, k in dims.items()))


class Journal:
    """The undo log of one transaction: every change is recorded *before* it is made, so that
    :meth:`rollback` restores the state exactly whichever instruction an exception (or a
    ``KeyboardInterrupt``) interrupts. Restoring a change that had not happened yet is harmless: each
    entry puts back the value read before the change.

    Entries: a tensor's ``.data`` (:meth:`set_data`; the old tensor itself is kept, so the restore is
    bit-identical and costs no copy), an attribute (:meth:`set_attr`; module sizes, config keys) or any
    change with its own undo function (:meth:`record`).
    """

    def __init__(self) -> None:
        self.steps: list = []
        self.old_shape: dict[int, tuple[int, ...]] = {}

    def set_data(self, t: torch.Tensor, new: torch.Tensor) -> None:
        """``t.data = new``, journaled."""
        self.old_shape.setdefault(id(t), tuple(t.shape))
        self.steps.append(("data", t, t.data))
        t.data = new

    def record(self, restore: Callable[[], None]) -> None:
        """Journal an arbitrary change: ``restore()`` undoes it (and must be harmless if it did not
        happen)."""
        self.steps.append(("call", restore))

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, journaled (the instance attribute, or its absence, is restored)."""
        d = getattr(obj, "__dict__", None)
        had = d is not None and name in d
        self.steps.append(("attr", obj, name, getattr(obj, name, None), had))
        setattr(obj, name, value)

    def rollback(self) -> None:
        """Undo every journaled change, newest first; a SIGINT arriving meanwhile is held until the end
        (:func:`interrupts_deferred`). The journal is empty afterwards."""
        with interrupts_deferred():
            for step in reversed(self.steps):
                if step[0] == "data":
                    step[1].data = step[2]
                elif step[0] == "call":
                    step[1]()
                else:
                    _restore_attr(*step[1:])
            self.steps.clear()


def _restore_attr(obj: Any, name: str, old: Any, had: bool) -> None:
    d = getattr(obj, "__dict__", None)
    if had:
        setattr(obj, name, old)
    elif d is not None and name in d:  # an instance attribute the transaction added: remove it
        try:
            delattr(obj, name)
        except AttributeError:
            setattr(obj, name, old)
    elif getattr(obj, name, None) is not old:  # a property or slot: set the old value back through it
        setattr(obj, name, old)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) for the duration of the block, then deliver it: a restore that must run to
    completion is not cut in half by a second Ctrl-C. After the block the previous handler is put back
    and, if a SIGINT arrived meanwhile, called (by default it raises ``KeyboardInterrupt``). Outside the
    main thread, or when the handler was not installed from Python, signals cannot be held and the block
    simply runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[Any] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:
        yield
        return
    try:
        signal.signal(signal.SIGINT, lambda _sig, frame: pending.append(frame))
    except (ValueError, OSError):  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(signal.SIGINT, pending[0])


@contextlib.contextmanager
def restoring(restore: Callable[[], None]) -> Iterator[None]:
    """Run the block as a transaction: on *any* ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``,
    ``GeneratorExit`` included) call ``restore()`` with SIGINT held (:func:`interrupts_deferred`), then
    re-raise the exception unchanged. ``restore`` must bring the state back to what it was before the
    block, whichever instruction was interrupted."""
    try:
        yield
    except BaseException:
        with interrupts_deferred():
            restore()
        raise


def _update_module(mod: nn.Module, undo: Journal) -> None:
    """Refresh the size attributes of standard layers from their (new) parameter shapes."""
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


def _update_norm_width(mod: nn.Module, k: int, undo: Journal) -> None:
    """The width attribute of a norm module whose normalised dim now has ``k`` channels."""
    if isinstance(mod, nn.GroupNorm):
        undo.set_attr(mod, "num_channels", k)
    else:
        shape = getattr(mod, "normalized_shape", None)
        if isinstance(shape, tuple) and len(shape) == 1 and shape[0] != k:
            undo.set_attr(mod, "normalized_shape", (k,))


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
    if not isinstance(plan, Mapping) or not isinstance(plan.get("tensors"), Mapping):
        raise CompactionError(f"a plan is a mapping with a 'tensors' mapping, got {type(plan).__name__}")
    remove_norm_masks(model, journal=journal.record)  # mask-aware norm hooks from mask_model / ChannelPruner
    named = _named_tensors(model)
    paths_of: dict[int, list[str]] = {}  # every name of a tensor (tied weights have several)
    for n, u in named.items():
        paths_of.setdefault(id(u), []).append(n)
    modules = _ModuleLookup(model)
    done: dict[int, Mapping] = {}
    touched_modules: dict[str, nn.Module] = {}
    for name, dims in plan["tensors"].items():
        if name not in named:
            raise CompactionError(f"plan names tensor {name!r}, which the model does not have")
        t = named[name]
        if id(t) in done:
            if _slicing_key(done[id(t)]) != _slicing_key(dims):
                raise CompactionError(f"tied tensor {name} is sliced two different ways")
            continue
        done[id(t)] = dims
        journal.set_data(t, _sliced(t.data, dims))
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
            journal.set_attr(mod, a, new)
        if any(a in HEAD_ATTRS for a in d) and hasattr(mod, "num_key_value_groups"):
            h = next(d[a][1] for a in d if a in HEAD_ATTRS)
            kv = next((d[a][1] for a in d if a in KV_HEAD_ATTRS), None)
            if kv:
                journal.set_attr(mod, "num_key_value_groups", h // kv)
    cfgs = _configs(model)
    for ck, d in plan.get("config", {}).items():
        cfg = cfgs.get(ck)
        if cfg is None:
            continue
        for k, (_old, new) in d.items():
            if not k.startswith("_inconsistent_"):
                journal.set_attr(cfg, k, new)


# ------------------------------------------------------------------------------------------------------
# oracle
# ------------------------------------------------------------------------------------------------------
def _to_double(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_to_double(o) for o in obj)
    if isinstance(obj, list):
        return [_to_double(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_double(v) for k, v in obj.items()}
    return obj


#: Default tolerances of the oracle (:func:`check_equivalence`): per output tensor, in float64,
#: ``max|a - b| <= ATOL + RTOL * max(max|a|, max|b|)``.
RTOL = 1e-6
ATOL = 0.0


@dataclass(frozen=True)
class OutputDiff:
    """How one floating output tensor of two models differs (float64 values).

    Attributes:
        index: position of the tensor among the floating outputs (:func:`iter_tensors` order).
        shape: its shape.
        max_abs: ``max |a - b|`` (0.0 for an empty tensor; NaN when either holds a non-finite value).
        scale: ``max(max |a|, max |b|)`` over the finite values (the magnitude the tolerance is relative to).
        nonfinite: ``(in a, in b)``: ``"NaN"``, ``"Inf"`` or ``None`` for each model's tensor.
    """

    index: int
    shape: tuple[int, ...]
    max_abs: float
    scale: float
    nonfinite: tuple[str | None, str | None] = (None, None)

    @property
    def finite(self) -> bool:
        """Both tensors hold finite values only."""
        return self.nonfinite == (None, None)

    def within(self, rtol: float = RTOL, atol: float = ATOL) -> bool:
        """The oracle's rule: finite on both sides and ``max_abs <= atol + rtol * scale``."""
        return self.finite and self.max_abs <= atol + rtol * self.scale


def _nonfinite(t: torch.Tensor) -> str | None:
    if t.numel() == 0 or bool(torch.isfinite(t).all()):
        return None
    return "NaN" if bool(torch.isnan(t).any()) else "Inf"


def _float_outputs(model: nn.Module, x: Any) -> list[torch.Tensor]:
    return [t for t in iter_tensors(call_model(model, x)) if t.is_floating_point()]


@torch.no_grad()
def output_diffs(
    a: nn.Module, b: nn.Module, example_inputs: Any, dtype: torch.dtype = torch.float64
) -> list[OutputDiff] | str:
    """Compare the floating output tensors of ``a`` and ``b`` on ``example_inputs``, both run in ``dtype``
    (deep copies: the models are not touched; floating inputs are cast to float64 when ``dtype`` is).

    Returns one :class:`OutputDiff` per output tensor, or a string saying why the outputs cannot be
    compared (a different number of floating outputs, or output ``i`` of another shape).
    """
    ca, cb = copy.deepcopy(a).to(dtype), copy.deepcopy(b).to(dtype)
    x = _to_double(example_inputs) if dtype == torch.float64 else example_inputs
    oa, ob = _float_outputs(ca, x), _float_outputs(cb, x)
    if len(oa) != len(ob):
        return f"the models return {len(oa)} and {len(ob)} floating output tensors"
    out = []
    for i, (u, v) in enumerate(zip(oa, ob)):
        if u.shape != v.shape:
            return f"output {i} has shape {tuple(u.shape)} in the first model, {tuple(v.shape)} in the other"
        u, v = u.double(), v.double()
        if not u.numel():
            out.append(OutputDiff(i, tuple(u.shape), 0.0, 0.0))
            continue
        bad = (_nonfinite(u), _nonfinite(v))
        if bad != (None, None):
            finite = [t[torch.isfinite(t)] for t in (u, v)]
            scale = max([float(t.abs().max()) for t in finite if t.numel()], default=0.0)
            out.append(OutputDiff(i, tuple(u.shape), math.nan, scale, bad))
            continue
        scale = max(float(u.abs().max()), float(v.abs().max()))
        out.append(OutputDiff(i, tuple(u.shape), float((u - v).abs().max()), scale))
    return out


def max_abs_diff(
    a: nn.Module, b: nn.Module, example_inputs: Any, dtype: torch.dtype = torch.float64
) -> float:
    """Largest ``|a(x) - b(x)|`` over all floating output tensors, both run in ``dtype`` (copies; the
    originals are untouched). ``inf`` when the outputs differ in number or shape; NaN when either model
    outputs a NaN or an Inf (non-finite outputs are never equal, so ``max_abs_diff(...) <= tol`` is False
    then; Python's ``max`` would have dropped the NaN)."""
    diffs = output_diffs(a, b, example_inputs, dtype)
    if isinstance(diffs, str):
        return math.inf
    if not all(d.finite for d in diffs):
        return math.nan
    return max((d.max_abs for d in diffs), default=0.0)


def require_finite_inputs(example_inputs: Any, name: str = "example_inputs") -> None:
    """Refuse non-finite example inputs for the oracle.

    Raises:
        ConfigError: a floating tensor inside ``example_inputs`` (nested tuples, lists, dicts) holds NaN
            or Inf; the message names the argument (``name``), the tensor's position and shape. Outputs
            computed from such inputs are not finite, and non-finite outputs are never equal, so nothing
            could be verified.
    """
    for i, t in enumerate(iter_tensors(example_inputs)):
        if t.is_floating_point() or t.is_complex():
            kind = _nonfinite(t.detach())
            if kind is not None:
                raise ConfigError(
                    f"{name}: input tensor {i} (shape {tuple(t.shape)}) holds {kind}; the equivalence "
                    "check cannot verify on non-finite inputs. Pass finite example inputs (or verify=False)"
                )


_SIDES = ("masked", "compacted")


class NonFiniteOutputError(CompactionError):
    """The oracle met a NaN or Inf output. ``in_reference``: the masked (reference) model's own output is
    not finite, so no compaction could ever be verified on these inputs (no group is at fault)."""

    def __init__(self, message: str, in_reference: bool) -> None:
        super().__init__(message)
        self.in_reference = in_reference


def check_equivalence(
    masked: nn.Module,
    compacted: nn.Module,
    example_inputs: Any,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> float:
    """The oracle: the compacted model computes what the masked one does, in float64.

    Rule, for every floating output tensor pair ``(a, b)`` (float64): both finite, and
    ``max|a - b| <= atol + rtol * max(max|a|, max|b|)`` (defaults ``atol`` 0, ``rtol`` 1e-6: a difference
    is judged against the output's own magnitude, so outputs of size 1e-10 that differ by 1% fail and
    outputs of size 1e12 that differ by float64 rounding pass). A NaN or an Inf in either output is
    never equal (even NaN against NaN at the same place).

    Returns the max abs difference over all outputs.

    Raises:
        ConfigError: ``example_inputs`` holds NaN or Inf (named; nothing is run).
        CompactionError: the outputs differ in number or shape, or break the rule (naming the output, its
            difference, magnitude and the bound); :class:`NonFiniteOutputError` when one holds NaN/Inf.
    """
    require_finite_inputs(example_inputs)
    diffs = output_diffs(masked, compacted, example_inputs)
    if isinstance(diffs, str):
        raise CompactionError(f"compacted output differs from masked output: {diffs}")
    for d in diffs:
        if not d.finite:
            where = ", ".join(f"{k} in the {side} model" for side, k in zip(_SIDES, d.nonfinite) if k)
            raise NonFiniteOutputError(
                f"output {d.index} (shape {d.shape}) is not finite ({where}); non-finite outputs are never "
                "equal, so the compacted model cannot be verified",
                in_reference=d.nonfinite[0] is not None,
            )
        if not d.within(rtol, atol):
            raise CompactionError(
                f"compacted output differs from masked output: output {d.index} (shape {d.shape}), max abs "
                f"diff {d.max_abs:.3g} > {atol:.3g} + {rtol:.3g} * {d.scale:.3g} (atol + rtol * magnitude)"
            )
    return max((d.max_abs for d in diffs), default=0.0)


__all__ = [
    "ATOL",
    "PLAN_VERSION",
    "RTOL",
    "Journal",
    "NonFiniteOutputError",
    "OutputDiff",
    "check_equivalence",
    "compact",
    "interrupts_deferred",
    "make_plan",
    "mask_model",
    "max_abs_diff",
    "output_diffs",
    "require_finite_inputs",
    "restoring",
]

_ = Group
