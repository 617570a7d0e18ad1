"""One call that physically removes channels, features and attention heads.

    model, plan = prune_channels(model, example_inputs, ratio=0.3, criterion="l1")

trace -> groups -> score units -> choose per group -> plan (JSON data) -> compact (transactional).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.compact import NonFiniteOutputError, compact, make_plan, require_finite_inputs
from secateur.compact.verify import incompatible_groups, verified_compact
from secateur.errors import CompactionError, ConfigError, GraphError, IncompatibleGroupError
from secateur.graph.groups import DependencyGraph, Group

Criterion = Callable[[Group, nn.Module], Any]


def _named(model: nn.Module) -> dict[str, torch.Tensor]:
    d = dict(model.named_parameters(remove_duplicate=False))
    d.update(dict(model.named_buffers(remove_duplicate=False)))
    return d


def lp_scores(
    group: Group, model: nn.Module, p: float = 1.0, cache: dict | None = None, producers_only: bool = True
) -> np.ndarray:
    """Sum over members (parameters only, not buffers) of the mean |w|^p of each unit's slice; shape
    ``(n_units,)``. Each member is normalised by its mean so one large tensor does not dominate.
    ``producers_only`` (default, the classic L1 filter norm): only members along dim 0 (the filters, rows
    and biases that produce the channels) are read; consumer-side slices are skipped (half the reads).
    ``cache`` is accepted for API stability (unused: one fused norm per member is the fastest path)."""
    cache = {} if cache is None else cache
    if "__named__" not in cache:
        cache["__named__"] = _named(model)
    named = cache["__named__"]
    total = np.zeros(group.n_units)
    members = [m for m in group.members if not m.is_buffer]
    if producers_only and any(m.dim == 0 for m in members):
        members = [m for m in members if m.dim == 0]
    n = group.n_units
    with torch.no_grad():
        for m in members:
            t = named[m.name].detach()
            a = (t if m.dim == 0 else t.movedim(m.dim, 0)).reshape(t.shape[m.dim], -1)
            red = a.abs().sum(1) if p == 1.0 else (a * a).sum(1) if p == 2.0 else a.abs().pow(p).sum(1)
            red = red.double().cpu().numpy() / max(1, a.shape[1])  # abs().sum() beats vector_norm on CPU
            u = m.unit_of
            if u.size == n and (n < 2 or (u[0] == 0 and u[-1] == n - 1 and (np.diff(u) == 1).all())):
                per_unit = red  # one index per unit, in order: the per-unit mean is the value itself
            else:
                per_unit = np.bincount(u, weights=red, minlength=n)
                per_unit = per_unit / np.maximum(np.bincount(u, minlength=n), 1)
            total += per_unit / max(per_unit.mean(), 1e-12)
    return total


def choose_units(group: Group, scores: np.ndarray, ratio: float, round_to: int = 1) -> np.ndarray:
    """Indices of the lowest-scoring prunable units to remove from ``group``.

    Removes ``floor(ratio * n_prunable)`` units, fewer if needed so that the kept count is a multiple of
    ``round_to`` and at least one unit stays.
    """
    cand = np.nonzero(group.prunable)[0]
    k = int(math.floor(ratio * cand.size + 1e-9))
    if round_to > 1:
        keep = group.n_units - k
        keep = int(math.ceil(keep / round_to) * round_to)
        k = max(0, group.n_units - keep)
    k = min(k, cand.size, group.n_units - 1)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    order = cand[np.argsort(scores[cand], kind="stable")]
    return np.sort(order[:k])


def _ensure_member_nonempty(group: Group, rm: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Keep at least one unit in every member (a layer fed by a concat keeps a channel of each part)."""
    gone = np.zeros(group.n_units, dtype=bool)
    gone[rm] = True
    for m in group.members:
        if gone[m.unit_of].all():
            units = np.unique(m.unit_of)
            gone[units[np.argmax(scores[units])]] = False
    return np.nonzero(gone)[0]


