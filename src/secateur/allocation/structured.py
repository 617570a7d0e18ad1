"""Structured allocation: which units (channels, heads, FFN neurons) of which dependency-graph groups go.

Given one score per unit for the groups a criterion scored (``{group index: (n_units,) float64}``, higher =
keep; :mod:`secateur.criteria.group`), these functions decide the removal
``{group index: sorted unit indices}`` that :class:`secateur.pruners.channel.ChannelPruner` masks or
compacts:

- :func:`choose_units` / :func:`ensure_member_nonempty`: the lowest-scoring fraction of one group's prunable
  units (kept count a multiple of ``round_to``, at least one unit kept), and at least one index kept in every
  member (a layer fed by a concat keeps a channel of each part).
- :func:`uniform_removal`: the same fraction of every scored group (Li et al. 2017's per-layer ratio);
  :func:`uniform_fraction_for` / :func:`uniform_removal_for`: the common fraction, and the near-uniform
  removal that reaches a fraction of a resource with the least overshoot.
- :func:`global_removal`: one ranking over all scored groups (Molchanov et al. 2019), greedy until a
  fraction of a resource is removed; :func:`normalise_scores` makes groups comparable first.
- :class:`CostModel` / :class:`CostState`: what remains of the resource (prunable units, parameters or
  MACs: :data:`TARGETS`) for a removal, exactly and incrementally; :func:`build_cost_model` builds it.

Groups absent from the scores are left whole. Units already removed (``removed``) stay removed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from secateur.allocation.search import smallest_reaching
from secateur.analysis.counting import count_params, layer_table
from secateur.criteria.group import effective_tensor
from secateur.graph.groups import DependencyGraph, Group

__all__ = [
    "ALLOCATIONS",
    "NORMALIZERS",
    "TARGETS",
    "CostModel",
    "CostState",
    "build_cost_model",
    "channel_cost",
    "choose_units",
    "ensure_member_nonempty",
    "global_removal",
    "measure_layers",
    "normalise_scores",
    "uniform_bracket",
    "uniform_fraction_for",
    "uniform_removal",
    "uniform_removal_for",
]

#: What a structured sparsity is a fraction of (``"latency"`` is measured, not modelled: see the pruner).
TARGETS = ("channels", "params", "macs", "latency")
#: Structured allocations: one ranking over all groups, the same fraction of each, one ranking within each
#: class of structurally identical groups with a ratio shared by the classes
#: (:mod:`secateur.allocation.isomorphic`), or per-group fractions from each group's measured loss
#: sensitivity (:func:`secateur.allocation.sensitivity.sensitivity_removal_for`).
ALLOCATIONS = ("global", "uniform", "isomorphic", "sensitivity")
#: How :func:`normalise_scores` rescales each group's scores before a global ranking.
NORMALIZERS = ("auto", "mean", "max", "none")
_EPS = 1e-12

Removal = dict[int, np.ndarray]


# ----------------------------------------------------------------------------------------------------
# within one group
# ----------------------------------------------------------------------------------------------------
def choose_units(group: Group, scores: np.ndarray, sparsity: float, round_to: int = 1) -> np.ndarray:
    """Indices (sorted, int64) of the lowest-scoring prunable units to remove from ``group``.

    Removes ``floor(sparsity * n_prunable)`` units, fewer if needed so that the kept count
    (``n_units - removed``) is a multiple of ``round_to`` and at least one unit stays. Ties go in index order
    (stable sort).

    Args:
        group: a dependency-graph group (``n_units`` units, boolean ``prunable`` of that shape).
        scores: ``(n_units,)`` scores, higher = keep.
        sparsity: fraction of the group's prunable units to remove, in [0, 1].
        round_to: kept unit counts are multiples of this (>= 1).
    """
    cand = np.nonzero(group.prunable)[0]
    k = int(math.floor(sparsity * cand.size + 1e-9))
    if round_to > 1:
        keep = group.n_units - k
        keep = int(math.ceil(keep / round_to) * round_to)
        k = max(0, group.n_units - keep)
    k = min(k, cand.size, group.n_units - 1)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    order = cand[np.argsort(scores[cand], kind="stable")]
    return np.sort(order[:k])


def ensure_member_nonempty(group: Group, removed: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``removed`` minus, for each member it would empty, that member's best-scoring unit.

    A member (one dim of one tensor) may span only some of the group's units: a layer fed by a concat owns
    one part. Removing all of its units would leave a zero-size tensor, so the highest-scoring of them is
    kept. Returns the sorted int64 unit indices still removed.
    """
    gone = np.zeros(group.n_units, dtype=bool)
    gone[removed] = True
    for m in group.members:
        if gone[m.unit_of].all():
            units = np.unique(m.unit_of)
            gone[units[np.argmax(scores[units])]] = False
    return np.nonzero(gone)[0]


