"""Attention-head pruning in one call: only the head groups of the dependency graph are pruned.

    model, plan = prune_heads(model, example_inputs, ratio=0.25, criterion="michel", data=batches,
                              loss_fn=lambda out, y: F.cross_entropy(out.logits, y))
    secateur.save_pretrained(model, "out/", plan)

A composition of existing pieces: the graph is traced (:class:`~secateur.graph.DependencyGraph`), every
group that is not attention heads (:func:`~secateur.criteria.group.head_group_ids`) is frozen, and a one-shot
:class:`~secateur.pruners.channel.ChannelPruner` scores, allocates, masks and compacts (with the oracle).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur.compact import require_finite_inputs, restoring
from secateur.criteria.group import GroupCriterion, head_group_ids
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group
from secateur.pruners.channel import ChannelPruner, MaskRestorePoint

__all__ = ["prune_heads"]


def prune_heads(
    model: nn.Module,
    example_inputs: Any,
    ratio: float,
    *,
    criterion: str | GroupCriterion | Callable[[Group, nn.Module], Any] = "michel",
    allocation: str = "global",
    data: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    protect: Sequence[str] = (),
    criterion_kwargs: dict[str, Any] | None = None,
    verify: bool = True,
) -> tuple[nn.Module, dict]:
    """Remove a fraction ``ratio`` of the model's prunable attention heads and compact it in place.

    With ``"global"`` allocation the lowest-scoring heads over all layers go until at least ``ratio · H``
    of the ``H`` prunable heads are removed (``ceil``); with ``"uniform"``, ``floor(ratio · h_l)`` heads of
    each layer ``l``. Only head groups are touched: FFN neurons and hidden channels keep their size.

    Args:
        model: any model whose attention the dependency graph traces (Hugging Face encoders and decoders,
            the zoo ViT, ...); changed in place and returned.
        example_inputs: a tensor, tuple or dict of keyword inputs (traced once).
        ratio: fraction of the prunable heads to remove, in [0, 1). Every layer keeps at least one head.
        criterion: a group criterion name (``"michel"``: Michel et al. 2019 head-gate gradients, the default;
            ``"taylor"``, ``"fisher"``, ``"l1"``, ``"random"``, ...), an instance, or ``f(group, model) ->
            (n_heads,) scores`` (higher = keep). With grouped-query attention a unit is one key/value head
            with the query heads sharing it.
        allocation: ``"global"`` (one ranking over all layers, as Michel et al. prune; scores are compared
            as the criterion makes them comparable, see :class:`ChannelPruner`) or ``"uniform"`` (the same
            number from every layer).
        data, loss_fn: calibration batches ``(x, y)`` (``x`` may be a dict of keyword inputs) and
            ``loss_fn(output, y)`` for data-dependent criteria.
        protect: module name patterns whose heads are kept.
        criterion_kwargs: passed to the criterion (e.g. ``{"per_example": False}``).
        verify: run the masked-equals-compacted oracle inside the compaction transaction.

    Returns ``(model, plan)``; pass ``plan`` to :func:`secateur.save_pretrained` / :func:`secateur.save`.

    Transactional under any ``BaseException``: the head groups' weights are copied before they are masked
    (:class:`~secateur.pruners.channel.MaskRestorePoint`), and a failure or a ``KeyboardInterrupt`` while
    scoring, masking or compacting puts the model back bit-identical (no masks left) before re-raising.

    Raises:
        ConfigError: bad ratio / criterion / allocation, no attention heads found, a data-dependent
            criterion without ``data``, or ``verify`` with NaN/Inf in ``example_inputs``. The model is
            untouched then.
        CompactionError: compaction or verification failed (rolled back).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"prune_heads: ratio must be in [0, 1), got {ratio!r}")
    if verify:
        require_finite_inputs(example_inputs)
    graph = DependencyGraph.build(model, example_inputs, protect=protect)
    heads = set(head_group_ids(graph))
    if not any(graph.groups[gi].n_prunable for gi in heads):
        raise ConfigError(
            f"prune_heads: no prunable attention heads found in {type(model).__name__} "
            f"({len(heads)} head groups, all protected or frozen)"
        )
    for gi, g in enumerate(graph.groups):
        if gi not in heads and g.n_prunable:
            g.prunable = np.zeros_like(g.prunable)
            g.reasons.append("not an attention head (prune_heads)")
    pruner = ChannelPruner(
        model,
        example_inputs,
        schedule=float(ratio),
        criterion=criterion,
        allocation=allocation,
        target="channels",
        data=data,
        loss_fn=loss_fn,
        criterion_kwargs=criterion_kwargs,
        graph=graph,
    )
    point = MaskRestorePoint(model, [m.name for gi in heads for m in graph.groups[gi].members])
    try:
        with restoring(point.restore):
            pruner.step(0)
            model = pruner.finalize(verify=verify)
    finally:
        pruner.criterion.detach()
    assert pruner.plan is not None
    return model, pruner.plan
