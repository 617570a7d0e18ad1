"""Compaction in the middle of training: fresh Parameters and an optimizer that follows them.

:func:`secateur.compact.compact` resizes parameters in place (``p.data = sliced``). Between two training
steps that is not enough: autograd caches each leaf's gradient accumulator, with its shape, for as long
as a graph from the previous step is alive (a loop's last ``loss`` keeps it), and the next backward
fails on the old shape. So every resized parameter gets a new ``nn.Parameter`` (same storage, no cached
accumulator), and the optimizer's param groups and per-parameter state (SGD momentum, Adam moments)
are moved to it, sliced at the kept indices, so a momentum entry keeps following its weight.

Used by :class:`secateur.methods.FisherPruner` (one channel removed every few steps); usable from any
loop that compacts while training::

    plan = make_plan(graph, {gi: units})
    compact_in_training(model, plan, optimizer)      # then keep training with the same optimizer
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from secateur.compact import compact

__all__ = ["compact_in_training", "rebind_optimizer", "renew_parameters"]

KeptIndices = Mapping[int, torch.Tensor]  # dim -> kept indices (long) along that dim


def renew_parameters(
    model: nn.Module, old_shapes: Mapping[int, torch.Size]
) -> dict[nn.Parameter, nn.Parameter]:
    """Replace every parameter of ``model`` whose shape differs from ``old_shapes[id(p)]`` by a fresh
    ``nn.Parameter`` sharing its data (same ``requires_grad``; ``.grad`` starts as None).

    Args:
        model: the module tree to walk (parametrizations' ``original`` tensors included).
        old_shapes: ``{id(parameter): shape before the resize}``; parameters not listed are left alone.

    Returns ``{old Parameter: new Parameter}``; a tied parameter (one object under several module names)
    gets one new object, installed under every name.
    """
    new_of: dict[int, nn.Parameter] = {}
    replaced: dict[nn.Parameter, nn.Parameter] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None or id(p) not in old_shapes or tuple(old_shapes[id(p)]) == tuple(p.shape):
                continue
            if id(p) not in new_of:
                new_of[id(p)] = nn.Parameter(p.data, requires_grad=p.requires_grad)
                replaced[p] = new_of[id(p)]
            mod._parameters[name] = new_of[id(p)]
    return replaced


@torch.no_grad()
def rebind_optimizer(
    optimizer: torch.optim.Optimizer,
    replaced: Mapping[nn.Parameter, nn.Parameter],
    kept: Mapping[nn.Parameter, KeptIndices] | None = None,
) -> None:
    """Swap ``replaced`` parameters into ``optimizer``'s param groups and move their state, sliced.

    Args:
        optimizer: any ``torch.optim.Optimizer``; changed in place (same object, same group settings).
        replaced: ``{old Parameter: new Parameter}`` (e.g. from :func:`renew_parameters`).
        kept: ``{new Parameter: {dim: kept indices}}``. Each state tensor of the old parameter with the
            parameter's number of dims (SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``) is
            ``index_select``-ed along those dims, so entry ``i`` of the new state is the old entry at
            ``kept[dim][i]``; scalar state (Adam's ``step``) is carried over unchanged.

    A state tensor that does not end up with the new parameter's shape (an optimizer with factored
    state, or a parameter missing from ``kept``) cannot be sliced consistently: that parameter's state is
    dropped with a warning naming its shape, and the optimizer re-initialises it at its next step.
    """
    kept = kept or {}
    for group in optimizer.param_groups:
        group["params"] = [replaced.get(q, q) for q in group["params"]]
    for old, new in replaced.items():
        state = optimizer.state.pop(old, None)
        if not state:
            continue
        dims = kept.get(new, {})
        moved: dict[str, Any] = {}
        ok = True
        for key, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if v.dim() == new.dim():
                    for d, idx in sorted(dims.items()):
                        v = v.index_select(d, idx.to(v.device))
                if v.shape != new.shape:
                    ok = False
                    break
                v = v.contiguous()
            moved[key] = v
        if ok:
            optimizer.state[new] = moved
        else:
            warnings.warn(
                f"rebind_optimizer: state of a parameter resized to {tuple(new.shape)} could not be sliced "
                "to match; it is dropped and re-initialised at the next step",
                stacklevel=2,
            )


def compact_in_training(
    model: nn.Module,
    plan: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    check: Any = None,
) -> dict[str, nn.Parameter]:
    """Compact ``model`` by ``plan`` between training steps and keep ``optimizer`` consistent with it.

    Runs :func:`secateur.compact.compact` (transactional: on failure it raises ``CompactionError`` and
    neither the model nor the optimizer is changed), then :func:`renew_parameters` for every resized
    parameter and :func:`rebind_optimizer` with the plan's kept indices (``plan["tensors"]``: ``{qualname:
    {dim: kept indices}}``). Afterwards ``optimizer`` holds exactly the model's parameters, momentum and
    Adam moments of kept entries are the old values at the kept indices, and the next forward/backward
    works even if the previous step's graph is still alive.

    Args:
        model: the network being trained; changed in place.
        plan: a pruning plan from :func:`secateur.compact.make_plan`.
        optimizer: the training optimizer, or None.
        check: passed to :func:`~secateur.compact.compact` (runs inside the transaction).

    Returns ``{qualname: new Parameter}`` for every renamed-in parameter (all names of a tied one).

    Raises:
        CompactionError: from :func:`~secateur.compact.compact`; nothing was changed.
    """
    named = dict(model.named_parameters(remove_duplicate=False))
    shapes = {id(p): p.shape for p in named.values()}
    kept_of: dict[int, dict[int, torch.Tensor]] = {}
    for name, dims in plan.get("tensors", {}).items():
        p = named.get(name)
        if p is not None:
            kept_of[id(p)] = {int(d): torch.as_tensor(k, dtype=torch.long) for d, k in dims.items()}
    compact(model, plan, check=check)
    replaced = renew_parameters(model, shapes)
    if optimizer is not None and replaced:
        kept = {new: kept_of.get(id(old), {}) for old, new in replaced.items()}
        rebind_optimizer(optimizer, replaced, kept)
    new_ids = {id(p) for p in replaced.values()}
    return {n: p for n, p in model.named_parameters(remove_duplicate=False) if id(p) in new_ids}