# ----------------------------------------------------------------------------------------------------
# resource cost of a removal
# ----------------------------------------------------------------------------------------------------
class CostModel:
    """What remains of a resource (parameters, MACs or prunable units) given the removed units.

    Every cost item (a parameter tensor's size, a layer's measured MACs, a group's prunable unit count)
    is multilinear in the kept fractions of the channel dims it spans: ``base · Π_d kept_d / size_d``.
    This is exact for parameters and for conv / linear MACs (a conv costs ``C_out · C_in / groups ·
    k_h · k_w`` per output position; a depthwise conv's weight spans only its output dim), and
    conservative for MACs that no layer weight scales (functional ops such as attention's
    ``softmax(QKᵀ)V``, counted as fixed although removing heads shrinks them).

    Args:
        total: the dense resource (same unit as the items: units, parameters or MACs).
    """

    def __init__(self, total: float) -> None:
        self.total = float(total)
        self.slot_counts: list[np.ndarray] = []  # per slot: indices of the dim owned by each unit
        self.slot_size: list[int] = []
        self.group_slots: dict[int, list[int]] = {}
        self.item_base: list[float] = []
        self.item_slots: list[list[int]] = []
        self.fixed = self.total

    def add_slot(self, gi: int, counts: np.ndarray) -> int:
        """Add a dim of group ``gi`` (``counts[u]``: indices of that dim owned by unit ``u``); its slot id."""
        self.slot_counts.append(counts.astype(np.int64))
        self.slot_size.append(int(counts.sum()))
        self.group_slots.setdefault(gi, []).append(len(self.slot_counts) - 1)
        return len(self.slot_counts) - 1

    def add_item(self, base: float, slots: list[int]) -> None:
        """Add a cost ``base`` that scales with the kept fraction of each slot in ``slots``."""
        self.item_base.append(float(base))
        self.item_slots.append(slots)
        self.fixed -= float(base)

    def state(self, removed: Mapping[int, np.ndarray]) -> CostState:
        """The cost state after removing ``{group index: unit indices}``."""
        return CostState(self, removed)


class CostState:
    """Kept index counts per slot and the remaining cost; updated unit by unit during a greedy pass."""

    def __init__(self, model: CostModel, removed: Mapping[int, np.ndarray]) -> None:
        self.m = model
        self.kept = np.array(model.slot_size, dtype=np.float64)
        for gi, rm in removed.items():
            if len(rm):
                for s in model.group_slots.get(gi, []):
                    self.kept[s] -= model.slot_counts[s][np.asarray(rm, dtype=np.int64)].sum()
        self.item_val = np.array([self._item(i) for i in range(len(model.item_base))], dtype=np.float64)
        self.slot_items: dict[int, list[int]] = {}
        for i, slots in enumerate(model.item_slots):
            for s in slots:
                self.slot_items.setdefault(s, []).append(i)

    def _item(self, i: int) -> float:
        v = self.m.item_base[i]
        for s in self.m.item_slots[i]:
            v *= self.kept[s] / max(self.m.slot_size[s], 1)
        return v

    def remaining(self) -> float:
        """The resource left (same unit as :attr:`CostModel.total`)."""
        return self.m.fixed + float(self.item_val.sum())

    def removed_fraction(self) -> float:
        """Fraction of the dense resource removed, in [0, 1] (0 for an empty model)."""
        return 1.0 - self.remaining() / self.m.total if self.m.total > 0 else 0.0

    def remove(self, gi: int, units: np.ndarray) -> None:
        """Remove more units of group ``gi`` (not already removed) and update the items they scale."""
        touched: set[int] = set()
        for s in self.m.group_slots.get(gi, []):
            self.kept[s] -= self.m.slot_counts[s][units].sum()
            touched.update(self.slot_items.get(s, []))
        for i in touched:
            self.item_val[i] = self._item(i)