def prune_channels(
    model: nn.Module,
    example_inputs: Any,
    ratio: float = 0.3,
    criterion: str | Criterion = "l1",
    protect: Sequence[str] = (),
    round_to: int = 1,
    seed: int = 0,
    prune_outputs: bool = False,
    verify: bool = True,
    graph: DependencyGraph | None = None,
    skip_incompatible: bool = False,
    prune_normalized: bool = False,
) -> tuple[nn.Module, dict]:
    """Remove ``ratio`` of the prunable units of every group (channels, features, heads) in place.

    Args:
        model: any ``nn.Module``; changed in place and returned.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        ratio: fraction of each group's prunable units to remove, in [0, 1).
        criterion: ``"random"``, ``"l1"``, ``"l2"`` or ``f(group, model) -> scores`` (shape ``(n_units,)``,
            low = removed first).
        protect: module name patterns never pruned (fnmatch; ``"re:..."`` for a regex).
        round_to: kept unit counts are multiples of this.
        verify: run the oracle (masked copy vs compacted model, float64, every output finite and within
            ``1e-6 ×`` its magnitude: :func:`secateur.compact.check_equivalence`) and roll back on failure
            (default: a wrong model is never returned; costs a deep copy and two float64 forwards, so
            pass ``verify=False`` for timing or for models too large to copy). Needs finite
            ``example_inputs``.
        prune_normalized: also prune dims that normalisation modules (LayerNorm, RMSNorm, ...) normalise,
            e.g. a transformer's hidden size (:meth:`DependencyGraph.build`; exact: the masks compute the
            norm's statistics over kept channels).
        skip_incompatible: with ``verify``, leave whole the groups whose removal breaks the model (see
            :func:`remove_units`) instead of raising IncompatibleGroupError.

    Returns ``(model, plan)``; ``plan`` is plain JSON-serialisable data (:func:`secateur.compact.make_plan`).

    Transactional: on any exception, ``KeyboardInterrupt`` included, the model is left as it was (the
    interrupt is re-raised after the rollback).

    Raises:
        ConfigError: bad ratio or criterion; ``verify`` with NaN/Inf in ``example_inputs`` (before anything
            is traced or changed).
        UnsupportedOpError / GraphError: from tracing.
        IncompatibleGroupError: removing some groups breaks the model (named with the op and module).
        CompactionError: compaction (or verification) failed; the model is unchanged.
    """
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"ratio must be in [0, 1), got {ratio}")
    if verify:
        require_finite_inputs(example_inputs)
    if graph is not None and (protect or prune_outputs or prune_normalized):
        raise ConfigError(
            "protect/prune_outputs/prune_normalized shape the graph when it is built: pass them to "
            "DependencyGraph.build, not together with graph="
        )
    if graph is None:
        graph = DependencyGraph.build(
            model,
            example_inputs,
            protect=protect,
            prune_outputs=prune_outputs,
            prune_normalized=prune_normalized,
        )
    require_prunable(graph)
    rng = np.random.default_rng(seed)
    removed = {}
    cache: dict = {}
    for gi, g in enumerate(graph.groups):
        if g.n_prunable == 0:
            continue
        if callable(criterion):
            scores = np.asarray(torch.as_tensor(criterion(g, model)).detach().cpu().numpy(), dtype=float)
        elif criterion == "random":
            scores = rng.random(g.n_units)
        elif criterion in ("l1", "l2"):
            scores = lp_scores(g, model, 1.0 if criterion == "l1" else 2.0, cache)
        else:
            raise ConfigError(f"unknown criterion {criterion!r}: use 'random', 'l1', 'l2' or a callable")
        if scores.shape != (g.n_units,):
            raise ConfigError(
                f"criterion returned shape {scores.shape} for group {g.name} of {g.n_units} units"
            )
        rm = _ensure_member_nonempty(g, choose_units(g, scores, ratio, round_to), scores)
        if rm.size:
            removed[gi] = rm
    return remove_units(
        model, graph, removed, example_inputs, verify=verify, skip_incompatible=skip_incompatible
    )


