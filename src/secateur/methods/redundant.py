"""Redundant feature pruning end to end (Ayinde & Zurada 2018, "Building Efficient ConvNets using
Redundant Feature Pruning", sec. 3).

Filters of a layer that point the same way are redundant: they are clustered by the cosine similarity
of their weights (agglomerative, threshold ``τ``), one filter per cluster is kept, the others are removed
physically through the dependency graph, and the network is retrained.

The method is the ``"redundant"`` group criterion
(:class:`~secateur.criteria.group.redundant.RedundantCriterion`: a filter scores minus the similarity at
which its cluster is absorbed by one kept by another filter) and one call of the structured driver
(:class:`~secateur.pruners.channel.ChannelPruner`). Two ways to say how much goes: a threshold ``tau``
(the paper's: every filter scoring ``<= -τ``, i.e. the clusters at ``τ`` minus their kept filters), or a
``sparsity`` (a fraction of each group's filters, or of all of them with ``allocation="global"``, for
comparisons at a fixed budget: the clustering at the threshold where that many filters are redundant).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from secateur.criteria.group.functional import redundant_features
from secateur.criteria.group.redundant import LINKAGES, RedundantCriterion, group_filters
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph
from secateur.pruners.oneshot import prune_channels

__all__ = ["filter_clusters", "prune_redundant"]


def filter_clusters(
    model: nn.Module,
    example_inputs: Any,
    tau: float,
    linkage: str = "average",
    graph: DependencyGraph | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{group name: (labels (n_units,) int64, keep (n_units,) bool)}`` for every prunable group the
    ``"redundant"`` criterion scores: the clusters of cosine similarity ``>= tau``
    (:func:`~secateur.criteria.group.functional.redundant_features`) and the filter each keeps (the one
    scoring above ``-tau``: exactly one per cluster).

    Raises:
        ConfigError: ``tau`` outside [-1, 1] or an unknown linkage.
    """
    if not -1.0 <= tau <= 1.0:
        raise ConfigError(f"filter_clusters: tau must be in [-1, 1], got {tau!r}")
    crit = RedundantCriterion(linkage)
    if graph is None:
        graph = DependencyGraph.build(model, example_inputs)
    out = {}
    for g in graph.prunable_groups():
        scores = crit.group_scores(g, model)
        found = group_filters(g, model)
        if scores is None or found is None:
            continue
        labels, _ = redundant_features(found[0], tau, linkage)
        out[g.name] = (labels, torch.from_numpy(scores > -tau))
    return out


def prune_redundant(
    model: nn.Module,
    example_inputs: Any,
    tau: float | None = None,
    sparsity: float | None = None,
    linkage: str = "average",
    allocation: str = "uniform",
    protect: Sequence[str] = (),
    verify: bool = True,
) -> tuple[nn.Module, dict]:
    """Cluster every prunable group's filters, keep one per cluster, remove the rest through the graph.

    Args:
        tau: cosine-similarity threshold in [-1, 1] (Ayinde & Zurada 2018): every filter whose cluster at
            ``τ`` is kept by another filter goes; or
        sparsity: fraction in [0, 1) of the scored groups' prunable filters to remove (exactly one of the
            two): of each group (``allocation="uniform"``) or of all at once (``"global"``: one threshold).
        linkage: ``"single"``, ``"complete"`` or ``"average"``.
        protect: module name patterns never pruned. verify: run the oracle inside the transaction.

    With ``tau`` the driver ranks the scored groups' filters globally (raw scores: the criterion is
    ``comparable``) and removes as many as score ``<= -τ``, which are exactly those filters (every group
    keeps its last filter, which scores 2; a unit that would empty a member of a concatenation stays, and
    the next-lowest goes instead).

    Returns ``(model, plan)``; retrain afterwards.

    Raises:
        ConfigError: neither or both of ``tau`` and ``sparsity``, either out of range, an unknown linkage
            or allocation (the model is unchanged).
        CompactionError: compaction or verification failed; the model is unchanged.
    """
    if (tau is None) == (sparsity is None):
        raise ConfigError("prune_redundant: give exactly one of tau (threshold) or sparsity (budget)")
    if tau is not None and not -1.0 <= tau <= 1.0:
        raise ConfigError(f"prune_redundant: tau must be in [-1, 1], got {tau!r}")
    if linkage not in LINKAGES:
        raise ConfigError(f"prune_redundant: linkage must be one of {LINKAGES}, got {linkage!r}")
    crit = RedundantCriterion(linkage)
    if sparsity is not None:
        return prune_channels(
            model,
            example_inputs,
            sparsity,
            criterion=crit,
            allocation=allocation,
            protect=protect,
            verify=verify,
        )
    assert tau is not None
    graph = DependencyGraph.build(model, example_inputs, protect=protect)
    ids = [gi for gi, g in enumerate(graph.groups) if g.n_prunable > 0]
    below = sum(
        int(((s <= -tau) & graph.groups[gi].prunable).sum())
        for gi, s in crit.scores(model, graph, ids).items()
        if s is not None
    )
    total = sum(graph.groups[gi].n_prunable for gi in ids)
    return prune_channels(
        model,
        example_inputs,
        below / max(total, 1),
        criterion=crit,
        allocation="global",
        graph=graph,
        verify=verify,
    )