def channel_cost(groups: Sequence[Group], group_ids: Sequence[int]) -> CostModel:
    """The :class:`CostModel` of the prunable units of ``group_ids`` (each unit costs 1): the removed fraction
    of a removal is the fraction of those units it removes."""
    cm = CostModel(sum(groups[gi].n_prunable for gi in group_ids))
    for gi in group_ids:
        s = cm.add_slot(gi, groups[gi].prunable.astype(np.int64))
        cm.add_item(groups[gi].n_prunable, [s])
    return cm


def measure_layers(model: nn.Module, example_inputs: Any) -> list:
    """:func:`secateur.analysis.counting.layer_table` in eval mode (BatchNorm running statistics are not
    updated), every submodule's mode restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return layer_table(model, example_inputs)
    finally:
        for m, t in modes.items():
            m.training = t


def build_cost_model(
    model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int], target: str, example_inputs: Any
) -> CostModel:
    """The :class:`CostModel` of ``target`` for removals among ``group_ids``.

    Args:
        model: the (possibly masked) model ``graph`` was traced from.
        graph: its dependency graph.
        group_ids: the groups a removal may touch (indices into ``graph.groups``).
        target: ``"channels"`` (the prunable units of ``group_ids``), ``"params"`` (every parameter of the
            model) or ``"macs"`` (multiply-accumulates of one forward on ``example_inputs``, measured in
            eval mode). ``"latency"`` is measured by the pruner, with the MAC model as its ranking.
    """
    groups = graph.groups
    if target == "channels":
        return channel_cost(groups, group_ids)
    slots_of: dict[str, list[int]] = {}
    if target == "params":
        cm = CostModel(count_params(model)["params"])
    else:
        rows = measure_layers(model, example_inputs)
        cm = CostModel(sum(r.macs for r in rows))
    for gi in group_ids:
        g = groups[gi]
        for m in g.members:
            if m.is_buffer:
                continue
            s = cm.add_slot(gi, np.bincount(m.unit_of, minlength=g.n_units))
            slots_of.setdefault(m.name, []).append(s)
    if target == "params":
        for name, slots in slots_of.items():
            cm.add_item(effective_tensor(model, name).numel(), slots)
    else:
        for r in rows:
            wname = f"{r.name}.weight" if r.name else "weight"
            if r.macs > 0 and wname in slots_of:
                cm.add_item(r.macs, slots_of[wname])
    return cm


# ----------------------------------------------------------------------------------------------------
# allocations
# ----------------------------------------------------------------------------------------------------
def normalise_scores(
    groups: Sequence[Group], scores: Mapping[int, np.ndarray], removed: Mapping[int, np.ndarray], how: str
) -> dict[int, np.ndarray]:
    """Scores rescaled per group so a global ranking compares groups of different layers.

    ``how``: ``"mean"`` divides each group's scores by the mean of their absolute values over its alive
    (prunable, not yet removed) units, ``"max"`` by the max, ``"none"`` returns them unchanged. A group
    whose divisor is below 1e-12 is left unscaled.
    """
    if how == "none":
        return dict(scores)
    out = {}
    for gi, s in scores.items():
        g = groups[gi]
        alive = g.prunable.copy()
        alive[removed.get(gi, np.zeros(0, dtype=np.int64))] = False
        ref = np.abs(s[alive]) if alive.any() else np.abs(s)
        d = ref.mean() if how == "mean" else ref.max()
        out[gi] = s / d if d > _EPS else s
    return out


def uniform_removal(
    groups: Sequence[Group],
    scores: Mapping[int, np.ndarray],
    removed: Mapping[int, np.ndarray],
    sparsity: float,
    round_to: int = 1,
) -> Removal:
    """The same fraction ``sparsity`` of every scored group's prunable units (:func:`choose_units`), plus
    what ``removed`` already holds, with every member kept non-empty (:func:`ensure_member_nonempty`).

    Returns ``{group index: sorted int64 unit indices}`` for every group in ``scores``.
    """
    out = {}
    for gi, s in scores.items():
        g = groups[gi]
        prev = removed.get(gi, np.zeros(0, dtype=np.int64))
        if not len(prev):  # nothing removed yet (one-shot): the same result without the set algebra
            rm = choose_units(g, s, sparsity, round_to)
            out[gi] = ensure_member_nonempty(g, rm, s) if rm.size else rm
            continue
        s = s.astype(float).copy()
        s[prev] = -np.inf  # removed units stay removed: they are chosen first
        rm = choose_units(g, s, sparsity, round_to)
        rm = np.union1d(rm, prev).astype(np.int64)
        fresh = np.setdiff1d(rm, prev)
        if fresh.size:
            rm = np.union1d(prev, ensure_member_nonempty(g, rm, s)).astype(np.int64)
        out[gi] = rm
    return out


def uniform_bracket(
    groups: Sequence[Group],
    scores: Mapping[int, np.ndarray],
    removed: Mapping[int, np.ndarray],
    cost: CostModel,
    target: float,
    round_to: int = 1,
) -> tuple[float, float]:
    """Common fractions ``(lo, hi)``, ``hi - lo = 2**-40``, around the smallest one whose
    :func:`uniform_removal` removes ``target`` of ``cost``'s resource (:func:`smallest_reaching` over [0, 1]:
    the removed fraction is monotone in the common fraction). ``hi`` is 1.0 if no fraction reaches it."""

    def reaches(frac: float) -> bool:
        rm = uniform_removal(groups, scores, removed, frac, round_to)
        return cost.state(rm).removed_fraction() >= target - _EPS

    return smallest_reaching(reaches, hi=1.0, steps=40)


def uniform_fraction_for(
    groups: Sequence[Group],
    scores: Mapping[int, np.ndarray],
    removed: Mapping[int, np.ndarray],
    cost: CostModel,
    target: float,
    round_to: int = 1,
) -> float:
    """The smallest common fraction whose :func:`uniform_removal` removes ``target`` of ``cost``'s resource
    (the upper end of :func:`uniform_bracket`); 1.0 if none does."""
    return uniform_bracket(groups, scores, removed, cost, target, round_to)[1]


def uniform_removal_for(
    groups: Sequence[Group],
    scores: Mapping[int, np.ndarray],
    removed: Mapping[int, np.ndarray],
    cost: CostModel,
    target: float,
    round_to: int = 1,
) -> Removal:
    """A near-uniform removal that reaches ``target`` (a fraction of ``cost``'s resource) with the least
    overshoot along the common fraction.

    A common fraction ``f`` removes ``floor(f · n_g)`` units of every group, so the removal moves in steps
    of one unit (``round_to`` units) per group, and groups of commensurate sizes (8, 16 and 32 channels)
    all step at the same fraction: the smallest common fraction reaching the target
    (:func:`uniform_fraction_for`) may overshoot it by a step of every group at once (ResNet-8 at half
    width: 2.32x fewer MACs for a 2x target). Here the bisection brackets that jump, ``[f_lo, f_hi]``
    (:func:`uniform_bracket`); from the removal at ``f_lo``, the groups that step between ``f_lo`` and
    ``f_hi`` take their step one at a time until the target is reached, lowest first by the mean score of
    the units the step adds (scores divided by their group's mean over alive units, as
    :func:`normalise_scores` ``"mean"``; ties by group index). Every group's removal is therefore its
    :func:`uniform_removal` at ``f_lo`` or at ``f_hi``: the per-group fractions differ from one common
    fraction by at most one step.

    Returns ``{group index: sorted int64 unit indices}`` for every group in ``scores``; when no fraction
    reaches the target, the removal at 1.0 (as :func:`uniform_removal` at :func:`uniform_fraction_for`).
    """
    lo, hi = uniform_bracket(groups, scores, removed, cost, target, round_to)
    at_lo = uniform_removal(groups, scores, removed, lo, round_to)
    out = dict(at_lo)
    if cost.state(out).removed_fraction() >= target - _EPS:
        return out
    at_hi = uniform_removal(groups, scores, removed, hi, round_to)
    norm = normalise_scores(groups, scores, removed, "mean")
    steps = []
    for gi in scores:
        if np.array_equal(at_hi[gi], at_lo[gi]):
            continue
        extra = np.setdiff1d(at_hi[gi], at_lo[gi])
        steps.append((float(norm[gi][extra].mean()) if extra.size else -math.inf, gi))
    for _, gi in sorted(steps):
        out[gi] = at_hi[gi]
        if cost.state(out).removed_fraction() >= target - _EPS:
            break
    return out


def global_removal(
    groups: Sequence[Group],
    scores: Mapping[int, np.ndarray],
    removed: Mapping[int, np.ndarray],
    cost: CostModel,
    target: float,
    round_to: int = 1,
) -> tuple[Removal, float]:
    """Greedy removal of the lowest-scoring chunks over all scored groups until ``target`` (a fraction of
    ``cost``'s resource) is removed.

    A chunk is one unit, or with ``round_to > 1`` the units that bring the group's kept count to the next
    multiple of ``round_to`` (its score is the mean of theirs). A group keeps at least ``round_to`` units and
    every member at least one index: a group stops at the first chunk that would break this.

    Returns ``({group index: sorted int64 unit indices}, removed fraction reached)``; the dict holds every
    group of ``removed`` and of ``scores``.
    """
    state = cost.state(removed)
    r = round_to
    out = {gi: np.asarray(rm, dtype=np.int64).copy() for gi, rm in removed.items()}
    for gi in scores:
        out.setdefault(gi, np.zeros(0, dtype=np.int64))
    order: dict[int, np.ndarray] = {}
    ptr: dict[int, int] = {}
    alive_n: dict[int, int] = {}
    member_alive: dict[int, list[np.ndarray]] = {}
    for gi in scores:
        g = groups[gi]
        dead = np.zeros(g.n_units, dtype=bool)
        dead[out[gi]] = True
        cand = np.nonzero(g.prunable & ~dead)[0]
        order[gi] = cand[np.argsort(scores[gi][cand], kind="stable")]
        ptr[gi] = 0
        alive_n[gi] = int((~dead).sum())
        member_alive[gi] = [np.bincount(m.unit_of, minlength=g.n_units) * ~dead for m in g.members]

    def next_chunk(gi: int) -> tuple[float, np.ndarray] | None:
        size = (alive_n[gi] % r) or r
        if alive_n[gi] - size < r or ptr[gi] + size > order[gi].size:
            return None
        chunk = order[gi][ptr[gi] : ptr[gi] + size]
        for cnt in member_alive[gi]:
            if cnt.sum() - cnt[chunk].sum() <= 0 and cnt.sum() > 0:
                return None
        return float(np.mean(scores[gi][chunk])), chunk

    heap: list[tuple[float, int, int]] = []
    chunks: dict[int, np.ndarray] = {}
    for gi in scores:
        c = next_chunk(gi)
        if c is not None:
            chunks[gi] = c[1]
            heapq.heappush(heap, (c[0], gi, int(c[1][0])))
    frac = state.removed_fraction()
    while frac < target - 1e-12 and heap:
        _, gi, _ = heapq.heappop(heap)
        chunk = chunks.pop(gi)
        state.remove(gi, chunk)
        out[gi] = np.union1d(out[gi], chunk).astype(np.int64)
        ptr[gi] += chunk.size
        alive_n[gi] -= chunk.size
        for cnt in member_alive[gi]:
            cnt[chunk] = 0
        frac = state.removed_fraction()
        c = next_chunk(gi)
        if c is not None:
            chunks[gi] = c[1]
            heapq.heappush(heap, (c[0], gi, int(c[1][0])))
    return out, frac
