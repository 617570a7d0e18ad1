"""Sensitivity-derived allocation: prune each layer (or group) alone, keep what stays within a tolerance.

Li et al. 2017, "Pruning Filters for Efficient ConvNets", sec. 3.3 / 4.1: sweep each layer's sparsity
alone, read off the largest one whose metric stays within ``tolerance`` of the dense baseline, and use
those per-layer values (scaled to the pruner's overall sparsity) as the allocation.

One sweep (:func:`sweep_each`: each item pruned alone at each fraction, then evaluated) serves both
granularities:

- element pruning: :func:`sensitivity_sweep` zeroes each layer's lowest-scoring weights, and
  :class:`Sensitivity` scales the per-layer values of :func:`sensitivity_sparsities`;
- structured pruning (``ChannelPruner(..., allocation="sensitivity")``): :func:`group_sensitivity` removes
  each dependency-graph group's lowest-scoring units alone from a compacted copy and measures the loss on
  calibration data; :func:`sensitivity_removal_for` then searches the one loss budget (``tolerance``) at
  which every group's fraction (the interpolated :func:`sensitivity_sparsities`) removes the target amount,
  so a group whose loss rises fast is pruned less.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from secateur._validate import check_sparsity
from secateur.allocation.element import Masks, layerwise
from secateur.allocation.search import smallest_reaching
from secateur.allocation.structured import CostModel, Removal, uniform_removal
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph
from secateur.masks.element import original
from secateur.scope import Target

__all__ = [
    "GROUP_FRACTIONS",
    "Sensitivity",
    "calibration_loss",
    "group_sensitivity",
    "max_tolerance",
    "sensitivity_removal",
    "sensitivity_removal_for",
    "sensitivity_sparsities",
    "sensitivity_sweep",
    "sweep_each",
]

#: Fractions of a group's prunable units removed alone by :func:`group_sensitivity` (the default).
GROUP_FRACTIONS = (0.25, 0.5, 0.75)

K = TypeVar("K", bound=Hashable)


def sweep_each(
    items: Sequence[K], evaluate_at: Callable[[K, float], float], sparsities: Sequence[float]
) -> dict[K, dict[float, float]]:
    """The sweep itself: ``{item: {sparsity: evaluate_at(item, sparsity)}}``, items in order, sparsities in
    the order given (each checked to lie in [0, 1)).

    ``evaluate_at`` prunes ``item`` alone at ``sparsity``, measures, and leaves the model as it found it.

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    sps = [check_sparsity(s) for s in sparsities]
    return {item: {s: float(evaluate_at(item, s)) for s in sps} for item in items}


