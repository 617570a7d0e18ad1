"""Data-free group criteria from weight norms: random, group L1/L2 (Li et al. 2017; Fang et al. 2023), FPGM
(He et al. 2019)."""


from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from secateur._torch import scratch_view
from secateur.criteria.group.base import (
    NORM_TYPES,
    GroupCriterion,
    GroupScores,
    effective_tensor,
    mean_normalised_sum,
    producer_members,
    register_group_criterion,
    rows_by_index,
    unit_mean,
)
from secateur.criteria.group.functional import fpgm_scores
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group, Member


# ----------------------------------------------------------------------------------------------------
# data-free criteria
# ----------------------------------------------------------------------------------------------------
@register_group_criterion("random")
class RandomCriterion(GroupCriterion):
    """Uniform random scores in [0, 1), from a seeded generator (reproducible across runs)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:
        return self.rng.random(group.n_units)


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``model`` by qualified name (tied ones under every name)."""
    d = dict(model.named_parameters(remove_duplicate=False))
    d.update(dict(model.named_buffers(remove_duplicate=False)))
    return d


def is_offset(m: Member) -> bool:
    """Whether member ``m`` is a bias: a conv / linear bias or a norm layer's shift β (attribute ``bias``).

    An offset is added to the channel whatever its input, so its size says nothing about how much the
    network uses the channel (a large negative β before a ReLU even silences it); the norm criteria skip it.
    """
    return m.name.rpartition(".")[2] == "bias"


def lp_members(group: Group, model: nn.Module, producers_only: bool = False) -> list[Member]:
    """The members :func:`lp_scores` reads: every parameter member except biases (:func:`is_offset`).

    ``producers_only``: only the producing side, i.e. the output dims of conv / linear weights
    (:func:`~secateur.criteria.group.base.producer_members`) and norm-layer scales γ; when the group has
    none, every non-bias member. When a group holds nothing but biases, they are read (a score is needed).
    """
    params = [m for m in group.members if not m.is_buffer]
    members = [m for m in params if not is_offset(m)] or params
    if not producers_only:
        return members
    prods = {m.name for m in producer_members(group, model)}
    picked = [
        m
        for m in members
        if m.name in prods or isinstance(model.get_submodule(m.module) if m.module else model, NORM_TYPES)
    ]
    return picked or members


def slice_sums(t: torch.Tensor, dim: int, p: float = 1.0) -> torch.Tensor:
    """``Σ |t|^p`` over every dim of ``t`` but ``dim``: shape ``(t.shape[dim],)``, in ``t``'s dtype.

    Reduced as ``(before, t.shape[dim], after)``: leading dims first, then the contiguous trailing ones,
    without the copy a ``movedim`` makes (about 3x faster for a conv's input dim on CPU; ``abs().sum()``
    beats ``vector_norm`` there too).
    """
    return slice_sums_many(t, (dim,), p)[dim]


def slice_sums_many(
    t: torch.Tensor, dims: Sequence[int], p: float = 1.0, scratch: dict | None = None
) -> dict[int, torch.Tensor]:
    """``{d: slice_sums(t, d, p)}`` for every ``d`` in ``dims``, from one ``|t|^p`` (the full-size temporary
    is what costs: a weight read along its output dim in one group and its input dim in another pays it
    once). Bit-identical to separate :func:`slice_sums` calls (same reductions of the same tensor).

    ``scratch``: a dict kept across calls (one model's weights): ``|t|^p`` is written into one reused buffer
    instead of a fresh tensor per weight (a fresh large tensor costs its page faults, about as much as the
    arithmetic on CPU); same values, same reductions."""
    a = _power_abs(t, p, scratch)
    out = {}
    for dim in dims:
        size = t.shape[dim]
        if dim == 0:
            out[dim] = a.reshape(size, math.prod(t.shape[1:])).sum(1)
        else:
            out[dim] = a.reshape(math.prod(t.shape[:dim]), size, math.prod(t.shape[dim + 1 :])).sum(0).sum(1)
    return out


def _power_abs(t: torch.Tensor, p: float, scratch: dict | None) -> torch.Tensor:
    """``|t|^p`` (``t·t`` for p = 2), into ``scratch``'s reused buffer when given (same dtype and device)."""
    if scratch is None or not t.is_contiguous():
        return t.abs() if p == 1.0 else t * t if p == 2.0 else t.abs().pow(p)
    out = scratch_view(scratch, t.shape, t)
    if p == 1.0:
        return torch.abs(t, out=out)
    if p == 2.0:
        return torch.mul(t, t, out=out)
    return torch.abs(t, out=out).pow_(p)


