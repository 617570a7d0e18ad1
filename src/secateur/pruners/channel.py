"""ChannelPruner: structured (channel / head / FFN-neuron) pruning driven by a schedule, then compaction.

The structured counterpart of :class:`secateur.pruners.element.Pruner`, with torch.ao.pruning's split of
*what* (criterion over graph groups, allocation, target) from *when* (a :mod:`secateur.schedules`
schedule)::

    pruner = ChannelPruner(model, x, schedule=Iterative(0.5, steps=5, every=100), criterion="taylor",
                           allocation="global", target="macs")
    for step, (x, y) in enumerate(loader, 1):       # the user's own loop
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward()
        pruner.accumulate()                          # data-dependent criteria only (taylor)
        opt.step(); pruner.step(step)                # the schedule decides when masks change
    model = pruner.finalize()                         # physical removal; pruner.plan is the JSON plan

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

import copy
import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from secateur._validate import check_sparsity
from secateur.analysis.counting import count_params, layer_table
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
    GroupCriterion,
    collect,
    effective_tensor,
    get_group_criterion,
    stored_parameter,
)
from secateur.errors import ConfigError
from secateur.graph.groups import DependencyGraph, Group
from secateur.masks import get_mask, has_mask, set_mask
from secateur.masks.element import element_mask
from secateur.pruners.base import PrunerBase
from secateur.pruners.oneshot import _ensure_member_nonempty, choose_units
from secateur.schedules import OneShot, Schedule

__all__ = ["ChannelPruner", "MaskRestorePoint", "TARGETS"]

TARGETS = ("channels", "params", "macs", "latency")
ALLOCATIONS = ("global", "uniform")
NORMALIZERS = ("auto", "mean", "max", "none")
_EPS = 1e-12


class _CostModel:
    """What remains of a resource (parameters, MACs or prunable units) given the removed units.

    Every cost item (a parameter tensor's size, a layer's measured MACs, a group's prunable unit count)
    is multilinear in the kept fractions of the channel dims it spans: ``base · Π_d kept_d / size_d``.
    This is exact for parameters and for conv / linear MACs (a conv costs ``C_out · C_in / groups ·
    k_h · k_w`` per output position; a depthwise conv's weight spans only its output dim), and
    conservative for MACs that no layer weight scales (functional ops such as attention's
    ``softmax(QKᵀ)V``, counted as fixed although removing heads shrinks them).
    """

    def __init__(self, total: float) -> None:
        self.total = float(total)
        self.slot_counts: list[np.ndarray] = []  # per slot: indices of the dim owned by each unit
        self.slot_size: list[int] = []
        self.group_slots: dict[int, list[int]] = {}
        self.item_base: list[float] = []
        self.item_slots: list[list[int]] = []
        self.fixed = self.total

    def add_slot(self, gi: int, counts: np.ndarray) -> int:
        self.slot_counts.append(counts.astype(np.int64))
        self.slot_size.append(int(counts.sum()))
        self.group_slots.setdefault(gi, []).append(len(self.slot_counts) - 1)
        return len(self.slot_counts) - 1

    def add_item(self, base: float, slots: list[int]) -> None:
        self.item_base.append(float(base))
        self.item_slots.append(slots)
        self.fixed -= float(base)

    def state(self, removed: Mapping[int, np.ndarray]) -> _CostState:
        return _CostState(self, removed)


class _CostState:
    """Kept index counts per slot and the remaining cost; updated unit by unit during a greedy pass."""

    def __init__(self, model: _CostModel, removed: Mapping[int, np.ndarray]) -> None:
        self.m = model
        self.kept = np.array(model.slot_size, dtype=np.float64)
        for gi, rm in removed.items():
            if len(rm):
                for s in model.group_slots.get(gi, []):
                    self.kept[s] -= model.slot_counts[s][np.asarray(rm, dtype=np.int64)].sum()
        self.item_val = np.array([self._item(i) for i in range(len(model.item_base))], dtype=np.float64)
        self.slot_items: dict[int, list[int]] = {}
        for i, slots in enumerate(model.item_slots):
            for s in slots:
                self.slot_items.setdefault(s, []).append(i)

    def _item(self, i: int) -> float:
        v = self.m.item_base[i]
        for s in self.m.item_slots[i]:
            v *= self.kept[s] / max(self.m.slot_size[s], 1)
        return v

    def remaining(self) -> float:
        return self.m.fixed + float(self.item_val.sum())

    def removed_fraction(self) -> float:
        return 1.0 - self.remaining() / self.m.total if self.m.total > 0 else 0.0

    def remove(self, gi: int, units: np.ndarray) -> None:
        touched: set[int] = set()
        for s in self.m.group_slots.get(gi, []):
            self.kept[s] -= self.m.slot_counts[s][units].sum()
            touched.update(self.slot_items.get(s, []))
        for i in touched:
            self.item_val[i] = self._item(i)


class ChannelPruner(PrunerBase):
    """Schedule-driven structured pruning over dependency-graph groups, with masks, then compaction.

    Args:
        model: the network (changed in place: masks during training, physical removal at :meth:`finalize`).
        example_inputs: a tensor, tuple of positional inputs or dict of keyword inputs; traced once and used
            to measure MACs.
        schedule: a :mod:`secateur.schedules` object (``OneShot``, ``Iterative``, ``Cubic``) or a float for
            one-shot pruning at step 0. Its sparsity is a *fraction* in [0, 1) of ``target``.
        criterion: a :mod:`secateur.criteria.group` name (``"random"``, ``"l1"``, ``"l2"``, ``"bn_scale"``,
            ``"fpgm"``, ``"taylor"``, ``"fisher"``), a :class:`GroupCriterion`, or ``f(group, model) ->
            (n_units,) scores`` (higher = keep).
        allocation: ``"uniform"`` (the same fraction of every group's prunable units; for params/MACs
            targets that fraction is found by bisection) or ``"global"`` (one ranking over all groups).
        target: what the sparsity is a fraction of: ``"channels"`` (prunable units: channels, heads,
            neurons), ``"params"`` (all parameters of the model) or ``"macs"`` (multiply-accumulates of one
            forward on ``example_inputs``, not FLOPs) or ``"latency"`` (the dense model's *measured* latency:
            the MAC ranking is walked and compacted copies are timed, see ``latency``). Costs per unit: see
            :class:`_CostModel`.
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
        graph: a graph already traced from ``model`` (skips the trace).
        latency: for ``target="latency"``, a :class:`secateur.allocation.targets.LatencyTarget` (timing
            function, inputs, threads, tolerance); default ``LatencyTarget()``. The dense latency and the
            largest removable fraction are measured at construction, on a mask-free copy of the model.

    Global allocation removes units in increasing order of (normalised) score until the removed fraction
    of the target reaches the scheduled sparsity; with ``round_to > 1`` units go in chunks that keep each
    group's count a multiple of ``round_to`` (a chunk's score is its mean). Every group keeps at least one
    unit (``round_to`` units), and every member keeps at least one index (a layer fed by a concat).

    Raises:
        ConfigError: unknown criterion / allocation / target / normaliser, bad ``round_to`` or sparsity,
            or a schedule whose final sparsity cannot be reached because of protected or frozen groups.
            Validation happens before any mask is attached: on error the model is untouched.
        UnsupportedOpError / GraphError: from tracing.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        schedule: Schedule | float,
        criterion: str | GroupCriterion | Callable[[Group, nn.Module], Any] = "l1",
        allocation: str = "global",
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
            schedule = OneShot(check_sparsity(schedule))
        if not callable(getattr(schedule, "update_at", None)):
            raise ConfigError(f"schedule must be a schedule object or a float, got {schedule!r}")
        if allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if target not in TARGETS:
            raise ConfigError(f"target must be one of {TARGETS}, got {target!r}")
        if latency is not None and target != "latency":
            raise ConfigError(f"latency settings given but target is {target!r}; use target='latency'")
        if normalize not in NORMALIZERS:
            raise ConfigError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ConfigError(f"round_to must be an integer >= 1, got {round_to!r}")
        self.model = model
        self.example_inputs = example_inputs
        self.schedule = schedule
        self.criterion = get_group_criterion(criterion, **(criterion_kwargs or {}))
        self.allocation = allocation
        self.target = target
        self.round_to = round_to
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
        )
        self.group_ids = [gi for gi, g in enumerate(self.graph.groups) if g.n_prunable > 0]
        self.removed: dict[int, np.ndarray] = {gi: np.zeros(0, dtype=np.int64) for gi in self.group_ids}
        self.cost = self._build_cost_model()
        if target == "latency":
            self._init_latency(latency)
        self.max_fraction = self._max_fraction()
        final = max([float(schedule.sparsity_at(s)) for s in getattr(schedule, "update_steps", [])] or [0.0])
        self._check_reachable(final)
        self.last_update: int | None = None
        self.history: list[dict[str, Any]] = []
        self.plan: dict | None = None
        self.compacted = False
        self._masked: dict[str, torch.Tensor] = {}  # qualname -> current keep-mask of a parameter
        self._base_masks: dict[str, torch.Tensor] = {}  # element masks found already attached
        # tied parameters: other modules read the stored tensor unmasked, so it is re-zeroed every step
        self._tied = {m.name for gi in self.group_ids for m in self.graph.groups[gi].members if m.aliases}
        self.criterion.attach(model, self.graph, self.group_ids)

    # ------------------------------------------------------------------------------------------ costs
    def _build_cost_model(self) -> _CostModel:
        groups = self.graph.groups
        if self.target == "channels":
            cm = _CostModel(sum(groups[gi].n_prunable for gi in self.group_ids))
            for gi in self.group_ids:
                s = cm.add_slot(gi, groups[gi].prunable.astype(np.int64))
                cm.add_item(groups[gi].n_prunable, [s])
            return cm
        slots_of: dict[str, list[int]] = {}
        if self.target == "params":
            cm = _CostModel(count_params(self.model)["params"])
        else:
            rows = _measure_layers(self.model, self.example_inputs)
            cm = _CostModel(sum(r.macs for r in rows))
        for gi in self.group_ids:
            g = groups[gi]
            for m in g.members:
                if m.is_buffer:
                    continue
                s = cm.add_slot(gi, np.bincount(m.unit_of, minlength=g.n_units))
                slots_of.setdefault(m.name, []).append(s)
        if self.target == "params":
            for name, slots in slots_of.items():
                cm.add_item(effective_tensor(self.model, name).numel(), slots)
        else:
            for r in rows:
                wname = f"{r.name}.weight" if r.name else "weight"
                if r.macs > 0 and wname in slots_of:
                    cm.add_item(r.macs, slots_of[wname])
        return cm

    def _max_fraction(self) -> float:
        """The largest fraction of the target removable under the constraints (one unit per group...)."""
        zeros = {gi: np.zeros(self.graph.groups[gi].n_units) for gi in self.group_ids}
        if self.allocation == "uniform":
            rm = self._uniform_removal(zeros, 1.0)
            frac = self.cost.state(rm).removed_fraction()
        else:
            rm, frac = self._global_removal(zeros, math.inf)
        return self._latency_fraction(rm) if self.target == "latency" else frac

    # -------------------------------------------------------------------------------- latency target
    def _init_latency(self, latency: Any) -> None:
        from secateur.allocation.targets import LatencyTarget
        from secateur.masks import detach_masks

        self.latency = LatencyTarget() if latency is None else latency
        if not isinstance(self.latency, LatencyTarget):
            raise ConfigError(f"latency must be a LatencyTarget, got {type(latency).__name__}")
        # timed copies start from a mask-free, hook-free copy taken now (latency depends on shapes only)
        self._latency_base = detach_masks(copy.deepcopy(self.model))
        self._latency_memo: dict[tuple, float] = {}
        self.dense_ms = self.latency.measure(self._latency_base, self.example_inputs)

    def _latency_ratio(self, removed: Mapping[int, np.ndarray]) -> float:
        """Measured latency of the model compacted with ``removed`` over the dense one's; memoised."""
        rm = {gi: np.asarray(r, dtype=np.int64) for gi, r in removed.items() if len(r)}
        key = tuple(sorted((gi, tuple(r.tolist())) for gi, r in rm.items()))
        if key not in self._latency_memo:
            probe = compact(copy.deepcopy(self._latency_base), make_plan(self.graph, rm))
            self._latency_memo[key] = self.latency.ratio(probe, self._latency_base, self.example_inputs)
        return self._latency_memo[key]

    def _latency_fraction(self, removed: Mapping[int, np.ndarray]) -> float:
        return 1.0 - self._latency_ratio(removed)

    def _latency_removal(self, scores: dict[int, np.ndarray], sparsity: float) -> dict[int, np.ndarray]:
        """Smallest removal along the MAC target's ranking whose measured latency meets ``sparsity``."""
        if self.allocation == "uniform":  # knob: the common per-group fraction

            def at(x: float) -> dict[int, np.ndarray]:
                return self._uniform_removal(scores, x)

            hi, what = 1.0, "removing the most that uniform allocation allows"
        else:  # knob: the fraction of MACs along the global greedy ranking
            norm = self._normalised(scores)

            def at(x: float) -> dict[int, np.ndarray]:
                return self._global_removal(norm, x)[0]

            hi, what = self._global_removal(norm, math.inf)[1], "removing every removable unit"
        x = self.latency.search(sparsity, lambda v: self._latency_ratio(at(v)), hi, what=what)
        return at(x)

    def _check_reachable(self, sparsity: float) -> None:
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
    def _normalised(self, scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        if self.normalize == "none":
            return scores
        out = {}
        for gi, s in scores.items():
            g = self.graph.groups[gi]
            alive = g.prunable.copy()
            alive[self.removed[gi]] = False
            ref = np.abs(s[alive]) if alive.any() else np.abs(s)
            d = ref.mean() if self.normalize == "mean" else ref.max()
            out[gi] = s / d if d > _EPS else s
        return out

    def _uniform_removal(self, scores: dict[int, np.ndarray], ratio: float) -> dict[int, np.ndarray]:
        out = {}
        for gi, s in scores.items():
            g = self.graph.groups[gi]
            prev = self.removed[gi]
            s = s.astype(float).copy()
            s[prev] = -np.inf  # removed units stay removed: they are chosen first
            rm = choose_units(g, s, ratio, self.round_to)
            rm = np.union1d(rm, prev).astype(np.int64)
            fresh = np.setdiff1d(rm, prev)
            if fresh.size:
                rm = np.union1d(prev, _ensure_member_nonempty(g, rm, s)).astype(np.int64)
            out[gi] = rm
        return out

    def _global_removal(
        self, scores: dict[int, np.ndarray], target: float
    ) -> tuple[dict[int, np.ndarray], float]:
        """Greedy removal of the lowest-scoring chunks until ``target`` (fraction) is reached."""
        state = self.cost.state(self.removed)
        groups = self.graph.groups
        r = self.round_to
        removed = {gi: self.removed[gi].copy() for gi in self.group_ids}
        order: dict[int, np.ndarray] = {}
        ptr: dict[int, int] = {}
        alive_n: dict[int, int] = {}
        member_alive: dict[int, list[np.ndarray]] = {}
        for gi in scores:
            g = groups[gi]
            dead = np.zeros(g.n_units, dtype=bool)
            dead[removed[gi]] = True
            cand = np.nonzero(g.prunable & ~dead)[0]
            order[gi] = cand[np.argsort(scores[gi][cand], kind="stable")]
            ptr[gi] = 0
            alive_n[gi] = int((~dead).sum())
            member_alive[gi] = [np.bincount(m.unit_of, minlength=g.n_units) * ~dead for m in g.members]

        def next_chunk(gi: int) -> tuple[float, np.ndarray] | None:
            size = (alive_n[gi] % r) or r
            if alive_n[gi] - size < r or ptr[gi] + size > order[gi].size:
                return None
            chunk = order[gi][ptr[gi] : ptr[gi] + size]
            for cnt in member_alive[gi]:
                if cnt.sum() - cnt[chunk].sum() <= 0 and cnt.sum() > 0:
                    return None
            return float(np.mean(scores[gi][chunk])), chunk

        heap: list[tuple[float, int, int]] = []
        chunks: dict[int, np.ndarray] = {}
        for gi in scores:
            c = next_chunk(gi)
            if c is not None:
                chunks[gi] = c[1]
                heapq.heappush(heap, (c[0], gi, int(c[1][0])))
        frac = state.removed_fraction()
        while frac < target - 1e-12 and heap:
            _, gi, _ = heapq.heappop(heap)
            chunk = chunks.pop(gi)
            state.remove(gi, chunk)
            removed[gi] = np.union1d(removed[gi], chunk).astype(np.int64)
            ptr[gi] += chunk.size
            alive_n[gi] -= chunk.size
            for cnt in member_alive[gi]:
                cnt[chunk] = 0
            frac = state.removed_fraction()
            c = next_chunk(gi)
            if c is not None:
                chunks[gi] = c[1]
                heapq.heappush(heap, (c[0], gi, int(c[1][0])))
        return removed, frac

    def _allocate(self, scores: dict[int, np.ndarray], sparsity: float) -> dict[int, np.ndarray]:
        if self.target == "latency":
            removed = self._latency_removal(scores, sparsity)
            return {gi: removed.get(gi, self.removed[gi]) for gi in self.group_ids}
        if self.allocation == "global":
            removed, _ = self._global_removal(self._normalised(scores), sparsity)
            return {gi: removed.get(gi, self.removed[gi]) for gi in self.group_ids}
        if self.target == "channels":
            ratio = sparsity
        else:  # smallest common fraction whose removal reaches the target (monotone: bisection)
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                if self.cost.state(self._uniform_removal(scores, mid)).removed_fraction() >= sparsity - 1e-12:
                    hi = mid
                else:
                    lo = mid
            ratio = hi
        removed = self._uniform_removal(scores, ratio)
        return {gi: removed.get(gi, self.removed[gi]) for gi in self.group_ids}

    # -------------------------------------------------------------------------------------- scoring
    def accumulate(self) -> None:
        """Read the current gradients into the criterion's statistics (call after ``loss.backward()``).

        Needed for ``"taylor"``; a no-op for data-free criteria and for ``"fisher"`` (its hooks record).
        """
        self._check_live()
        self.criterion.accumulate(self.model, self.graph, self.group_ids)

    def scores(self) -> dict[int, np.ndarray]:
        """``{group index: (n_units,) float64 scores}`` from the criterion (higher = keep).

        Raises:
            ConfigError: a data-dependent criterion without statistics and without ``data``; a score of
                the wrong shape or not finite (names the group).
        """
        crit = self.criterion
        if crit.needs_data and not crit.has_stats():
            if self.data is None:
                raise ConfigError(crit.missing_stats_message())
            collect(crit, self.model, self.graph, self.group_ids, self.data, self.loss_fn)
        raw = crit.scores(self.model, self.graph, self.group_ids)
        out = {}
        for gi, s in raw.items():
            g = self.graph.groups[gi]
            s = np.asarray(s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else s, dtype=float)
            if s.shape != (g.n_units,):
                raise ConfigError(f"criterion gave shape {s.shape} for group {g.name} of {g.n_units} units")
            if not np.isfinite(s).all():
                raise ConfigError(f"criterion gave non-finite scores for group {g.name}")
            out[gi] = s
        return out

    # ---------------------------------------------------------------------------------------- masks
    @torch.no_grad()
    def prune_to(self, sparsity: float) -> dict[int, np.ndarray]:
        """Score, allocate and mask so that ``sparsity`` (a fraction of the target) is removed.

        Already-removed units stay removed. Returns ``{group index: removed unit indices}``.

        Raises:
            ConfigError: bad or unreachable sparsity, missing statistics; nothing is changed then.
        """
        self._check_live()
        sparsity = check_sparsity(sparsity)
        self._check_reachable(sparsity)
        with torch.enable_grad():
            scores = self.scores()
        removed = self._allocate(scores, sparsity)  # a latency target raises in its search if unreachable
        reached = self.cost.state(removed).removed_fraction()
        if reached < sparsity - 1e-9 and self.target != "latency" and not (
            self.allocation == "uniform" and self.target == "channels"
        ):
            raise ConfigError(
                f"target {sparsity:.4g} of {self.target} is unreachable: criterion "
                f"{self.criterion.name!r} scored {len(scores)} of {len(self.group_ids)} prunable groups, and "
                f"removing what the allocation allows of them reaches {reached:.4g}"
            )
        self.removed = removed
        self._apply_masks()
        self.criterion.after_prune()
        return dict(self.removed)

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
    def step(self, step: int) -> bool:
        """Apply the schedule at training step ``step`` (optimizer steps done). True if masks changed."""
        self._check_live()
        self._rezero_tied()
        if self.last_update is not None and step <= self.last_update:
            return False
        target = self.schedule.update_at(step)
        if target is None:
            return False
        self.prune_to(target)
        self.last_update = step
        self.history.append(
            {
                "step": int(step),
                "target": float(target),
                "removed_fraction": self.sparsity(),
                "units_removed": int(sum(rm.size for rm in self.removed.values())),
            }
        )
        return True

    def on_after_backward(self, trainer: Any) -> None:
        """Trainer callback: read this step's gradients into a data-dependent criterion (:meth:`accumulate`),
        after backward and before ``optimizer.step()``, so Taylor's ``w`` and ``g`` are taken at the same
        point, exactly as in the own-loop recipe (``loss.backward(); pruner.accumulate(); opt.step()``)."""
        if self.criterion.needs_data:
            self.accumulate()

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: removed units per group, last update step, history."""
        return {
            "removed": {self.graph.groups[gi].name: rm.tolist() for gi, rm in self.removed.items()},
            "last_update": self.last_update,
            "history": list(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` and re-apply its masks.

        Raises:
            ConfigError: a group name the traced graph does not have.
        """
        by_name = {self.graph.groups[gi].name: gi for gi in self.group_ids}
        removed = {gi: np.zeros(0, dtype=np.int64) for gi in self.group_ids}
        for name, units in state.get("removed", {}).items():
            if name not in by_name:
                raise ConfigError(f"pruner state names group {name!r}, which this model's graph lacks")
            removed[by_name[name]] = np.asarray(units, dtype=np.int64)
        self.removed = removed
        self.last_update = state.get("last_update")
        self.history = list(state.get("history", []))
        with torch.no_grad():
            self._apply_masks()

    # ------------------------------------------------------------------------------------ compaction
    def finalize(self, verify: bool = True, atol: float = ATOL, rtol: float = RTOL) -> nn.Module:
        """Physically remove the masked units (:func:`secateur.compact.compact`, transactional).

        Bakes this pruner's masks into plain weights, builds the plan (kept in ``self.plan``), and slices
        every member. With ``verify`` the oracle (:func:`~secateur.compact.verify.verified_compact`: float64,
        per output ``max|a - b| <= atol + rtol * magnitude``, NaN/Inf never equal) compares the compacted
        model with the masked one inside the transaction. Returns the model (changed in place); afterwards
        the pruner is finished (its hooks are removed).

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


def _measure_layers(model: nn.Module, example_inputs: Any) -> list:
    """:func:`layer_table` in eval mode (so BatchNorm running statistics are not updated), modes restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return layer_table(model, example_inputs)
    finally:
        for m, t in modes.items():
            m.training = t
