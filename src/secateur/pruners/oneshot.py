"""One call that physically removes channels, features and attention heads.

    model, plan = prune_channels(model, example_inputs, sparsity=0.3, criterion="l1")

A thin call of the structured driver: :class:`~secateur.pruners.channel.ChannelPruner` traces the graph,
scores the groups with a registered group criterion and allocates (:meth:`ChannelPruner.select`, the model
untouched), then :func:`remove_units` plans and compacts in one transaction, under the float64 oracle.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur._validate import check_model, check_name_patterns, check_round_to, check_sparsity
from secateur.compact import NonFiniteOutputError, compact, make_plan, require_finite_inputs
from secateur.compact.verify import incompatible_groups, verified_compact
from secateur.criteria.group import GroupCriterion
from secateur.errors import CompactionError, ConfigError, IncompatibleGroupError
from secateur.graph.groups import DependencyGraph, Group
from secateur.graph.symbolic import ShapeConflictError
from secateur.io.loadable import UnloadableShapeError, is_hf_model, planned_load_problems, refuse_plain_save
from secateur.pruners.channel import ChannelPruner, GroupSelection

__all__ = ["prune_channels", "remove_units"]

Criterion = Callable[[Group, nn.Module], Any]


def prune_channels(
    model: nn.Module,
    example_inputs: Any,
    sparsity: float = 0.3,
    *,
    criterion: str | GroupCriterion | Criterion = "l1",
    allocation: str = "uniform",
    target: str = "channels",
    protect: Sequence[str] = (),
    round_to: int | None = None,
    seed: int = 0,
    prune_outputs: bool = False,
    prune_normalized: bool = False,
    untraced: str = "error",
    data: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    criterion_kwargs: dict[str, Any] | None = None,
    verify: bool = True,
    graph: DependencyGraph | None = None,
    skip_incompatible: bool = False,
    granularity: str = "channel",
    groups: GroupSelection | None = None,
    normalize: str = "auto",
    loadable: bool = False,
) -> tuple[nn.Module, dict]:
    """Remove ``sparsity`` of the prunable units (channels, features, heads) and compact ``model`` in place.

    A thin call of the structured driver: ``ChannelPruner(..., schedule=sparsity).select(sparsity)`` scores
    and allocates, then :func:`remove_units` compacts under the oracle. With the defaults (``"uniform"``,
    ``"channels"``) each group loses ``floor(sparsity · n_prunable)`` of its lowest-scoring units (fewer when
    ``round_to`` or a member would empty; at least one unit stays).

    Args:
        model: any ``nn.Module``; changed in place and returned.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        sparsity: fraction to remove, in [0, 1): of each group's prunable units (uniform, channels), or of
            the ``target`` resource.
        criterion: a registered group criterion name (:data:`secateur.criteria.group.GROUP_CRITERIA`:
            ``"l1"``, ``"l2"``, ``"random"``, ``"fpgm"``, ``"bn_scale"``, ``"taylor"``, ``"fisher"``,
            ``"michel"``, ...), a :class:`~secateur.criteria.group.GroupCriterion`, or
            ``f(group, model) -> (n_units,) scores`` (higher = keep).
        allocation: ``"uniform"`` (the same fraction of every group) or ``"global"`` (one ranking over all
            groups, scores normalised as :class:`~secateur.pruners.channel.ChannelPruner` says).
        target: ``"channels"``, ``"params"``, ``"macs"`` or ``"latency"``: what ``sparsity`` is a fraction of.
        protect: module name patterns never pruned (fnmatch; ``"re:..."`` for a regex).
        round_to: kept unit counts are multiples of this (a group smaller than it is left whole). Default
            1; with ``loadable=True`` and ``granularity="channel"``, 8 (MLP and hidden widths multiples of 8,
            as tensor cores and SIMD kernels want; head groups of fewer than 8 units then stay whole: pass
            ``round_to=1`` or use :func:`~secateur.pruners.heads.prune_heads` for heads).
        seed: seed of the ``"random"`` criterion.
        prune_outputs: allow pruning dims that reach the model's outputs.
        prune_normalized: also prune dims that normalisation modules (LayerNorm, RMSNorm, ...) normalise,
            e.g. a transformer's hidden size (:meth:`DependencyGraph.build`; exact: the masks compute the
            norm's statistics over kept channels).
        untraced: ``"error"`` or ``"freeze"``: what to do with parameterised modules no trace reached
            (:meth:`DependencyGraph.build`).
        data, loss_fn: calibration batches ``(x, y)`` and ``loss_fn(output, y)`` for data-dependent
            criteria (taylor, fisher, michel).
        criterion_kwargs: passed to the criterion's constructor.
        verify: run the oracle (masked copy vs compacted model, float64, every output finite and within
            ``1e-6 ×`` its magnitude: :func:`secateur.compact.check_equivalence`) and roll back on failure
            (default: a wrong model is never returned; costs a deep copy and two float64 forwards, so
            pass ``verify=False`` for timing or for models too large to copy). Needs finite
            ``example_inputs``.
        graph: a graph already traced from ``model`` (then leave protect/prune_outputs/prune_normalized/
            untraced at their defaults).
        skip_incompatible: with ``verify``, leave whole the groups whose removal breaks the model (see
            :func:`remove_units`) instead of raising IncompatibleGroupError.
        granularity: ``"channel"`` (every group) or ``"head"`` (attention heads only; :func:`prune_heads`).
        groups: only these group indices (or ``f(graph) -> indices``) may be pruned; default all.
        normalize: how ``"global"`` allocation rescales each group's scores (``"auto"``, ``"mean"``,
            ``"max"``, ``"none"``; see :class:`~secateur.pruners.channel.ChannelPruner`).
        loadable: a Hugging Face model only: require a result whose own ``config.json`` describes it, so that
            ``model.save_pretrained`` then plain ``transformers`` ``from_pretrained`` reload it. Needs
            ``allocation="uniform"`` (the same count from every layer's group) and no ``skip_incompatible``;
            the plan's rewritten config is built on the meta device and compared with the pruned shapes
            *before* anything changes (:func:`secateur.io.loadable.planned_load_problems`). Under
            grouped-query attention a head unit is one KV head with its query heads, so the query-per-KV
            ratio stays whole.

    Whatever ``loadable`` says, a pruned Hugging Face model's own ``save_pretrained`` is guarded: it raises
    :class:`~secateur.io.pretrained.UnloadableConfigError` naming the field when the config cannot describe
    the model (checked when called: :func:`secateur.io.loadable.refuse_plain_save`; save with
    :func:`secateur.save_pretrained` instead).

    Returns ``(model, plan)``; ``plan`` is plain JSON-serialisable data (:func:`secateur.compact.make_plan`).

    Transactional: on any exception, ``KeyboardInterrupt`` included, the model is left as it was (the
    interrupt is re-raised after the rollback). The criterion's hooks are removed before returning.

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module`` or has meta tensors.
        ConfigError: bad sparsity (a string such as ``"0.5"`` included), ``round_to``, ``protect``,
            criterion, allocation or target; ``loadable=True`` on a model that is not a Hugging Face model,
            with ``allocation="global"`` or ``skip_incompatible``; a data-dependent criterion without
            ``data``; ``verify`` with NaN/Inf in ``example_inputs`` (all before anything is traced or
            changed).
        GraphError: every group is frozen (names the most common reasons); from tracing.
        UnsupportedOpError / UntracedModuleError: from tracing.
        IncompatibleGroupError: removing some groups breaks the model (named with the op and module).
        UnloadableShapeError: ``loadable=True`` and the selected removal is not expressible by the config
            (names each config field and how to reach a loadable shape); the model is unchanged.
        CompactionError: compaction (or verification) failed; the model is unchanged.
    """
    check_model(model)
    sparsity = check_sparsity(sparsity)
    round_to = check_round_to(_default_round_to(round_to, loadable, granularity))
    if loadable:
        _check_loadable_request(model, allocation, skip_incompatible)
    protect = check_name_patterns(protect)
    if verify:
        require_finite_inputs(example_inputs)
    pruner = ChannelPruner(
        model,
        example_inputs,
        schedule=sparsity,
        criterion=criterion,
        allocation=allocation,
        target=target,
        protect=protect,
        round_to=round_to,
        data=data,
        loss_fn=loss_fn,
        prune_outputs=prune_outputs,
        prune_normalized=prune_normalized,
        criterion_kwargs=criterion_kwargs,
        graph=graph,
        granularity=granularity,
        groups=groups,
        normalize=normalize,
        untraced=untraced,
        seed=seed,
    )
    try:
        removed = pruner.select(sparsity)
    finally:
        pruner.close()
    removed = {gi: rm for gi, rm in removed.items() if rm.size}
    if loadable:
        problems = planned_load_problems(model, make_plan(pruner.graph, removed))
        if problems:
            raise UnloadableShapeError(
                f"loadable=True: {type(model).__name__}'s config.json cannot describe the pruned model: "
                f"{'; '.join(problems)}. Nothing was changed"
            )
    model, plan = remove_units(
        model, pruner.graph, removed, example_inputs, verify=verify, skip_incompatible=skip_incompatible
    )
    refuse_plain_save(model, plan)
    return model, plan


def _default_round_to(round_to: int | None, loadable: bool, granularity: str) -> int:
    """``round_to`` as given; when None, 8 for ``loadable=True`` channel pruning (hardware-friendly widths),
    else 1 (heads are counted in units, never rounded by default)."""
    if round_to is not None:
        return round_to
    return 8 if loadable and granularity == "channel" else 1


def _check_loadable_request(model: nn.Module, allocation: str, skip_incompatible: bool) -> None:
    """Refuse ``loadable=True`` where it cannot hold by construction (before anything is traced)."""
    if not is_hf_model(model):
        raise ConfigError(
            f"loadable=True asks for a result plain transformers reloads from its config.json, but "
            f"{type(model).__name__} is not a Hugging Face PreTrainedModel (no config / save_pretrained)"
        )
    if allocation != "uniform":
        raise ConfigError(
            f"loadable=True needs allocation='uniform' (a config holds one head count and one MLP width for "
            f"every layer; allocation={allocation!r} gives layers different counts)"
        )
    if skip_incompatible:
        raise ConfigError(
            "loadable=True with skip_incompatible=True: groups left whole in some layers would give layers "
            "different widths; protect the incompatible modules instead"
        )


def remove_units(
    model: nn.Module,
    graph: DependencyGraph,
    removed: dict[int, np.ndarray],
    example_inputs: Any,
    verify: bool = False,
    skip_incompatible: bool = False,
) -> tuple[nn.Module, dict]:
    """Plan the removal of ``{group index: unit indices}`` and compact ``model`` in place.

    With ``verify`` the compacted model must run and equal the masked one (float64, relative tolerance 1e-6:
    :func:`secateur.compact.check_equivalence`) inside the transaction
    (:func:`secateur.compact.verify.verified_compact`); ``example_inputs`` must then be finite. When it does
    not, each group is tried alone to find the ones at fault (a model that derives a width from another
    dimension, such as torchvision's Swin v1 attention): with ``skip_incompatible`` those groups are left
    whole (listed in ``plan["skipped"]`` with the reason, and a warning) and the rest is removed; otherwise
    IncompatibleGroupError names them. Returns ``(model, plan)``.

    Every compaction here is a transaction (:func:`secateur.compact.compact`): on any exception or
    interrupt the model is as it was before the call (each probe and attempt rolls back before the next).

    Raises:
        ConfigError: ``verify`` with NaN/Inf in ``example_inputs`` (the model is not touched).
        IncompatibleGroupError: ``verify`` found groups whose removal breaks the model (names each group,
            the op and the module); the model is unchanged. Its subclass ShapeConflictError (raised while
            planning, with or without ``verify``): a size the model's code computes would not match the
            pruned tensors (names the op, module, file and line).
        CompactionError: planning, slicing or verification failed; the model is unchanged.
    """
    if verify:
        require_finite_inputs(example_inputs)
    if not verify:
        plan = make_plan(graph, removed)
        compact(model, plan)
        return model, plan
    try:
        plan = make_plan(graph, removed)  # ShapeConflictError: a size the model computes would not match
        verified_compact(model, plan, example_inputs)
        return model, plan
    except CompactionError as e:
        if isinstance(e, ShapeConflictError) and not skip_incompatible:
            raise  # already names the groups, op, module, file and line
        if isinstance(e, NonFiniteOutputError) and e.in_reference:
            raise  # the masked model itself outputs NaN/Inf on these inputs: no group is at fault
        bad = incompatible_groups(model, graph, removed, example_inputs)
        if not bad:
            raise
        why = {graph.groups[gi].name: msg for gi, msg in bad.items()}
        if not skip_incompatible:
            lines = "\n".join(f"  group {n}: {m}" for n, m in why.items())
            raise IncompatibleGroupError(
                f"removing units of {len(bad)} group(s) breaks the model (its code derives a shape from a "
                f"dimension these groups do not change, or the outputs differ); the model is unchanged:\n"
                f"{lines}\nProtect those modules, or pass skip_incompatible=True to leave these groups whole."
            ) from e
    kept = {gi: rm for gi, rm in removed.items() if gi not in bad}
    plan = make_plan(graph, kept)
    try:
        verified_compact(model, plan, example_inputs)
    except CompactionError:  # the first pass found shape breakers only; now those whose outputs differ
        more = incompatible_groups(model, graph, kept, example_inputs)
        if not more:
            raise
        why.update({graph.groups[gi].name: msg for gi, msg in more.items()})
        plan = make_plan(graph, {gi: rm for gi, rm in kept.items() if gi not in more})
        verified_compact(model, plan, example_inputs)
    shown = "; ".join(f"{n}: {m}" for n, m in list(why.items())[:3])
    more = f" (and {len(why) - 3} more, listed in plan['skipped'])" if len(why) > 3 else ""
    warnings.warn(
        f"left {len(why)} group(s) whole because removing their units breaks the model: {shown}{more}",
        stacklevel=2,
    )
    plan["skipped"] = why
    return model, plan
