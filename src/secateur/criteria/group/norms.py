"""Data-free group criteria from weight norms: random, L1/L2 (Li et al. 2017), FPGM (He et al. 2019)."""


from __future__ import annotations

import numpy as np
import torch
from torch import nn

from secateur.criteria.group.base import (
    GroupCriterion,
    effective_tensor,
    mean_normalised_sum,
    producer_members,
    register_group_criterion,
    rows_by_index,
    unit_mean,
)
from secateur.criteria.group.functional import fpgm_scores, norm_scores
from secateur.errors import ConfigError
from secateur.graph.groups import Group, Member


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


class LpCriterion(GroupCriterion):
    """Li et al. 2017 filter norms over a whole group (see the module docstring for the normalisation).

    Per member: ``||w_i||_p^p / row size`` per index via :func:`norm_scores`, averaged over the indices
    of each unit, divided by its mean over units; summed over parameter members (buffers skipped).

    Args:
        p: the norm order (> 0).
        producers_only: read only the members along dim 0 (filters, biases, norm scales: the side that
            produces the channels, Li et al.'s filter norm), as :func:`secateur.pruners.oneshot.lp_scores`
            does by default; False adds the consumer side (the next layer's input slices).
    """

    def __init__(self, p: float = 1.0, producers_only: bool = True) -> None:
        if not p > 0:
            raise ConfigError(f"norm order p must be > 0, got {p!r}")
        self.p = float(p)
        self.producers_only = bool(producers_only)
        self.name = "l1" if self.p == 1.0 else "l2" if self.p == 2.0 else f"l{self.p:g}"

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray:
        parts = []
        members = [m for m in group.members if not m.is_buffer]
        if self.producers_only and any(m.dim == 0 for m in members):
            members = [m for m in members if m.dim == 0]
        with torch.no_grad():
            for m in members:
                rows = rows_by_index(effective_tensor(model, m.name), m.dim)
                per_index = norm_scores(rows, self.p).pow(self.p) / max(rows.shape[1], 1)
                parts.append(unit_mean(per_index.cpu().numpy(), m, group.n_units))
        return mean_normalised_sum(parts, group.n_units)


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