@torch.no_grad()
def sensitivity_sweep(
    targets: Sequence[Target],
    evaluate: Callable[[], float],
    sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    scores: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[float, float]]:
    """Prune each layer alone at each sparsity and evaluate (Li et al. 2017, sec. 3.3, fig. 2).

    For each target and each fraction ``s``, the ``floor(s · n)`` lowest-scoring entries of that
    layer only are zeroed (by ``|w|`` unless ``scores`` is given), ``evaluate()`` is called (e.g.
    validation accuracy, higher is better), and the weights are restored exactly (:func:`sweep_each`).

    Returns:
        ``{target.name: {sparsity: metric}}``.

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    by_name = {t.name: t for t in targets}

    def evaluate_at(name: str, s: float) -> float:
        t = by_name[name]
        stored = original(t.module, t.param_name)
        saved = stored.detach().clone()
        s_layer = getattr(t.module, t.param_name).detach().abs() if scores is None else scores[name].detach()
        order = torch.sort(s_layer.flatten().double(), stable=True).indices
        try:
            stored.view(-1)[order[: math.floor(s * order.numel())]] = 0
            return float(evaluate())
        finally:
            stored.copy_(saved)

    return sweep_each(list(by_name), evaluate_at, sparsities)


def sensitivity_sparsities(
    sweep: Mapping[K, Mapping[float, float]],
    baseline: float,
    tolerance: float,
    *,
    interpolate: bool = False,
) -> dict[K, float]:
    """Per layer, the largest swept sparsity whose metric is within ``tolerance`` of ``baseline``
    (``metric >= baseline - tolerance``, same units as the metric); 0.0 if none is.

    This is how Li et al. 2017 (sec. 4.1) choose which layers to prune and by how much.

    With ``interpolate=True`` the answer is continuous and monotone in ``tolerance`` (what a search over the
    tolerance needs): each curve's deficit ``baseline - metric`` starts at 0 at sparsity 0, is replaced by its
    running maximum (a sparsity counts only if every smaller swept one is within tolerance too), joined
    linearly between swept points and, past the largest swept sparsity, linearly up to the largest deficit
    of the whole sweep at sparsity 1.0 (an unswept region is assumed as bad as the worst measured point).
    The result is the largest sparsity in [0, 1] at which that line is within ``tolerance``.
    """
    if not interpolate:
        out = {}
        for name, curve in sweep.items():
            ok = [s for s, metric in curve.items() if metric >= baseline - tolerance]
            out[name] = max(ok, default=0.0)
        return out
    worst = max((baseline - m for curve in sweep.values() for m in curve.values()), default=0.0)
    return {name: _crossing(curve, baseline, tolerance, worst) for name, curve in sweep.items()}


def _crossing(curve: Mapping[float, float], baseline: float, tolerance: float, worst: float) -> float:
    """Largest sparsity where the interpolated running-max deficit of ``curve`` is <= ``tolerance``."""
    pts = sorted((float(s), baseline - float(m)) for s, m in curve.items() if s > 0)
    xs, ys = [0.0], [0.0]
    for s, d in pts:
        xs.append(s)
        ys.append(max(ys[-1], d))
    if xs[-1] < 1.0:
        xs.append(1.0)
        ys.append(max(ys[-1], worst))
    if tolerance < 0:
        return 0.0
    for i in range(1, len(xs)):
        if ys[i] > tolerance:  # ys[i - 1] <= tolerance < ys[i]: the line crosses in this segment
            return xs[i - 1] + (tolerance - ys[i - 1]) / (ys[i] - ys[i - 1]) * (xs[i] - xs[i - 1])
    return xs[-1]


class Sensitivity:
    """Allocation with per-layer sparsities from a sensitivity sweep (see :func:`sensitivity_sparsities`).

    The pruner's ``sparsity`` (a fraction of all scoped weights) scales the per-layer values
    ``s_l`` proportionally: layer ``l`` gets ``s_l · sparsity / total``, where ``total`` (attribute
    :attr:`total_sparsity`) is the weighted mean of ``s_l`` over layer sizes. A schedule ending at
    ``total_sparsity`` therefore ends at exactly the sweep's per-layer values.

    Raises (on call):
        ConfigError: ``sparsity`` above ``total_sparsity`` (the sweep allows no more), or a layer
            of ``scores`` without a value.
    """

    def __init__(self, layer_sparsity: Mapping[str, float]) -> None:
        self.layer_sparsity = {n: check_sparsity(s, f"sparsity of {n}") for n, s in layer_sparsity.items()}

    def total(self, scores: Mapping[str, torch.Tensor]) -> float:
        missing = [n for n in scores if n not in self.layer_sparsity]
        if missing:
            raise ConfigError(f"sensitivity allocation has no sparsity for layers {missing}")
        sizes = {n: s.numel() for n, s in scores.items()}
        return sum(self.layer_sparsity[n] * sizes[n] for n in scores) / max(sum(sizes.values()), 1)

    def __call__(
        self,
        scores: Mapping[str, torch.Tensor],
        sparsity: float | None = None,
        previous: Mapping[str, torch.Tensor] | None = None,
    ) -> Masks:
        total = self.total(scores)
        factor = 1.0
        if sparsity is not None:
            sp = check_sparsity(sparsity)
            if sp > total + 1e-12:
                raise ConfigError(
                    f"sparsity {sp} unreachable: the sensitivity sweep allows at most {total:.4f} "
                    "of the scoped weights within its tolerance"
                )
            factor = sp / total if total > 0 else 0.0
        return layerwise(scores, {n: self.layer_sparsity[n] * factor for n in scores}, previous)


# -- structured: per-group sensitivity -----------------------------------------------------------------
def _as_call(x: Any) -> tuple[tuple, dict]:
    if isinstance(x, Mapping):
        return (), dict(x)
    return (x if isinstance(x, tuple) else (x,)), {}


@torch.no_grad()
def calibration_loss(
    model: nn.Module, data: Any, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
) -> float:
    """Mean of ``loss_fn(model(x), y)`` over the batches of ``data``, in eval mode without gradients (the
    model's mode is restored).

    Args:
        data: one batch ``(x, y)`` or an iterable of batches (as ``ChannelPruner(data=...)``); ``x`` a
            tensor, a tuple of positional inputs or a dict of keyword inputs.
        loss_fn: default cross-entropy (classification logits ``(N, classes)``).

    Raises:
        ConfigError: ``data`` holds no batch.
    """
    batches = (
        [data]
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, dict))
        else data
    )
    loss_fn = loss_fn or nn.functional.cross_entropy
    was = {m: m.training for m in model.modules()}
    model.eval()
    total, n = 0.0, 0
    try:
        for batch in batches:
            args, kwargs = _as_call(batch[0])
            total += float(loss_fn(model(*args, **kwargs), batch[1]))
            n += 1
    finally:
        for m, t in was.items():
            m.training = t
    if n == 0:
        raise ConfigError("sensitivity allocation: the calibration data holds no batch")
    return total / n


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _without_hooks(model: nn.Module) -> nn.Module:
    """``model`` (a private copy) with every module's forward / backward hooks dropped, in place."""
    for mod in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(mod, attr, None)
            if hooks:
                hooks.clear()
    return model


def group_sensitivity(
    model: nn.Module,
    graph: DependencyGraph,
    scores: Mapping[int, np.ndarray],
    removed: Mapping[int, np.ndarray],
    loss: Callable[[nn.Module], float],
    fractions: Sequence[float] = GROUP_FRACTIONS,
    round_to: int = 1,
) -> tuple[float, dict[int, dict[float, float]]]:
    """Each scored group pruned alone at each fraction, and the loss of the result (:func:`sweep_each`).

    The model is copied once with its masks baked in (:func:`secateur.analysis.onnx.baked_copy`; ``model``
    is not changed) and without module hooks (a data-dependent criterion's recording hooks must not see the
    sweep's forward passes; secateur's norm-mask hooks are replaced by the compaction; a user's own hooks are
    not applied during the sweep); for each group ``g`` and fraction ``f`` a copy of it is compacted with
    ``removed`` plus the :func:`~secateur.allocation.structured.uniform_removal` of ``g`` alone at ``f`` (its
    ``floor(f · n_prunable)`` lowest-scoring units, kept counts a multiple of ``round_to``), and
    ``loss(copy)`` is called (e.g. :func:`calibration_loss`, lower is better).

    Returns:
        ``(loss of the model with only removed units gone, {group index: {fraction: loss}})``.

    Raises:
        ConfigError: a fraction outside [0, 1).
    """
    from secateur.analysis.onnx import baked_copy
    from secateur.compact import compact, make_plan

    base = _without_hooks(baked_copy(model))
    groups = graph.groups
    prev = {gi: np.asarray(r, dtype=np.int64) for gi, r in removed.items() if len(r)}

    def pruned(rm: Mapping[int, np.ndarray]) -> nn.Module:
        return compact(copy.deepcopy(base), make_plan(graph, {gi: r for gi, r in rm.items() if len(r)}))

    baseline = float(loss(pruned(prev)))

    def evaluate_at(gi: int, f: float) -> float:
        rm = uniform_removal(groups, {gi: scores[gi]}, prev, f, round_to)[gi]
        return float(loss(pruned({**prev, gi: rm})))

    return baseline, sweep_each(list(scores), evaluate_at, fractions)


def _tie_broken(
    curves: Mapping[int, Mapping[float, float]], baseline: float
) -> dict[int, dict[float, float]]:
    """Loss curves as metrics (higher = better: ``-loss``) with ``1e-9 · (1 + |baseline|) · f`` taken off, so
    flat curves (no measurable loss change) give every group the same fraction rather than a tie."""
    eps = 1e-9 * (1.0 + abs(baseline))
    return {gi: {f: -loss - eps * f for f, loss in c.items()} for gi, c in curves.items()}


def sensitivity_removal(
    groups: Sequence[Any],
    scores: Mapping[int, np.ndarray],
    removed: Mapping[int, np.ndarray],
    curves: Mapping[int, Mapping[float, float]],
    baseline: float,
    tolerance: float,
    round_to: int = 1,
) -> Removal:
    """Every group of ``scores`` pruned at its own fraction: the largest at which its interpolated loss curve
    (from :func:`group_sensitivity`) stays within ``tolerance`` of ``baseline``
    (:func:`sensitivity_sparsities` with ``interpolate=True``); the units are its lowest-scoring ones
    (:func:`~secateur.allocation.structured.uniform_removal` per group, ``removed`` kept).

    Returns ``{group index: sorted int64 unit indices}`` for every group in ``scores``.
    """
    fracs = sensitivity_sparsities(_tie_broken(curves, baseline), -baseline, tolerance, interpolate=True)
    out: dict[int, np.ndarray] = {}
    for gi, s in scores.items():
        out.update(uniform_removal(groups, {gi: s}, removed, min(fracs.get(gi, 0.0), 1.0), round_to))
    return out


def max_tolerance(curves: Mapping[int, Mapping[float, float]], baseline: float) -> float:
    """The loss budget at which every group reaches fraction 1.0 in :func:`sensitivity_removal` (the upper
    end of the search)."""
    metrics = _tie_broken(curves, baseline)
    return max((-baseline - m for c in metrics.values() for m in c.values()), default=0.0) + 1e-12


def sensitivity_removal_for(
    groups: Sequence[Any],
    scores: Mapping[int, np.ndarray],
    removed: Mapping[int, np.ndarray],
    curves: Mapping[int, Mapping[float, float]],
    baseline: float,
    cost: CostModel,
    target: float,
    round_to: int = 1,
) -> Removal:
    """The :func:`sensitivity_removal` at the smallest loss budget that removes ``target`` of ``cost``'s
    resource (bisection, 40 halvings of ``[0, max_tolerance]``: every group's fraction grows with the
    budget); the removal at the largest budget (every group at fraction 1.0) if none does.

    Groups whose loss rises fast with their fraction reach the budget early and are pruned less; groups
    whose loss barely moves are pruned more: the loss increases of the groups, each measured alone, are
    equalised (to the interpolation of the sweep).
    """

    def at(tol: float) -> Removal:
        return sensitivity_removal(groups, scores, removed, curves, baseline, tol, round_to)

    def reaches(tol: float) -> bool:
        return cost.state(at(tol)).removed_fraction() >= target - 1e-12

    return at(smallest_reaching(reaches, hi=max_tolerance(curves, baseline), steps=40)[1])