def lp_scores(
    group: Group, model: nn.Module, p: float = 1.0, cache: dict | None = None, producers_only: bool = False
) -> np.ndarray:
    """Group Lp magnitude of each unit: ``Σ |w|^p`` over every weight removed with it, one float64 per unit.

    Shape ``(n_units,)``, higher = keep. The sum runs over every parameter member of the group that
    :func:`lp_members` selects (by default the producing filters, the norm scales γ and the consumers'
    input slices, biases and norm shifts β excluded) and, within a member, over all the indices the unit
    owns (a head's rows, a channel's filter): members are summed as they are, so a slice counts by its
    size and magnitude. For ``p = 1`` this is the L1 norm of the unit's whole slice of the group,
    DepGraph's group-level importance (Fang et al., CVPR 2023, "DepGraph: Towards any structural
    pruning") and Torch-Pruning's ``MagnitudeImportance(p=1)`` ranking. With ``producers_only`` it is
    Li et al.'s filter norm (ICLR 2017, "Pruning filters for efficient ConvNets": the sum of absolute
    kernel weights of each filter), plus γ.

    Why the consumers count: behind a BatchNorm the filter's scale is immaterial (BN rescales the output),
    while the next layer's input slice says how much the network reads the channel; and per-member
    normalisation (each member's scores divided by their mean, the previous formula) gave a one-value γ
    or β the weight of a whole filter. docs/tradeoff.md, "Why Torch-Pruning's L1 chose better channels",
    measures the difference.

    Members are read as forward sees them: through an element mask (a parametrization) when the model is
    masked, so masked units score 0. ``cache`` (a dict, reused across the groups of one model state) holds
    the model's name -> tensor map; pass a fresh one after the model changed. Each slice is reduced in the
    tensor's dtype, then accumulated in float64.
    """
    cache = {} if cache is None else cache
    if "__named__" not in cache:
        cache["__named__"] = _named_tensors(model)
    named = cache["__named__"]
    sums = cache.setdefault(("__sums__", p), {})  # name -> {dim: sums}: each weight's |w|^p made once
    n = group.n_units
    total = np.zeros(n)
    with torch.no_grad():
        for m in lp_members(group, model, producers_only):
            got = sums.get(m.name)
            if got is None or m.dim not in got:
                t = named.get(m.name)
                if t is None:  # parametrized (masked): named_parameters lists only "...original"
                    t = effective_tensor(model, m.name)
                sides = {m.dim, 0, 1} if t.dim() >= 2 else {m.dim}  # the two sides groups read a weight by
                scratch = cache.setdefault("__scratch__", {})
                got = sums[m.name] = slice_sums_many(t.detach(), sorted(sides), p, scratch)
            red = got[m.dim].double().cpu().numpy()
            u = m.unit_of
            if u.size == n and (n < 2 or (u[0] == 0 and u[-1] == n - 1 and (np.diff(u) == 1).all())):
                total += red  # one index per unit, in order
            else:
                total += np.bincount(u, weights=red, minlength=n)
    return total


class LpCriterion(GroupCriterion):
    """Group Lp magnitude (:func:`lp_scores`, read through masks): ``Σ |w|^p`` over the unit's weights.

    Args:
        p: the norm order (> 0).
        producers_only: read only the producing side (conv / linear output dims and norm scales γ: Li et
            al. 2017's filter norm); default False, the whole group (consumers' input slices too, as
            DepGraph and Torch-Pruning's ``MagnitudeImportance`` do).

    Raises:
        ConfigError: ``p`` not positive.
    """

    def __init__(self, p: float = 1.0, producers_only: bool = False) -> None:
        if not p > 0:
            raise ConfigError(f"norm order p must be > 0, got {p!r}")
        self.p = float(p)
        self.producers_only = bool(producers_only)
        self.name = "l1" if self.p == 1.0 else "l2" if self.p == 2.0 else f"l{self.p:g}"

    def scores(self, model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> GroupScores:
        """``{group index: (n_units,) float64}`` by :func:`lp_scores`, one name map for all groups."""
        cache: dict = {}
        return {
            gi: lp_scores(graph.groups[gi], model, self.p, cache, self.producers_only) for gi in group_ids
        }

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:
        """:func:`lp_scores` of one group."""
        return lp_scores(group, model, self.p, None, self.producers_only)


register_group_criterion("l1")(lambda p=1.0, producers_only=False: LpCriterion(p, producers_only))
register_group_criterion("l2")(lambda p=2.0, producers_only=False: LpCriterion(p, producers_only))


def unit_rows(t: torch.Tensor, m: Member, n_units: int) -> torch.Tensor | None:
    """Unit matrix ``(n_units, -1)`` of member ``m`` when every unit owns the same number of indices."""
    counts = np.bincount(m.unit_of, minlength=n_units)
    if counts.min() != counts.max() or counts[0] == 0:
        return None
    rows = rows_by_index(t, m.dim)
    order = torch.from_numpy(np.argsort(m.unit_of, kind="stable"))
    return rows[order].reshape(n_units, -1)


@register_group_criterion("fpgm")
class FPGMCriterion(GroupCriterion):
    """FPGM (He et al. 2019): filters near their layer's geometric median are redundant.

    For each producing member (conv / linear output dim, :func:`producer_members`), the unit matrix is
    the unit's filters (a head's rows concatenated) and scores come from
    :func:`~secateur.criteria.group.functional.fpgm_scores`; each producer's scores are divided by their mean
    and summed. Units already masked sit at the origin and are excluded from the median.

    Args:
        method: ``"median"`` (default; distance to the geometric median, sec. 3.3) or ``"sum"`` (eq. 6).

    Raises:
        ConfigError: unknown method; a group without a producing conv/linear layer (named).
    """

    name = "fpgm"

    def __init__(self, method: str = "median") -> None:
        if method not in ("median", "sum"):
            raise ConfigError(f"fpgm method must be 'median' or 'sum', got {method!r}")
        self.method = method

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:
        prods = producer_members(group, model)
        if not prods:
            raise ConfigError(
                f"fpgm: group {group.name} has no producing conv/linear layer to take filters from"
            )
        parts = []
        with torch.no_grad():
            for m in prods:
                t = effective_tensor(model, m.name)
                units = unit_rows(t, m, group.n_units)
                if units is None:  # uneven units: score each row (filter) and average per unit
                    rows = rows_by_index(t, m.dim)
                    parts.append(unit_mean(self._score(rows), m, group.n_units))
                else:
                    parts.append(self._score(units))
        return mean_normalised_sum(parts, group.n_units)

    def _score(self, units: torch.Tensor) -> np.ndarray:
        alive = units.abs().sum(1) > 0  # masked filters are not part of the layer any more
        out = np.zeros(units.shape[0])
        if int(alive.sum()) >= 2:
            out[alive.numpy()] = fpgm_scores(units[alive], self.method).cpu().numpy()
        return out
