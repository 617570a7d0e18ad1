"""ChannelPruner: THE structured driver (channels, attention heads, FFN neurons): graph, criterion,
allocation, then masks (training) or removal (one-shot), then compaction through the oracle.

The structured counterpart of :class:`secateur.pruners.element.Pruner`, with torch.ao.pruning's split of
*what* (criterion over graph groups, allocation, target) from *when* (a :mod:`secateur.schedules`
schedule)::

    pruner = ChannelPruner(model, x, schedule=Iterative(0.5, steps=5, every=100), criterion="taylor",
                           allocation="global", target="macs")
    for step, (x, y) in enumerate(loader, 1):       # the user's own loop
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
        pruner.accumulate()                          # data-dependent criteria only (taylor)
        opt.step(); pruner.step(step)                # the schedule decides when masks change
    model = pruner.finalize()                        # physical removal; pruner.plan is the JSON plan

One-shot entry points (:func:`secateur.pruners.oneshot.prune_channels`,
:func:`secateur.pruners.heads.prune_heads`) are thin calls: :meth:`ChannelPruner.select` scores and allocates
without touching the model, and :func:`secateur.pruners.oneshot.remove_units` compacts under the oracle.

The graph (:class:`secateur.graph.DependencyGraph`) is traced once at construction. Removed units are
masked: every parameter slice of a removed unit gets an element mask (:func:`secateur.masks.set_mask`, a
parametrization, so it stays exactly zero through training whatever the optimizer does) and buffers
such as BatchNorm running statistics are zeroed, exactly what :func:`secateur.compact.mask_model` zeroes,
so the masked model computes what the compacted one will. Removed units stay removed. An element mask
already on a parameter (an element-wise :class:`~secateur.pruners.element.Pruner`) is kept and ANDed with
ours.
Tied parameters (one tensor under two module names) are masked on their canonical owner and the stored
tensor is re-zeroed at every :meth:`ChannelPruner.step`, since the other owner reads it unmasked.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur._validate import check_model, check_name_patterns, check_round_to, check_sparsity
from secateur.allocation.isomorphic import isomorphic_classes, isomorphic_removal, isomorphic_removal_for
from secateur.allocation.sensitivity import (
    calibration_loss,
    group_sensitivity,
    max_tolerance,
    sensitivity_removal,
    sensitivity_removal_for,
)
from secateur.allocation.structured import (
    ALLOCATIONS,
    NORMALIZERS,
    TARGETS,
    Removal,
    build_cost_model,
    global_removal,
    normalise_scores,
    uniform_removal,
    uniform_removal_for,
)
from secateur.compact import (
    ATOL,
    RTOL,
    compact,
    interrupts_deferred,
    make_plan,
    require_finite_inputs,
    restoring,
)
from secateur.compact.norms import norm_plan, set_norm_masks
from secateur.compact.verify import verified_compact
from secateur.criteria.group import (
    GROUP_CRITERIA,
    GroupCriterion,
    collect,
    effective_tensor,
    get_group_criterion,
    head_group_ids,
    stored_parameter,
)
from secateur.errors import ConfigError, GraphError
from secateur.graph.groups import DependencyGraph, Group
from secateur.io.loadable import refuse_plain_save
from secateur.masks import get_mask, has_mask, set_mask
from secateur.masks.element import element_mask
from secateur.pruners.base import PrunerBase, check_schedule
from secateur.schedules import Schedule

__all__ = [
    "GRANULARITIES",
    "TARGETS",
    "ChannelPruner",
    "GroupSelection",
    "MaskRestorePoint",
    "require_prunable",
]

#: Which groups a structured pruner may prune: every prunable group, or only attention-head groups.
GRANULARITIES = ("channel", "head")

#: Groups a pruner may prune: indices into ``graph.groups``, or a function of the graph that returns them.
GroupSelection = Iterable[int] | Callable[[DependencyGraph], Iterable[int]]


def require_prunable(graph: DependencyGraph) -> None:
    """Raise GraphError if no group of ``graph`` has a prunable unit, with the most common reasons.

    Why: a model whose every channel is frozen (e.g. all widths normalised by an RMSNorm over channels) would
    otherwise come back unchanged, which reads as success.
    """
    if graph.prunable_groups():
        return
    counts: dict[str, int] = {}
    for g in graph.groups:
        for r in g.reasons:
            counts[r] = counts.get(r, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    why = "; ".join(f"{r} (x{n})" for r, n in top) or "no groups"
    raise GraphError(
        f"nothing to prune in {type(graph.model).__name__}: all {len(graph.groups)} groups are frozen. "
        f"Most common reasons: {why}"
    )


def _criterion(
    spec: str | GroupCriterion | Callable[[Group, nn.Module], Any],
    kwargs: Mapping[str, Any] | None,
    seed: int | None,
) -> GroupCriterion:
    """The criterion of ``spec``; ``seed`` goes to a registered criterion whose constructor takes one."""
    kwargs = dict(kwargs or {})
    if seed is not None and isinstance(spec, str) and "seed" not in kwargs:
        try:
            takes_seed = "seed" in inspect.signature(GROUP_CRITERIA.get(spec)).parameters
        except (TypeError, ValueError):  # no signature to read (a builtin): pass nothing
            takes_seed = False
        except ConfigError:  # unknown name: get_group_criterion says so with the registered names
            takes_seed = False
        if takes_seed:
            kwargs["seed"] = int(seed)
    return get_group_criterion(spec, **kwargs)


@contextlib.contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Put every buffer of ``model`` back (values, in place) when the block ends, however it ends."""
    saved = [(b, b.detach().clone()) for _, b in model.named_buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _one_kv_head_hint(model: nn.Module) -> str:
    """The way in when heads are frozen because one key/value head serves every query head (multi-query
    attention: removing that head would remove the whole layer's attention)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return ""
    kv = getattr(cfg, "num_key_value_heads", None)
    if not (getattr(cfg, "multi_query", False) or kv == 1):
        return ""
    return (
        "; its attention is multi-query (one key/value head shared by every query head), so a head group "
        "is the whole layer: remove query heads with secateur.llm.prune_decoder(model, data, "
        "gqa='query_heads')"
    )


class ChannelPruner(PrunerBase):
    """Structured pruning over dependency-graph groups: score, allocate, then mask (driven by a schedule) or
    select for one-shot removal; :meth:`finalize` compacts.

    Args:
        model: the network (changed in place: masks during training, physical removal at :meth:`finalize`).
        example_inputs: a tensor, tuple of positional inputs or dict of keyword inputs; traced once and used
            to measure MACs.
        schedule: a :mod:`secateur.schedules` object (``OneShot``, ``Iterative``, ``Cubic``) or a float for
            one-shot pruning at step 0. Its sparsity is a *fraction* in [0, 1) of ``target``.
        criterion: a registered group criterion name (:data:`secateur.criteria.group.GROUP_CRITERIA`:
            ``"random"``, ``"l1"``, ``"l2"``, ``"bn_scale"``, ``"fpgm"``, ``"taylor"``, ``"fisher"``,
            ``"michel"``, ...), a :class:`GroupCriterion`, or ``f(group, model) -> (n_units,) scores``
            (higher = keep). A criterion may score only some groups (its ``scores`` dict omits the others,
            or maps them to None): those are left whole.
        allocation: ``"uniform"`` (the same fraction of every group's prunable units; for params/MACs
            targets the common fraction is bracketed by bisection and the groups that step inside the
            bracket step one at a time, weakest first, until the target is reached:
            :func:`~secateur.allocation.structured.uniform_removal_for`), ``"global"`` (one ranking over
            all groups), ``"isomorphic"`` (Fang et al. 2024: one ranking within each class of structurally
            identical groups, e.g. all attention heads, all MLP neurons, and one ratio shared by the
            classes: :mod:`secateur.allocation.isomorphic`; scores normalised as for ``"global"``) or
            ``"sensitivity"`` (each group pruned alone at 25/50/75% of its units, the loss on ``data``
            measured, and one loss budget searched at which the groups' fractions reach the target, so
            groups whose loss rises fast are pruned less; needs ``data``; the sweep runs at every
            allocation: :func:`secateur.allocation.sensitivity.sensitivity_removal_for`).
        target: what the sparsity is a fraction of: ``"channels"`` (prunable units: channels, heads,
            neurons), ``"params"`` (all parameters of the model) or ``"macs"`` (multiply-accumulates of one
            forward on ``example_inputs``, not FLOPs) or ``"latency"`` (the dense model's *measured* latency:
            the allocation's ranking is walked and compacted copies are timed, see ``latency``). Costs per
            unit: see :class:`secateur.allocation.structured.CostModel`. With ``"uniform"`` and
            ``"channels"`` the sparsity is each group's own fraction (``floor(sparsity · n_prunable)`` units),
            never unreachable.
        protect: module name patterns never pruned (fnmatch, ``"re:..."`` for a regex).
        round_to: kept unit counts are multiples of this (a group smaller than it is left alone).
        data: a batch ``(x, y)`` or an iterable of batches for data-dependent criteria when no statistics
            were accumulated from the training loop. loss_fn: ``f(output, y)``, default cross-entropy.
        normalize: how ``"global"`` makes groups comparable before ranking: ``"mean"`` divides each group's
            scores by their mean over its alive prunable units (a group's average unit scores 1), ``"max"``
            by their max, ``"none"`` ranks raw scores; ``"auto"`` is ``"none"`` for criteria whose scores
            already estimate a loss change on one scale (taylor, fisher: Molchanov et al. 2019 rank them
            globally as they are) and ``"mean"`` otherwise (norms of differently sized layers differ).
        prune_outputs: allow pruning dims that reach the model's outputs.
        prune_normalized: allow pruning dims that norm modules normalise over (a transformer's hidden size;
            :meth:`secateur.graph.DependencyGraph.build`); the masks then make those norms compute their
            statistics over the kept channels (:mod:`secateur.compact.norms`).
        criterion_kwargs: extra arguments for the criterion (e.g. ``{"method": "sum"}`` for fpgm).
        graph: a graph already traced from ``model`` (skips the trace; then ``protect``, ``prune_outputs``,
            ``prune_normalized`` and ``untraced`` must be left at their defaults: they shape a graph when it
            is built).
        latency: for ``target="latency"``, a :class:`secateur.allocation.targets.LatencyTarget` (backend
            or timing function, inputs and batch, threads, tolerance, re-measurement of close calls), or a
            backend name: ``"eager"`` (the default, ``LatencyTarget()``) or ``"onnxruntime"`` (each candidate
            exported to ONNX in memory and timed in ONNX Runtime, 1 thread). The dense latency and the
            largest removable fraction are measured at construction, on a mask-free copy of the model.
        granularity: ``"channel"`` (default: every prunable group: conv channels, FFN neurons, heads, ...)
            or ``"head"`` (only the groups whose units are attention heads,
            :func:`secateur.criteria.group.head_group_ids`; FFN neurons and hidden channels keep their size).
        groups: restricts pruning further to these group indices (into ``graph.groups``), or to those a
            function ``f(graph) -> indices`` returns (e.g. the layers of a decoder range); frozen ones are
            ignored. Default: every prunable group of the granularity.
        untraced: modules with parameters that no trace reached: ``"error"`` (default) raises
            UntracedModuleError, ``"freeze"`` keeps them whole (:meth:`DependencyGraph.build`).
        seed: seed of a criterion that draws random numbers (``"random"``); default: the criterion's own.

    Global allocation removes units in increasing order of (normalised) score until the removed fraction
    of the target reaches the scheduled sparsity; with ``round_to > 1`` units go in chunks that keep each
    group's count a multiple of ``round_to`` (a chunk's score is its mean). Every group keeps at least one
    unit (``round_to`` units), and every member keeps at least one index (a layer fed by a concat).

    The criterion's hooks (Fisher) are attached at construction and removed by :meth:`finalize` or
    :meth:`close`; a one-shot caller that only uses :meth:`select` calls :meth:`close` (in ``finally``).

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module`` or has meta tensors.
        ConfigError: unknown criterion / allocation / target / normaliser / granularity, bad ``round_to``,
            ``protect`` or sparsity, ``graph`` together with graph-building arguments, ``"sensitivity"``
            without ``data``, an unknown latency backend, no prunable attention
            heads (``granularity="head"``), or a schedule whose final sparsity cannot be reached because of
            protected or frozen groups. Validation happens before any mask is attached: on error the model
            is untouched.
        GraphError: no prunable group at all (names the most common reasons); from tracing.
        UnsupportedOpError / UntracedModuleError: from tracing.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        schedule: Schedule | float,
        criterion: str | GroupCriterion | Callable[[Group, nn.Module], Any] = "l1",
        allocation: str = "uniform",
        target: str = "channels",
        protect: Sequence[str] = (),
        round_to: int = 1,
        data: Any = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        normalize: str = "auto",
        prune_outputs: bool = False,
        prune_normalized: bool = False,
        criterion_kwargs: dict[str, Any] | None = None,
        graph: DependencyGraph | None = None,
        latency: Any = None,
        granularity: str = "channel",
        groups: GroupSelection | None = None,
        untraced: str = "error",
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            check_model(model)  # InvalidModelError naming it (a traced graph's build checks the rest)
        schedule = check_schedule(schedule)
        if allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if target not in TARGETS:
            raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")
        if latency is not None and target != "latency":
            raise ConfigError(f"latency settings given but target is {target!r}; use target='latency'")
        if allocation == "sensitivity" and data is None:
            raise ConfigError(
                "allocation='sensitivity' needs data= (calibration batches (x, y)): each group is pruned "
                "alone and the loss on them measured"
            )
        if normalize not in NORMALIZERS:
            raise ConfigError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.round_to = check_round_to(round_to)
        protect = check_name_patterns(protect)
        if graph is not None and (protect or prune_outputs or prune_normalized or untraced != "error"):
            raise ConfigError(
                "protect/prune_outputs/prune_normalized/untraced shape the graph when it is built: pass them "
                "to DependencyGraph.build, not together with graph="
            )
        if graph is not None and graph.model is not model:
            raise ConfigError("graph was traced from another model: pass the graph of this model")
        self.model = model
        self.example_inputs = example_inputs
        self.schedule = schedule
        self.criterion = _criterion(criterion, criterion_kwargs, seed)
        self.allocation = allocation
        self.target = target
        self.granularity = granularity
        self.data = data
        self.loss_fn = loss_fn
        self.normalize = normalize
        if normalize == "auto":
            self.normalize = "none" if self.criterion.comparable else "mean"
        self.graph = graph or DependencyGraph.build(
            model,
            example_inputs,
            protect=protect,
            prune_outputs=prune_outputs,
            prune_normalized=prune_normalized,
            untraced=untraced,
        )
        self.group_ids = self._select_groups(granularity, groups)
        self.removed: dict[int, np.ndarray] = {gi: np.zeros(0, dtype=np.int64) for gi in self.group_ids}
        self.cost = build_cost_model(model, self.graph, self.group_ids, target, example_inputs)
        self.classes: list[list[int]] = (
            isomorphic_classes(model, self.graph, self.group_ids) if allocation == "isomorphic" else []
        )
        if target == "latency":
            self._init_latency(latency)
        self._max_fraction: float | None = None
        final = max([float(schedule.sparsity_at(s)) for s in getattr(schedule, "update_steps", [])] or [0.0])
        self._check_reachable(final)
        self.last_update = None
        self.history = []
        self.plan: dict | None = None
        self.compacted = False
        self._masked: dict[str, torch.Tensor] = {}  # qualname -> current keep-mask of a parameter
        self._base_masks: dict[str, torch.Tensor] = {}  # element masks found already attached
        # tied parameters: other modules read the stored tensor unmasked, so it is re-zeroed every step
        self._tied = {m.name for gi in self.group_ids for m in self.graph.groups[gi].members if m.aliases}
        self.criterion.attach(model, self.graph, self.group_ids)

    def _select_groups(self, granularity: str, groups: GroupSelection | None) -> list[int]:
        """Indices of the groups this pruner may prune: prunable, of the granularity, in ``groups``."""
        graph = self.graph
        ids = [gi for gi, g in enumerate(graph.groups) if g.n_prunable > 0]
        if granularity == "channel" and groups is None:
            require_prunable(graph)
        if granularity == "head":
            heads = head_group_ids(graph)
            head_set = set(heads)
            ids = [gi for gi in ids if gi in head_set]
            if not ids:
                raise ConfigError(
                    f"no prunable attention heads found in {type(self.model).__name__} "
                    f"({len(heads)} head groups, all protected or frozen){_one_kv_head_hint(self.model)}"
                )
        if groups is not None:
            chosen = list(groups(graph) if callable(groups) else groups)
            n = len(graph.groups)
            bad = [gi for gi in chosen if not isinstance(gi, (int, np.integer)) or not 0 <= gi < n]
            if bad:
                raise ConfigError(f"groups: {bad[:5]} are not group indices of this graph (0..{n - 1})")
            wanted = {int(gi) for gi in chosen}
            ids = [gi for gi in ids if gi in wanted]
            if not ids:
                raise ConfigError(f"groups: none of the {len(wanted)} selected groups has a prunable unit")
        return ids

    @property
    def max_fraction(self) -> float:
        """The largest fraction of the target removable under the constraints (one unit per group...)."""
        if self._max_fraction is None:
            groups = self.graph.groups
            zeros = {gi: np.zeros(groups[gi].n_units) for gi in self.group_ids}
            none = {gi: np.zeros(0, dtype=np.int64) for gi in self.group_ids}
            if self.allocation == "global":
                rm, frac = global_removal(groups, zeros, none, self.cost, math.inf, self.round_to)
            elif self.allocation == "isomorphic":
                rm = isomorphic_removal(groups, zeros, none, self.classes, 1.0, self.round_to)
                frac = self.cost.state(rm).removed_fraction()
            else:  # uniform, and sensitivity at its largest loss budget: every group at fraction 1.0
                rm = uniform_removal(groups, zeros, none, 1.0, self.round_to)
                frac = self.cost.state(rm).removed_fraction()
            self._max_fraction = self._latency_fraction(rm) if self.target == "latency" else frac
        return self._max_fraction

    # -------------------------------------------------------------------------------- latency target
    def _init_latency(self, latency: Any) -> None:
        from secateur.allocation.targets import LatencyProbe, LatencyTarget

        if isinstance(latency, str):
            latency = LatencyTarget(backend=latency)  # an unknown name: ConfigError naming the backends
        self.latency = LatencyTarget() if latency is None else latency
        if not isinstance(self.latency, LatencyTarget):
            raise ConfigError(
                f"latency must be a LatencyTarget or a backend name ('eager', 'onnxruntime'), "
                f"got {type(latency).__name__}"
            )
        # timed copies start from a mask-free copy taken now (latency depends on shapes only)
        self.latency_probe = LatencyProbe(self.latency, self.model, self.graph, self.example_inputs)
        self.dense_ms = self.latency_probe.dense_ms

    def _latency_ratio(self, removed: Mapping[int, np.ndarray], runs: int = 1) -> float:
        """Measured latency of the model compacted with ``removed`` over the dense one's: the median of at
        least ``runs`` interleaved measurements, each made once
        (:class:`secateur.allocation.targets.LatencyProbe`)."""
        return self.latency_probe.ratio(removed, runs)

    def _latency_fraction(self, removed: Mapping[int, np.ndarray]) -> float:
        return 1.0 - self._latency_ratio(removed)

    def _knob(self, scores: dict[int, np.ndarray]) -> tuple[Callable[[float], Removal], float, str]:
        """The allocation's one-dimensional knob: ``(removal at x, largest x, what that largest x means)``;
        the removal grows with ``x``. Uniform: the common per-group fraction; global: the fraction of MACs
        along the greedy ranking; isomorphic: the ratio shared by the classes; sensitivity: the loss budget
        (the sensitivity sweep runs here, once per call)."""
        groups = self.graph.groups
        if self.allocation == "uniform":
            return (
                lambda x: uniform_removal(groups, scores, self.removed, x, self.round_to),
                1.0,
                "removing the most that uniform allocation allows",
            )
        if self.allocation == "isomorphic":
            norm = normalise_scores(groups, scores, self.removed, self.normalize)
            return (
                lambda x: isomorphic_removal(groups, norm, self.removed, self.classes, x, self.round_to),
                1.0,
                "removing the most that isomorphic allocation allows",
            )
        if self.allocation == "sensitivity":
            baseline, curves = self._sensitivity(scores)
            return (
                lambda x: sensitivity_removal(
                    groups, scores, self.removed, curves, baseline, x, self.round_to
                ),
                max_tolerance(curves, baseline),
                "removing the most that sensitivity allocation allows",
            )
        norm = normalise_scores(groups, scores, self.removed, self.normalize)
        hi = global_removal(groups, norm, self.removed, self.cost, math.inf, self.round_to)[1]
        return (
            lambda x: global_removal(groups, norm, self.removed, self.cost, x, self.round_to)[0],
            hi,
            "removing every removable unit",
        )

    def _latency_removal(self, scores: dict[int, np.ndarray], sparsity: float) -> dict[int, np.ndarray]:
        """Smallest removal along the allocation's knob (:meth:`_knob`) whose measured latency meets
        ``sparsity``; probes close to the goal are re-measured (:meth:`LatencyTarget.search`)."""
        at, hi, what = self._knob(scores)
        x = self.latency.search(
            sparsity,
            lambda v: self._latency_ratio(at(v)),
            hi,
            what=what,
            runs_at=lambda v, n: self._latency_ratio(at(v), n),
        )
        return at(x)

    def _sensitivity(self, scores: dict[int, np.ndarray]) -> tuple[float, dict[int, dict[float, float]]]:
        """Loss on ``data`` with only the removed units gone, and each scored group's loss curve pruned alone
        (:func:`secateur.allocation.sensitivity.group_sensitivity`)."""
        return group_sensitivity(
            self.model,
            self.graph,
            scores,
            self.removed,
            lambda m: calibration_loss(m, self.data, self.loss_fn),
            round_to=self.round_to,
        )

    def _per_group_fraction(self) -> bool:
        """True when the sparsity is each group's own fraction (uniform allocation of channels)."""
        return self.allocation == "uniform" and self.target == "channels"

    def _check_reachable(self, sparsity: float) -> None:
        if self._per_group_fraction():
            return
        slack = self.latency.tolerance if self.target == "latency" else 0.0
        if sparsity <= self.max_fraction + slack + 1e-9:
            return
        frozen = [g for g in self.graph.groups if g.n_prunable < g.n_units]
        why = sorted({r for g in frozen for r in g.reasons})[:4]
        raise ConfigError(
            f"target {sparsity:.4g} of {self.target} is unreachable: with {self.allocation} allocation, "
            f"keeping at least one unit per group (round_to={self.round_to}), at most "
            f"{self.max_fraction:.4g} can be removed; {len(frozen)} groups are partly or fully unprunable "
            f"({'; '.join(why) or 'no reason recorded'})"
            + (
                f"; measured: dense {self.dense_ms:.4g} ms, the most-pruned compacted model at "
                f"{1 - self.max_fraction:.1%} of it (per-call overhead and unprunable layers remain), "
                f"tolerance {self.latency.tolerance:.1%}"
                if self.target == "latency"
                else ""
            )
        )

    def sparsity(self) -> float:
        """Fraction of the target (channels / params / MACs) removed by the current masks (cost model);
        for ``"latency"``, ``1 - measured latency of the compacted removal / dense latency``."""
        if self.target == "latency":
            return self._latency_fraction(self.removed)
        return self.cost.state(self.removed).removed_fraction()

    # ----------------------------------------------------------------------------------- allocation
    def _allocate(self, scores: dict[int, np.ndarray], sparsity: float) -> dict[int, np.ndarray]:
        """The removal ``{group index: unit indices}`` for ``sparsity`` of the target, by the allocation."""
        groups = self.graph.groups
        if self.target == "latency":
            removed = self._latency_removal(scores, sparsity)
        elif self.allocation == "global":
            norm = normalise_scores(groups, scores, self.removed, self.normalize)
            removed, _ = global_removal(groups, norm, self.removed, self.cost, sparsity, self.round_to)
        elif self.allocation == "isomorphic":
            norm = normalise_scores(groups, scores, self.removed, self.normalize)
            if self.target == "channels":  # the shared ratio is the sparsity itself
                removed = isomorphic_removal(
                    groups, norm, self.removed, self.classes, sparsity, self.round_to
                )
            else:
                removed = isomorphic_removal_for(
                    groups, norm, self.removed, self.classes, self.cost, sparsity, self.round_to
                )
        elif self.allocation == "sensitivity":
            baseline, curves = self._sensitivity(scores)
            removed = sensitivity_removal_for(
                groups, scores, self.removed, curves, baseline, self.cost, sparsity, self.round_to
            )
        elif self.target != "channels":  # near-uniform, least overshoot of the target
            removed = uniform_removal_for(groups, scores, self.removed, self.cost, sparsity, self.round_to)
        else:
            removed = uniform_removal(groups, scores, self.removed, sparsity, self.round_to)
        return {gi: removed.get(gi, self.removed[gi]) for gi in self.group_ids}

    # -------------------------------------------------------------------------------------- scoring
    def accumulate(self) -> None:
        """Read the current gradients into the criterion's statistics (call after ``loss.backward()``).

        Needed for ``"taylor"``; a no-op for data-free criteria and for ``"fisher"`` (its hooks record).
        """
        self._check_live()
        self.criterion.accumulate(self.model, self.graph, self.group_ids)

    def scores(self) -> dict[int, np.ndarray]:
        """``{group index: (n_units,) float64 scores}`` from the criterion (higher = keep), for the groups
        it scores among :attr:`group_ids` (a group it omits, or maps to None, is left whole).

        A data-dependent criterion without statistics collects them from ``data`` first
        (:func:`secateur.criteria.group.collect`: forward/backward; ``.grad`` fields are restored, and so
        are the model's buffers, e.g. BatchNorm running statistics a train-mode forward updates).

        Raises:
            ConfigError: a data-dependent criterion without statistics and without ``data``; a score of
                the wrong shape or not finite (names the group).
        """
        crit = self.criterion
        if crit.needs_data and not crit.has_stats():
            if self.data is None:
                raise ConfigError(crit.missing_stats_message())
            with _buffers_restored(self.model):  # a train-mode forward would move BatchNorm statistics
                collect(crit, self.model, self.graph, self.group_ids, self.data, self.loss_fn)
        raw = crit.scores(self.model, self.graph, self.group_ids)
        mine = set(self.group_ids)
        out = {}
        for gi, s in raw.items():
            if s is None or gi not in mine:
                continue
            g = self.graph.groups[gi]
            s = np.asarray(s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else s, dtype=float)
            if s.shape != (g.n_units,):
                raise ConfigError(f"criterion gave shape {s.shape} for group {g.name} of {g.n_units} units")
            if not np.isfinite(s).all():
                raise ConfigError(f"criterion gave non-finite scores for group {g.name}")
            out[gi] = s
        return out

    @torch.no_grad()
    def select(self, sparsity: float) -> dict[int, np.ndarray]:
        """Score and allocate so that ``sparsity`` (a fraction of the target) would be removed, without
        changing the model: ``{group index: sorted int64 removed unit indices}`` for every group of
        :attr:`group_ids` (empty arrays for the untouched ones).

        Units already removed (by earlier :meth:`prune_to` / :meth:`step`) stay in the selection. A
        data-dependent criterion may run forward/backward passes on ``data`` (see :meth:`scores`);
        weights, masks and ``.grad`` fields are as before. :meth:`prune_to` is ``select`` + masks;
        a one-shot caller passes the selection to :func:`secateur.pruners.oneshot.remove_units`.

        Raises:
            ConfigError: bad or unreachable sparsity, missing statistics (nothing is changed).
        """
        self._check_live()
        sparsity = check_sparsity(sparsity)
        self._check_reachable(sparsity)
        with torch.enable_grad():
            scores = self.scores()
        removed = self._allocate(scores, sparsity)  # a latency target raises in its search if unreachable
        if self.target != "latency" and not self._per_group_fraction():
            reached = self.cost.state(removed).removed_fraction()
            if reached < sparsity - 1e-9:
                raise ConfigError(
                    f"target {sparsity:.4g} of {self.target} is unreachable: criterion "
                    f"{self.criterion.name!r} scored {len(scores)} of {len(self.group_ids)} prunable groups, "
                    f"and removing what the allocation allows of them reaches {reached:.4g}"
                )
        return removed

    # ---------------------------------------------------------------------------------------- masks
    @torch.no_grad()
    def prune_to(self, sparsity: float) -> dict[int, np.ndarray]:
        """:meth:`select` then mask: ``sparsity`` (a fraction of the target) is removed by masks.

        Already-removed units stay removed. Returns ``{group index: removed unit indices}``.

        Raises:
            ConfigError: bad or unreachable sparsity, missing statistics; nothing is changed then.
        """
        self.removed = self.select(sparsity)
        self._apply_masks()
        self.criterion.after_prune()
        return dict(self.removed)

    def close(self) -> None:
        """Remove the criterion's hooks (Fisher's); :meth:`finalize` does it too. Idempotent."""
        self.criterion.detach()

    def _apply_masks(self) -> None:
        kills: dict[str, list[tuple[int, np.ndarray, bool]]] = {}
        for gi, rm in self.removed.items():
            if rm.size == 0:
                continue
            g = self.graph.groups[gi]
            dead = np.zeros(g.n_units, dtype=bool)
            dead[rm] = True
            for m in g.members:
                kill = dead[m.unit_of]
                if kill.any():
                    kills.setdefault(m.name, []).append((m.dim, kill, m.is_buffer))
        for name, dims in kills.items():
            t = effective_tensor(self.model, name)
            keep = torch.ones(t.shape, dtype=torch.bool, device=t.device)
            for d, kill, _ in dims:
                shape = [1] * t.dim()
                shape[d] = -1
                keep &= torch.from_numpy(~kill).to(t.device).view(shape)
            if dims[0][2]:  # a buffer (BatchNorm running stats): zero in place, as mask_model does
                t.mul_(keep.to(t.dtype))
                continue
            path, _, attr = name.rpartition(".")
            mod = self.model.get_submodule(path) if path else self.model
            if name not in self._masked and has_mask(mod, attr):
                self._base_masks[name] = get_mask(mod, attr).clone()  # an element pruner's mask: keep it
            if name in self._base_masks:
                keep &= self._base_masks[name].to(keep.device)
            set_mask(mod, keep, attr)
            self._masked[name] = keep
        # norms over a pruned dim (graph built with prune_normalized=True): statistics over kept channels
        set_norm_masks(self.model, norm_plan(self.graph, self.removed))

    @torch.no_grad()
    def _rezero_tied(self) -> None:
        for name in self._tied & self._masked.keys():
            stored_parameter(self.model, name).mul_(self._masked[name])

    def _detach_masks(self, model: nn.Module) -> None:
        for name in self._masked:
            path, _, attr = name.rpartition(".")
            mod = model.get_submodule(path) if path else model
            if parametrize.is_parametrized(mod, attr):
                with interrupts_deferred():  # a module is either masked or baked, never half-way
                    parametrize.remove_parametrizations(mod, attr, leave_parametrized=True)

    def removed_units(self) -> dict[str, list[int]]:
        """``{group name: removed unit indices}`` for groups with removals."""
        return {self.graph.groups[gi].name: rm.tolist() for gi, rm in self.removed.items() if rm.size}

    # ------------------------------------------------------------------------------------- schedule
    def _before_step(self) -> None:
        """At every :meth:`step` (the template): refuse a compacted model, re-zero tied parameters."""
        self._check_live()
        self._rezero_tied()

    def _history_entry(self, step: int, target: float) -> dict[str, Any]:
        """A mask change's record: step, target, removed fraction of the target, units removed so far."""
        return {
            "step": int(step),
            "target": float(target),
            "removed_fraction": self.sparsity(),
            "units_removed": int(sum(rm.size for rm in self.removed.values())),
        }

    def on_after_backward(self, trainer: Any) -> None:
        """Trainer callback: read this step's gradients into a data-dependent criterion (:meth:`accumulate`),
        after backward and before ``optimizer.step()``, so Taylor's ``w`` and ``g`` are taken at the same
        point, exactly as in the own-loop recipe (``loss.backward(); pruner.accumulate(); opt.step()``)."""
        if self.criterion.needs_data:
            self.accumulate()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: removed units per group, last update step, history."""
        removed = {self.graph.groups[gi].name: rm.tolist() for gi, rm in self.removed.items()}
        return {"removed": removed, **super().state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` and re-apply its masks.

        Raises:
            ConfigError: a group name the traced graph does not have (nothing is changed then).
        """
        by_name = {self.graph.groups[gi].name: gi for gi in self.group_ids}
        removed = {gi: np.zeros(0, dtype=np.int64) for gi in self.group_ids}
        for name, units in state.get("removed", {}).items():
            if name not in by_name:
                raise ConfigError(f"pruner state names group {name!r}, which this model's graph lacks")
            removed[by_name[name]] = np.asarray(units, dtype=np.int64)
        self.removed = removed
        super().load_state_dict(dict(state))
        with torch.no_grad():
            self._apply_masks()

    # ------------------------------------------------------------------------------------ compaction
    def finalize(self, verify: bool = True, atol: float = ATOL, rtol: float = RTOL) -> nn.Module:
        """Physically remove the masked units (:func:`secateur.compact.compact`, transactional).

        Bakes this pruner's masks into plain weights, builds the plan (kept in ``self.plan``), and slices
        every member. With ``verify`` the oracle (:func:`~secateur.compact.verify.verified_compact`: float64,
        per output ``max|a - b| <= atol + rtol * magnitude``, NaN/Inf never equal) compares the compacted
        model with the masked one inside the transaction. Returns the model (changed in place); afterwards
        the pruner is finished (its hooks are removed). On a Hugging Face model, the model's own
        ``save_pretrained`` is then guarded: it raises ``UnloadableConfigError`` when ``config.json`` cannot
        describe the pruned shapes (:func:`secateur.io.loadable.refuse_plain_save`, checked when called);
        :func:`secateur.save_pretrained` still saves it.

        Transactional under any ``BaseException``: the stored weights, masks and buffers of the pruned
        groups are copied first (:class:`MaskRestorePoint`; memory: one copy of those tensors) and put back
        bit-identical when anything fails or is interrupted; a ``KeyboardInterrupt`` is re-raised after.

        Raises:
            ConfigError: ``verify`` with NaN/Inf in the example inputs (nothing is changed).
            CompactionError: compaction or verification failed; the model is left masked as before.
        """
        self._check_live()
        if verify:
            require_finite_inputs(self.example_inputs)
        plan = make_plan(self.graph, {gi: rm for gi, rm in self.removed.items() if rm.size})
        names = [m.name for gi, rm in self.removed.items() if rm.size for m in self.graph.groups[gi].members]
        point = MaskRestorePoint(self.model, names)
        with restoring(point.restore):
            with torch.no_grad():
                self._apply_masks()  # buffers exactly zero again (training cannot move them, but be sure)
            # bake first: deep copies of a parametrized module share its generated class, so removing a
            # parametrization from a copy would break the original (torch.nn.utils.parametrize)
            self._detach_masks(self.model)
            if verify:
                verified_compact(self.model, plan, self.example_inputs, atol=atol, rtol=rtol)
            else:
                compact(self.model, plan)
        self.criterion.detach()
        self.plan = plan
        self.compacted = True
        refuse_plain_save(self.model, plan)  # plain save_pretrained checks its config.json when called
        self._masked = {}
        return self.model

    def _check_live(self) -> None:
        if self.compacted:
            raise ConfigError("this ChannelPruner already compacted its model; build a new one to prune more")


class MaskRestorePoint:
    """An exact restore point for some parameters and buffers of a model and their element masks.

    Taken before masking or compaction; :meth:`restore` puts back each listed tensor's stored values
    (bit-identical), and for a parameter its element mask as it was: the same mask values if it had one
    (re-attached if it was baked meanwhile), no mask if it had none (a mask added since is removed without
    baking). The Parameter objects stay the same (optimizers keep pointing at them).

    Args:
        model: the model.
        names: qualified names of parameters and buffers (``"layer1.0.conv1.weight"``); duplicates and
            names the model lacks are ignored.

    Memory: one copy of the listed tensors (and masks). Storage too is restored: each tensor gets back the
    very storage it had (a view a caller holds still sees the model's values).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        # (module, attribute, is buffer, the tensor's data (same storage), a copy of its values, the element
        # mask module and a copy of its mask, or None)
        self.entries: list[tuple[nn.Module, str, bool, torch.Tensor, torch.Tensor, Any]] = []
        seen: set[str] = set()
        for name in names:
            if name in seen:
                continue
            seen.add(name)
            path, _, attr = name.rpartition(".")
            try:
                mod = model.get_submodule(path) if path else model
            except AttributeError:
                continue
            is_buffer = attr in mod._buffers and mod._buffers[attr] is not None
            masked = not is_buffer and has_mask(mod, attr)
            stored = _stored(mod, attr, is_buffer, masked)
            if not isinstance(stored, torch.Tensor):
                continue
            mask = (element_mask(mod, attr), get_mask(mod, attr).detach().clone()) if masked else None
            self.entries.append((mod, attr, is_buffer, stored.data, stored.detach().clone(), mask))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every listed tensor and mask back as it was when the point was taken.

        If a listed tensor has another shape now, a compaction completed (committed) since, and an
        interrupt landed between its end and the end of the caller's guard: the model is then consistent,
        compacted, and is left so (restoring weights alone would not undo the compaction).
        """
        for mod, attr, is_buffer, data, _, _ in self.entries:
            if _stored(mod, attr, is_buffer, not is_buffer and has_mask(mod, attr)).shape != data.shape:
                return
        for mod, attr, is_buffer, data, value, mask in self.entries:
            if not is_buffer:
                if mask is None and has_mask(mod, attr):
                    parametrize.remove_parametrizations(mod, attr, leave_parametrized=False)
                elif mask is not None:
                    if not has_mask(mod, attr):  # baked meanwhile: the same mask module goes back
                        parametrize.register_parametrization(mod, attr, mask[0])
                    get_mask(mod, attr).copy_(mask[1])
            stored = _stored(mod, attr, is_buffer, mask is not None)
            if stored.data_ptr() != data.data_ptr() or stored.shape != data.shape:
                stored.set_(data)  # its own storage back (baking or slicing gave it another)
            stored.copy_(value)


def _stored(mod: nn.Module, attr: str, is_buffer: bool, masked: bool) -> Any:
    """The tensor holding ``mod.<attr>``'s values: the buffer, the masked parameter's ``original``, or the
    parameter."""
    if is_buffer:
        return mod._buffers[attr]
    return mod.parametrizations[attr].original if masked else getattr(mod, attr, None)
