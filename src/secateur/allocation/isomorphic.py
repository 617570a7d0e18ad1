"""Isomorphic pruning: rank units only among structurally identical groups, one ratio shared by all classes.

Fang et al., "Isomorphic Pruning for Vision Models" (ECCV 2024), sec. 3: sub-structures of a network that
differ in structure (an attention head, an MLP neuron, a residual channel) have importance scores of
different distributions, so one global ranking over all of them is biased toward removing whole kinds of
structure, while layer-wise ratios ignore that some layers matter less. Isomorphic pruning splits the
groups into *isomorphic classes* (groups whose sub-graphs are the same), ranks the units of each class
globally (across layers: all attention heads of a ViT against each other, all MLP neurons against each
other) and removes the same fraction of every class.

Here a group's structure is its :func:`group_signature`: the multiset of its members' (module class,
parameter name, pruned dim, buffer or not, indices per unit), plus whether its units are attention heads
(:func:`secateur.criteria.group.head_group_ids`). Sizes are not part of it (as Torch-Pruning's
``isomorphic=True`` key, which is built from module types and pruned dims): the 64- and 128-channel blocks
of a ResNet with the same layers are one class. Groups whose signatures are equal form a class
(:func:`isomorphic_classes`); :func:`isomorphic_removal` removes a shared ratio of each class's prunable
units by a global ranking within the class (:func:`secateur.allocation.structured.global_removal` over a
unit-count cost), and :func:`isomorphic_removal_for` finds the ratio that removes a fraction of a resource
(parameters, MACs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn
from torch.nn.utils import parametrize

from secateur.allocation.search import smallest_reaching
from secateur.allocation.structured import CostModel, Removal, channel_cost, global_removal
from secateur.criteria.group import head_group_ids
from secateur.graph.groups import DependencyGraph, Group

__all__ = ["group_signature", "isomorphic_classes", "isomorphic_removal", "isomorphic_removal_for"]

_EPS = 1e-12


def _module_class(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def group_signature(model: nn.Module, group: Group, heads: bool = False) -> tuple:
    """The structure of ``group``: ``(heads, sorted member signatures)``.

    A member's signature is ``(module class name, depthwise, parameter name, dim, is_buffer, indices per
    unit)``: the class of the module holding it (the user's class, not the generated class of a
    parametrized module), whether that module is a grouped convolution (``groups > 1``), the parameter or
    buffer's own name (``"weight"``, ``"bias"``, ``"running_mean"``), the pruned dim, and how many indices of
    that dim each unit owns (1 for channels, ``head_dim`` for a head's query rows, a flattened spatial size
    for a linear after a flatten), rounded to 6 digits.
    """
    members = []
    for m in group.members:
        path, _, attr = m.name.rpartition(".")
        mod = _module_class(model, path)
        cls = type(mod)
        if mod is not None and parametrize.is_parametrized(mod):
            cls = cls.__bases__[0]  # parametrize swaps in a generated subclass of the user's class
        grouped = bool(getattr(mod, "groups", 1) != 1)
        per_unit = round(len(m.unit_of) / max(group.n_units, 1), 6)
        members.append((cls.__name__, grouped, attr, int(m.dim), bool(m.is_buffer), per_unit))
    return (bool(heads), tuple(sorted(members)))


def isomorphic_classes(model: nn.Module, graph: DependencyGraph, group_ids: Sequence[int]) -> list[list[int]]:
    """``group_ids`` split into classes of equal :func:`group_signature`: a list of classes, each the sorted
    group indices of one signature, classes ordered by their first group."""
    heads = set(head_group_ids(graph, group_ids))
    by_sig: dict[tuple, list[int]] = {}
    for gi in group_ids:
        by_sig.setdefault(group_signature(model, graph.groups[gi], gi in heads), []).append(int(gi))
    return sorted((sorted(ids) for ids in by_sig.values()), key=lambda ids: ids[0])


def isomorphic_removal(
    groups: Sequence[Group],
    scores: Mapping[int, np.ndarray],
    removed: Mapping[int, np.ndarray],
    classes: Sequence[Sequence[int]],
    ratio: float,
    round_to: int = 1,
) -> Removal:
    """Remove ``ratio`` of every class's prunable units, each class by one ranking over its groups.

    Within a class the lowest-scoring units (chunks of ``round_to``) go first whatever their group
    (:func:`secateur.allocation.structured.global_removal` with a unit-count cost over the class), until at
    least ``ratio`` of the class's prunable units are removed (units in ``removed`` count and stay removed),
    every group keeping ``round_to`` units and every member an index. Scores are compared only within a
    class: a unit's score never decides a unit of another class.

    Returns ``{group index: sorted int64 unit indices}`` for every group of ``scores`` and ``removed``; groups
    without scores are left as ``removed`` has them.
    """
    out: dict[int, np.ndarray] = {gi: np.asarray(rm, dtype=np.int64) for gi, rm in removed.items()}
    for cls in classes:
        ids = [gi for gi in cls if gi in scores]
        if not ids:
            continue
        sub_scores = {gi: scores[gi] for gi in ids}
        sub_removed = {gi: out.get(gi, np.zeros(0, dtype=np.int64)) for gi in ids}
        rm, _ = global_removal(groups, sub_scores, sub_removed, channel_cost(groups, ids), ratio, round_to)
        out.update(rm)
    return out


def isomorphic_removal_for(
    groups: Sequence[Group],
    scores: Mapping[int, np.ndarray],
    removed: Mapping[int, np.ndarray],
    classes: Sequence[Sequence[int]],
    cost: CostModel,
    target: float,
    round_to: int = 1,
) -> Removal:
    """The :func:`isomorphic_removal` at the smallest shared ratio that removes ``target`` of ``cost``'s
    resource (bisection over the ratio, 40 halvings of [0, 1]: the removal grows with the ratio, each class
    along its own fixed ranking); the removal at ratio 1.0 if none does."""

    def at(ratio: float) -> Removal:
        return isomorphic_removal(groups, scores, removed, classes, ratio, round_to)

    def reaches(ratio: float) -> bool:
        return cost.state(at(ratio)).removed_fraction() >= target - _EPS

    return at(smallest_reaching(reaches, hi=1.0, steps=40)[1])
