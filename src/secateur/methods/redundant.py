"""Redundant feature pruning end to end (Ayinde & Zurada 2018, "Building Efficient ConvNets using
Redundant Feature Pruning", sec. 3).

Filters of a layer that point the same way are redundant: they are clustered by the cosine
similarity of their weights (agglomerative, threshold ``τ``;
:func:`secateur.criteria.group.functional.redundant_features`), one filter per cluster is kept, the others
are removed physically through the dependency graph, and the network is retrained.

Units of a channel group are described by the filters of every conv/linear layer that *produces*
the group (weight rows along the output dim); with several producers (a residual sum) each
producer's part is normalised to unit length before concatenation, so the similarity stays
invariant to the scale of any filter.

Two ways to say how much goes: a threshold ``tau`` (the paper's), or a ``ratio`` (a fraction of
each group's filters, for comparisons at a fixed budget): then ``τ`` is found per group by
bisection so that at least that many filters fall in non-singleton clusters, and the extras with
the lowest similarity to their cluster's representative are kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.allocation.structured import ensure_member_nonempty
from secateur.criteria.group.functional import redundant_features
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group
from secateur.pruners.oneshot import remove_units

__all__ = ["filter_clusters", "group_filters", "prune_redundant"]

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def group_filters(group: Group, model: nn.Module) -> torch.Tensor | None:
    """The unit matrix ``(n_units, D)`` of a group: for each unit, the concatenated unit-normalised
    filters of every conv/linear layer producing it (``None`` if no such layer is in the group)."""
    parts = []
    for m in group.members:
        if m.is_buffer or m.dim != 0 or not m.name.endswith(".weight"):
            continue
        mod = model.get_submodule(m.module)
        if not isinstance(mod, _PRODUCERS):
            continue
        w = mod.weight.detach().double()
        rows = w.reshape(w.shape[0], -1)
        order = np.argsort(m.unit_of, kind="stable")
        counts = np.bincount(m.unit_of, minlength=group.n_units)
        if counts.min() != counts.max():
            return None  # uneven units: not a filter-per-unit group
        per_unit = rows[torch.from_numpy(order)].reshape(group.n_units, -1)
        norms = per_unit.norm(dim=1, keepdim=True)
        parts.append(per_unit / torch.where(norms > 0, norms, torch.ones_like(norms)))
    if not parts:
        return None
    return torch.cat(parts, 1)


def filter_clusters(
    model: nn.Module,
    example_inputs: Any,
    tau: float,
    linkage: str = "average",
    graph: DependencyGraph | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{group name: (labels (n_units,), keep (n_units,) bool)}`` for every prunable group with a
    producing conv/linear layer: clusters of cosine similarity ``>= tau`` and one kept filter each.

    Raises:
        ConfigError: ``tau`` outside [-1, 1] or an unknown linkage.
    """
    if graph is None:
        graph = DependencyGraph.build(model, example_inputs)
    out = {}
    for g in graph.groups:
        if g.n_prunable == 0:
            continue
        f = group_filters(g, model)
        if f is not None and f.shape[0] > 1:
            out[g.name] = redundant_features(f, tau, linkage)
    return out


def _scores_for(
    f: torch.Tensor, g: Group, tau: float | None, ratio: float | None, linkage: str
) -> np.ndarray:
    """Per-unit array: ``-similarity`` (finite) for the filters to remove, ``inf`` for those kept."""
    n = g.n_units
    unit = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    prunable = torch.from_numpy(g.prunable)
    if tau is not None:
        labels, keep = redundant_features(f, tau, linkage)
        rm = ~keep & prunable
        target = int(rm.sum())
    else:
        assert ratio is not None
        target = min(int(math.floor(ratio * int(prunable.sum()) + 1e-9)), n - 1)
        lo, hi = -1.0, 1.0  # removed(τ) is non-increasing in τ; find the largest τ removing >= target
        labels, keep = redundant_features(f, lo, linkage)
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            lab, kp = redundant_features(f, mid, linkage)
            if int((~kp & prunable).sum()) >= target:
                lo, labels, keep = mid, lab, kp
            else:
                hi = mid
        rm = ~keep & prunable
    # similarity of each filter to its cluster's kept representative; removed ones sorted by it
    rep = torch.zeros(n, dtype=torch.long)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        kept = members[keep[members]]
        rep[members] = kept[0] if kept.numel() else members[0]
    sim = (unit * unit[rep]).sum(1)
    scores = np.full(n, np.inf)
    idx = rm.nonzero().flatten()
    chosen = idx[torch.argsort(sim[idx], descending=True, stable=True)[:target]]
    scores[chosen.numpy()] = -sim[chosen].numpy()
    return scores


def prune_redundant(
    model: nn.Module,
    example_inputs: Any,
    tau: float | None = None,
    ratio: float | None = None,
    linkage: str = "average",
    protect: Sequence[str] = (),
    verify: bool = False,
) -> tuple[nn.Module, dict]:
    """Cluster every prunable group's filters, keep one per cluster, remove the rest through the graph.

    Args:
        tau: cosine-similarity threshold in [-1, 1] (Ayinde & Zurada 2018), or
        ratio: fraction in [0, 1) of each group's prunable filters to remove (exactly one of the two).
        linkage: ``"single"``, ``"complete"`` or ``"average"``.

    Returns ``(model, plan)``; retrain afterwards. Raises ConfigError for bad arguments (model unchanged)
    and as :func:`secateur.methods.slimming.prune_groups`.
    """
    if (tau is None) == (ratio is None):
        raise ConfigError("prune_redundant: give exactly one of tau (threshold) or ratio (budget)")
    if tau is not None and not -1.0 <= tau <= 1.0:
        raise ConfigError(f"prune_redundant: tau must be in [-1, 1], got {tau!r}")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ConfigError(f"prune_redundant: ratio must be in [0, 1), got {ratio!r}")
    if linkage not in ("single", "complete", "average"):
        raise ConfigError(f"prune_redundant: unknown linkage {linkage!r}")
    graph = DependencyGraph.build(model, example_inputs, protect=protect)
    removed: dict[int, np.ndarray] = {}
    for gi, g in enumerate(graph.groups):
        if g.n_prunable == 0:
            continue
        f = group_filters(g, model)
        if f is None or f.shape[0] < 2:
            continue
        s = _scores_for(f, g, tau, ratio, linkage)
        rm = np.nonzero(np.isfinite(s))[0]
        rm = rm[g.prunable[rm]]
        if rm.size >= g.n_units:
            rm = rm[rm != int(np.argmax(s))]
        rm = ensure_member_nonempty(g, rm, np.where(np.isfinite(s), s, 1e9))
        if rm.size:
            removed[gi] = rm
    return remove_units(model, graph, removed, example_inputs, verify=verify)
