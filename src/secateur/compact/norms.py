"""Mask-aware normalisation: a masked norm computes its statistics over the kept channels only.

Why: a LayerNorm over ``n`` channels of which ``k`` are kept normalises, once compacted, with the mean and
variance of those ``k`` channels. Zeroing the removed channels is not enough for the masked model to match:
zeros still count in the statistics (the mean of ``[a, b, 0]`` is not the mean of ``[a, b]``), and a removed
channel need not even hold zero (whatever produced it may not be masked to zero). So for every norm whose
normalised dim loses channels (graphs built with ``prune_normalized=True``), :func:`set_norm_masks` puts a
forward hook on the module that replaces its output by :func:`secateur.graph.norms.forward_on_channels` on
the kept channels (exactly what the compacted module computes, with the weights it will have) scattered
back into the full width, with zeros in the removed channels. The hook is differentiable (training with
masks works) and removable: :func:`remove_norm_masks`; :func:`secateur.compact.compact` removes it too, so a
compacted model carries no hook.

The plan lists these norms under ``plan["norms"]``: ``{module path: {"dim": d, "size": n, "kept": [...]}}``
(:func:`norm_plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.errors import CompactionError
from secateur.graph.groups import DependencyGraph
from secateur.graph.norms import forward_kind, forward_on_channels, norm_dim

__all__ = ["KeptChannelsNorm", "norm_masks", "norm_plan", "remove_norm_masks", "set_norm_masks"]


class KeptChannelsNorm:
    """Forward hook (``register_forward_hook(..., with_kwargs=True, prepend=True)``) of a norm module:
    its output becomes the norm over the ``kept`` channels of its input along ``dim``, zeros elsewhere.

    Attributes:
        path: the module's qualified name (for messages).
        kept: int64 tensor ``(k,)``, sorted indices of the kept channels in ``0..size-1``.
        dim: the normalised dim (-1, or 1 for ``nn.GroupNorm``).
        size: the full width ``n``.

    Raises (when called): CompactionError if the input's width along ``dim`` is not ``size``.
    """

    def __init__(self, path: str, kept: Any, dim: int, size: int) -> None:
        self.path = path
        self.kept = torch.as_tensor(np.asarray(kept, dtype=np.int64))
        self.dim = int(dim)
        self.size = int(size)

    def __call__(self, mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        d = self.dim % x.dim()
        if x.shape[d] != self.size:
            raise CompactionError(
                f"mask-aware norm {self.path!r} ({type(mod).__name__}): input has {x.shape[d]} channels "
                f"along dim {d}, its mask was made for {self.size}"
            )
        kept = self.kept.to(x.device)
        yk = forward_on_channels(mod, x.index_select(d, kept), kept, forward_kind(mod), size=self.size)
        shape = list(yk.shape)
        shape[d] = self.size
        return yk.new_zeros(shape).index_copy(d, kept, yk)

    def __repr__(self) -> str:
        return f"KeptChannelsNorm({self.path!r}, kept {self.kept.numel()}/{self.size}, dim={self.dim})"


def norm_plan(graph: DependencyGraph, removed: Mapping[int, Any]) -> dict[str, dict[str, Any]]:
    """The norms whose normalised dim loses channels when ``removed`` units go.

    Args:
        graph: a graph built with ``prune_normalized=True`` (others have no norm events: returns ``{}``).
        removed: ``{group index: unit indices removed}``.

    Returns ``{module path: {"dim": d, "size": n, "kept": sorted kept channel indices}}`` (JSON data).

    Raises:
        CompactionError: two calls of one module would keep different channels (cannot happen for graphs
            this package builds: calls of one norm module are coupled).
    """
    events = [ev for ev in graph.splits if ev.kind == "norm" and ev.classes is not None]
    if not events or not graph.groups:
        return {}
    # class -> (group, unit): every group's classes are sorted (np.unique), so one searchsorted finds them
    cls_all = np.concatenate([g.classes for g in graph.groups])
    order = np.argsort(cls_all, kind="stable")
    cls_sorted = cls_all[order]
    starts = np.cumsum([0] + [g.n_units for g in graph.groups])
    dead = np.zeros(cls_all.size, dtype=bool)  # aligned with cls_all: is that unit removed
    for gi, rm in removed.items():
        rm = np.asarray(list(rm) if not isinstance(rm, np.ndarray) else rm, dtype=np.int64)
        if rm.size:
            mask = np.zeros(graph.groups[gi].n_units, dtype=bool)
            mask[rm] = True
            dead[starts[gi] : starts[gi + 1]] = mask
    out: dict[str, dict[str, Any]] = {}
    model = graph.model
    for ev in events:
        pos = np.searchsorted(cls_sorted, ev.classes)
        pos = np.minimum(pos, cls_sorted.size - 1)
        found = cls_sorted[pos] == ev.classes
        gone = np.zeros(ev.classes.size, dtype=bool)
        gone[found] = dead[order[pos[found]]]
        if not gone.any():
            continue
        path = ev.module_paths[0]
        kept = np.nonzero(~gone)[0].tolist()
        prev = out.get(path)
        if prev is not None and prev["kept"] != kept:
            raise CompactionError(f"norm module {path!r} is called twice with different kept channels")
        mod = model.get_submodule(path) if path else model
        out[path] = {"dim": norm_dim(mod), "size": int(ev.n_outer), "kept": kept}
    return out


def _hook_dicts(mod: nn.Module) -> list[dict]:
    return [mod._forward_hooks, mod._forward_hooks_with_kwargs, mod._forward_hooks_always_called]


def norm_masks(model: nn.Module) -> dict[str, KeptChannelsNorm]:
    """``{module path: hook}`` of the mask-aware norm hooks installed on ``model``."""
    out = {}
    for path, mod in model.named_modules():
        for h in mod._forward_hooks.values():
            if isinstance(h, KeptChannelsNorm):
                out[path] = h
    return out


def remove_norm_masks(
    model: nn.Module,
    journal: Callable[[Callable[[], None]], None] | None = None,
    modules: Iterable[nn.Module] | None = None,
) -> int:
    """Remove every :class:`KeptChannelsNorm` hook from ``model``; returns how many were removed.

    ``journal(undo)``, if given, receives for each removal a function that puts the hook back where it was
    (in the same order among the module's other hooks): :func:`secateur.compact.compact` uses it to roll
    back. ``modules``: the modules of ``model`` (each once), when the caller has them already (default
    ``model.modules()``).
    """
    n = 0
    for mod in model.modules() if modules is None else modules:
        if not mod._forward_hooks:
            continue
        ids = [k for k, h in mod._forward_hooks.items() if isinstance(h, KeptChannelsNorm)]
        for hid in ids:
            # what each hook dict holds, saved (and journaled) before anything is removed, so an undo run
            # after an interruption at any point puts back exactly what was there
            saved = [(d, list(d.keys()), d[hid]) for d in _hook_dicts(mod) if hid in d]
            if journal is not None:

                def undo(saved: list = saved, hid: int = hid) -> None:
                    for d, keys, value in saved:
                        d[hid] = value
                        for k in keys:  # restore the original order among other hooks
                            if k in d:
                                d.move_to_end(k)

                journal(undo)
            for d, _, _ in saved:
                d.pop(hid, None)
            n += 1
    return n


def set_norm_masks(model: nn.Module, norms: Mapping[str, Mapping[str, Any]]) -> None:
    """Install (or replace) the mask-aware hook of every norm listed in ``norms`` (:func:`norm_plan`'s
    format); norms not listed keep whatever they have. Idempotent.

    Raises:
        CompactionError: a listed path is not a module of ``model``, or its width is not ``size``; nothing
            is installed then.
    """
    todo = []
    for path, spec in norms.items():
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError as e:
            raise CompactionError(f"plan lists norm {path!r}, which the model does not have") from e
        w = getattr(mod, "weight", None)
        size = int(spec["size"])
        if isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] != size:
            raise CompactionError(
                f"norm {path!r} ({type(mod).__name__}) has {w.shape[0]} channels, the plan expects {size}"
            )
        todo.append((path, mod, spec))
    for path, mod, spec in todo:
        old = [k for k, h in mod._forward_hooks.items() if isinstance(h, KeptChannelsNorm)]
        # the new hook first, then the old ones out: an interruption in between leaves two hooks, which
        # compute the same output (each recomputes the norm from the module's input), never none
        hook = KeptChannelsNorm(path, spec["kept"], spec["dim"], spec["size"])
        mod.register_forward_hook(hook, with_kwargs=True, prepend=True)
        for hid in old:
            for d in _hook_dicts(mod):
                d.pop(hid, None)
