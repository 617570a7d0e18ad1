"""Data-free group criteria from weight norms: random, L1/L2 (Li et al. 2017), FPGM (He et al. 2019)."""


from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from secateur.criteria.group.base import (
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


def lp_scores(
    group: Group, model: nn.Module, p: float = 1.0, cache: dict | None = None, producers_only: bool = True
) -> np.ndarray:
    """Li et al. 2017 filter norms over a whole group: one float64 score per unit, shape ``(n_units,)``.

    Per parameter member (buffers skipped): the mean ``|w|^p`` of each index's slice (reduced in the
    tensor's dtype, then float64), averaged over the indices of each unit, divided by its mean over units
    (so one large tensor does not dominate); summed over members. ``producers_only`` (default, Li et al.'s
    filter norm): only members along dim 0 (filters, rows, biases, norm scales: the side that produces the
    channels) are read when the group has any, half the reads; False adds the consumer side.

    Members are read as forward sees them: through an element mask (a parametrization) when the model is
    masked, so masked units score 0. ``cache`` (a dict, reused across the groups of one model state) holds
    the model's name -> tensor map; pass a fresh one after the model changed.
    """
    cache = {} if cache is None else cache
    if "__named__" not in cache:
        cache["__named__"] = _named_tensors(model)
    named = cache["__named__"]
    total = np.zeros(group.n_units)
    members = [m for m in group.members if not m.is_buffer]
    if producers_only and any(m.dim == 0 for m in members):
        members = [m for m in members if m.dim == 0]
    n = group.n_units
    with torch.no_grad():
        for m in members:
            t = named.get(m.name)
            if t is None:  # parametrized (masked): named_parameters lists only "...original"
                t = effective_tensor(model, m.name)
            t = t.detach()
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


class LpCriterion(GroupCriterion):
    """Li et al. 2017 filter norms over a whole group: :func:`lp_scores` (read through masks).

    Args:
        p: the norm order (> 0).
        producers_only: read only the members along dim 0 (filters, biases, norm scales: the side that
            produces the channels, Li et al.'s filter norm); False adds the consumer side (the next layer's
            input slices).

    Raises:
        ConfigError: ``p`` not positive.
    """

    def __init__(self, p: float = 1.0, producers_only: bool = True) -> None:
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


register_group_criterion("l1")(lambda p=1.0, producers_only=True: LpCriterion(p, producers_only))
register_group_criterion("l2")(lambda p=2.0, producers_only=True: LpCriterion(p, producers_only))


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