def require_prunable(graph: DependencyGraph) -> None:
    """Raise GraphError if no group of ``graph`` has a prunable unit, with the most common reasons.

    Why: a model whose every channel is frozen (e.g. all widths normalised by an RMSNorm over channels) would
    otherwise come back unchanged, which reads as success.
    """
    if graph.prunable_groups():
        return
    counts: dict[str, int] = {}
    for g in graph.groups:
        for r in g.reasons:
            counts[r] = counts.get(r, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    why = "; ".join(f"{r} (x{n})" for r, n in top) or "no groups"
    raise GraphError(
        f"nothing to prune in {type(graph.model).__name__}: all {len(graph.groups)} groups are frozen. "
        f"Most common reasons: {why}"
    )


def remove_units(
    model: nn.Module,
    graph: DependencyGraph,
    removed: dict[int, np.ndarray],
    example_inputs: Any,
    verify: bool = False,
    skip_incompatible: bool = False,
) -> tuple[nn.Module, dict]:
    """Plan the removal of ``{group index: unit indices}`` and compact ``model`` in place.

    With ``verify`` the compacted model must run and equal the masked one (float64, relative tolerance 1e-6:
    :func:`secateur.compact.check_equivalence`) inside the transaction
    (:func:`secateur.compact.verify.verified_compact`); ``example_inputs`` must then be finite. When it does
    not, each group is tried alone to find the ones at fault (a model that derives a width from another
    dimension, such as torchvision's Swin v1 attention): with ``skip_incompatible`` those groups are left
    whole (listed in ``plan["skipped"]`` with the reason, and a warning) and the rest is removed; otherwise
    IncompatibleGroupError names them. Returns ``(model, plan)``.

    Every compaction here is a transaction (:func:`secateur.compact.compact`): on any exception or
    interrupt the model is as it was before the call (each probe and attempt rolls back before the next).

    Raises:
        ConfigError: ``verify`` with NaN/Inf in ``example_inputs`` (the model is not touched).
        IncompatibleGroupError: ``verify`` found groups whose removal breaks the model (names each group,
            the op and the module); the model is unchanged.
        CompactionError: planning, slicing or verification failed; the model is unchanged.
    """
    if verify:
        require_finite_inputs(example_inputs)
    plan = make_plan(graph, removed)
    if not verify:
        compact(model, plan)
        return model, plan
    try:
        verified_compact(model, plan, example_inputs)
        return model, plan
    except CompactionError as e:
        if isinstance(e, NonFiniteOutputError) and e.in_reference:
            raise  # the masked model itself outputs NaN/Inf on these inputs: no group is at fault
        bad = incompatible_groups(model, graph, removed, example_inputs)
        if not bad:
            raise
        why = {graph.groups[gi].name: msg for gi, msg in bad.items()}
        if not skip_incompatible:
            lines = "\n".join(f"  group {n}: {m}" for n, m in why.items())
            raise IncompatibleGroupError(
                f"removing units of {len(bad)} group(s) breaks the model (its code derives a shape from a "
                f"dimension these groups do not change, or the outputs differ); the model is unchanged:\n"
                f"{lines}\nProtect those modules, or pass skip_incompatible=True to leave these groups whole."
            ) from e
    kept = {gi: rm for gi, rm in removed.items() if gi not in bad}
    plan = make_plan(graph, kept)
    try:
        verified_compact(model, plan, example_inputs)
    except CompactionError:  # the first pass found shape breakers only; now those whose outputs differ
        more = incompatible_groups(model, graph, kept, example_inputs)
        if not more:
            raise
        why.update({graph.groups[gi].name: msg for gi, msg in more.items()})
        plan = make_plan(graph, {gi: rm for gi, rm in kept.items() if gi not in more})
        verified_compact(model, plan, example_inputs)
    shown = "; ".join(f"{n}: {m}" for n, m in list(why.items())[:3])
    more = f" (and {len(why) - 3} more, listed in plan['skipped'])" if len(why) > 3 else ""
    warnings.warn(
        f"left {len(why)} group(s) whole because removing their units breaks the model: {shown}{more}",
        stacklevel=2,
    )
    plan["skipped"] = why
    return model, plan


#: Public name (used by the structured pruner and methods): keep one unit of every member.
ensure_member_nonempty = _ensure_member_nonempty

__all__ = [
    "choose_units",
    "ensure_member_nonempty",
    "lp_scores",
    "prune_channels",
    "remove_units",
    "require_prunable",
]
