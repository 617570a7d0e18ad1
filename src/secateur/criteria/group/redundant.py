"""The redundant-feature group criterion (Ayinde & Zurada 2018, "Building Efficient ConvNets using Redundant
Feature Pruning", sec. 3).

Filters of a layer that point the same way are redundant: they are clustered by the cosine similarity of
their weights (agglomerative, threshold ``τ``), one filter per cluster is kept and the others are removed.
As a score: the clustering's merge tree (:func:`secateur.criteria.group.functional.merge_tree`) says, for
every filter but one, the similarity ``s`` at which its cluster is absorbed by a cluster kept by another
filter; that filter scores ``-s`` (removed first when most similar). Removing every filter scoring
``<= -τ`` is the paper's clustering at threshold ``τ``, and removing the ``k`` lowest-scoring filters of a
group is the clustering at the threshold where ``k`` filters are redundant: at every cut exactly one filter
per cluster stays.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from secateur.criteria.group.base import (
    GroupCriterion,
    effective_tensor,
    producer_members,
    register_group_criterion,
    rows_by_index,
)
from secateur.criteria.group.functional import merge_tree
from secateur.errors import ConfigError
from secateur.graph.groups import Group

__all__ = ["LINKAGES", "RedundantCriterion", "group_filters"]

#: Cluster linkages of :func:`secateur.criteria.group.functional.merge_tree`.
LINKAGES = ("single", "complete", "average")

#: Score of the filter each group keeps last (above every ``-similarity``, which lies in [-1, 1]).
KEPT_LAST = 2.0


def group_filters(group: Group, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The filters of a group's units and their strength, read through masks.

    For each unit, the rows it owns in every conv / linear layer *producing* the group (the output-channel
    dim of the weight, :func:`secateur.criteria.group.base.producer_members`), each producer's part divided
    by its L2 norm and the parts concatenated, so that the cosine similarity of two units does not depend
    on the scale of any one filter (a residual group has several producers).

    Returns ``(filters (n_units, D) float64, strength (n_units,) float64)`` with ``strength`` the L2 norm of
    the unit's raw (unnormalised) rows over all producers, or None when no producer is in the group or its
    units own different numbers of rows.
    """
    parts, strength = [], torch.zeros(group.n_units, dtype=torch.float64)
    for m in producer_members(group, model):
        counts = np.bincount(m.unit_of, minlength=group.n_units)
        if counts.min() != counts.max() or counts.min() == 0:
            return None
        rows = rows_by_index(effective_tensor(model, m.name), m.dim)  # (indices of the dim, -1)
        order = torch.from_numpy(np.argsort(m.unit_of, kind="stable"))
        per_unit = rows[order].reshape(group.n_units, -1)
        norms = torch.linalg.vector_norm(per_unit, dim=1)
        strength += norms**2
        parts.append(per_unit / torch.where(norms > 0, norms, 1.0)[:, None])
    if not parts:
        return None
    return torch.cat(parts, 1), strength.sqrt()


@register_group_criterion("redundant")
class RedundantCriterion(GroupCriterion):
    """Redundant feature pruning (Ayinde & Zurada 2018): per unit, ``-s`` with ``s`` the cosine similarity
    (cluster linkage) at which the unit stops representing its cluster; the unit each group keeps last
    scores :data:`KEPT_LAST` (2).

    Filters are those of :func:`group_filters`; clusters merge as in
    :func:`secateur.criteria.group.functional.merge_tree`. When two clusters merge, the representative of the
    union is the one of the two with the larger raw filter norm (the lower index on a tie), so the kept
    filter of every cluster is its strongest one, at every threshold. ``s`` is the running minimum of the
    merge similarities (they do not increase, up to rounding), so scores are nested: the ``k`` lowest of a
    group are the first ``k`` merges' absorbed representatives, and ``score <= -τ`` is the cut at ``τ``.

    Groups without a producing conv / linear layer, or with fewer than two units, are not scored (left
    whole). Similarities are on one scale in every group (``comparable``): a global ranking is one ``τ``
    for the whole network.

    Args:
        linkage: ``"single"``, ``"complete"`` or ``"average"`` (default, UPGMA).

    Raises:
        ConfigError: an unknown linkage.
    """

    name = "redundant"
    comparable = True

    def __init__(self, linkage: str = "average") -> None:
        if linkage not in LINKAGES:
            raise ConfigError(f"redundant: linkage must be one of {LINKAGES}, got {linkage!r}")
        self.linkage = linkage

    def group_scores(self, group: Group, model: nn.Module) -> np.ndarray | None:  # type: ignore[override]
        found = group_filters(group, model)
        if found is None or group.n_units < 2:
            return None
        filters, strength = found
        return tree_scores(merge_tree(filters, self.linkage), strength)


def tree_scores(merges: list[tuple[int, int, float]], strength: torch.Tensor) -> np.ndarray:
    """Scores ``(n,)`` of :class:`RedundantCriterion` from a merge tree over ``n = len(strength)`` units:
    each merge's absorbed representative (the weaker one, by ``strength`` then index) scores minus the
    running minimum of the merge similarities so far; the units never absorbed score :data:`KEPT_LAST`."""
    n = int(strength.numel())
    rep = list(range(n))  # representative of the cluster held in each slot
    scores = np.full(n, KEPT_LAST)
    floor = np.inf
    for i, j, s in merges:
        floor = min(floor, s)
        a, b = rep[i], rep[j]
        win, lose = (a, b) if (float(strength[a]), -a) >= (float(strength[b]), -b) else (b, a)
        scores[lose] = -floor
        rep[i] = win
    return scores
