"""Attention-head pruning in one call: only the head groups of the dependency graph are pruned.

    model, plan = prune_heads(model, example_inputs, sparsity=0.25, criterion="michel", data=batches,
                              loss_fn=lambda out, y: F.cross_entropy(out.logits, y))
    secateur.save_pretrained(model, "out/", plan)

The same thin call of the structured driver as :func:`~secateur.pruners.oneshot.prune_channels`, with
``granularity="head"``: :class:`~secateur.pruners.channel.ChannelPruner` keeps only the groups whose units
are attention heads (:func:`~secateur.criteria.group.head_group_ids`), scores and allocates them, and
:func:`~secateur.pruners.oneshot.remove_units` compacts under the oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from secateur.criteria.group import GroupCriterion
from secateur.graph.groups import DependencyGraph, Group
from secateur.pruners.oneshot import prune_channels

__all__ = ["prune_heads"]


def prune_heads(
    model: nn.Module,
    example_inputs: Any,
    sparsity: float,
    *,
    criterion: str | GroupCriterion | Callable[[Group, nn.Module], Any] = "michel",
    allocation: str | None = None,
    data: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    protect: Sequence[str] = (),
    round_to: int = 1,
    seed: int = 0,
    untraced: str = "error",
    criterion_kwargs: dict[str, Any] | None = None,
    verify: bool = True,
    graph: DependencyGraph | None = None,
    skip_incompatible: bool = False,
    loadable: bool = False,
) -> tuple[nn.Module, dict]:
    """Remove a fraction ``sparsity`` of the model's prunable attention heads and compact it in place.

    ``prune_channels(..., granularity="head")`` with head-pruning defaults. With ``"global"`` allocation
    the lowest-scoring heads over all layers go until at least ``sparsity · H`` of the ``H`` prunable heads
    are removed (``ceil``); with ``"uniform"``, ``floor(sparsity · h_l)`` heads of each layer ``l``. Only
    head groups are touched: FFN neurons and hidden channels keep their size.

    Args:
        model: any model whose attention the dependency graph traces (Hugging Face encoders and decoders,
            the zoo ViT, ...); changed in place and returned.
        example_inputs: a tensor, tuple or dict of keyword inputs (traced once).
        sparsity: fraction of the prunable heads to remove, in [0, 1). Every layer keeps at least one head.
        criterion: a registered group criterion name (``"michel"``: Michel et al. 2019 head-gate gradients,
            the default; ``"taylor"``, ``"fisher"``, ``"l1"``, ``"random"``, ...), an instance, or
            ``f(group, model) -> (n_heads,) scores`` (higher = keep). With grouped-query attention a unit is
            one key/value head with the query heads sharing it.
        allocation: ``"global"`` (one ranking over all layers, as Michel et al. prune; scores are compared
            as the criterion makes them comparable, see :class:`ChannelPruner`) or ``"uniform"`` (the same
            number from every layer). Default: ``"global"``, or ``"uniform"`` with ``loadable=True``.
        data, loss_fn: calibration batches ``(x, y)`` (``x`` may be a dict of keyword inputs) and
            ``loss_fn(output, y)`` for data-dependent criteria.
        protect: module name patterns whose heads are kept.
        round_to, seed, untraced, graph, skip_incompatible: as :func:`prune_channels`.
        criterion_kwargs: passed to the criterion (e.g. ``{"per_example": False}``).
        verify: run the masked-equals-compacted oracle inside the compaction transaction.
        loadable: a Hugging Face model only: require a result its own ``config.json`` describes (the same
            number of heads from every layer, checked on the meta device before anything changes), so that
            ``model.save_pretrained`` then plain ``transformers`` ``from_pretrained`` reload it (see
            :func:`prune_channels`). Under grouped-query attention a unit is one KV head with its query
            heads, so ``num_attention_heads / num_key_value_heads`` stays whole; families that derive the
            head size as ``hidden / heads`` (BERT, GPT-2, Falcon, ...) are refused naming
            ``num_attention_heads``. Multi-query attention (one KV head) has no such unit: prune its query
            heads with ``secateur.llm.prune_decoder(..., gqa="query_heads")``.

    Returns ``(model, plan)``; pass ``plan`` to :func:`secateur.save_pretrained` / :func:`secateur.save`.

    Transactional under any ``BaseException``: scoring leaves the weights as they were (only ``.grad``
    fields are used, and restored), and a failure or a ``KeyboardInterrupt`` while compacting puts the model
    back bit-identical before re-raising. The criterion's hooks are removed before returning.

    Raises:
        ConfigError: bad sparsity / criterion / allocation, no attention heads found, a data-dependent
            criterion without ``data``, or ``verify`` with NaN/Inf in ``example_inputs``. The model is
            untouched then.
        UnloadableShapeError: ``loadable=True`` and the config cannot express the pruned heads (names the
            field, e.g. ``num_attention_heads``, and how to reach a loadable shape); the model is untouched.
        CompactionError: compaction or verification failed (rolled back).
    """
    return prune_channels(
        model,
        example_inputs,
        sparsity,
        criterion=criterion,
        allocation=allocation if allocation is not None else ("uniform" if loadable else "global"),
        target="channels",
        protect=protect,
        round_to=round_to,
        seed=seed,
        untraced=untraced,
        data=data,
        loss_fn=loss_fn,
        criterion_kwargs=criterion_kwargs,
        verify=verify,
        graph=graph,
        skip_incompatible=skip_incompatible,
        granularity="head",
        loadable=loadable,
    )
