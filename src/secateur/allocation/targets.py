"""More allocations: uniform, capped global, ERK, LAMP, sensitivity-derived, and resource targets.

Every allocation has the signature of :mod:`secateur.allocation.element`'s:
``allocate(scores: {name: Tensor}, sparsity: float, previous: {name: bool Tensor} | None) ->
{name: bool keep-mask}``, where ``sparsity`` is the fraction (in [0, 1), not a percent) of the
*scoped* weights to prune and previously pruned entries stay pruned. Importing this module
registers the named ones into ``secateur.allocation.element.ALLOCATIONS``:

- ``"uniform"``: the same fraction in every layer (= ``layerwise``).
- ``"global_capped"``: global ranking, but no layer pruned beyond ``max_sparsity``; what a capped
  layer cannot take is redistributed to the others by the same global ranking.
- ``"erk"``: Erdős–Rényi-Kernel layer densities (Evci et al. 2020, "Rigging the Lottery", sec. 3):
  ``density_l = ε · (n_in + n_out + k_h + k_w) / (n_in · n_out · k_h · k_w)`` for a conv (``ε ·
  (n_in + n_out) / (n_in · n_out)`` for a linear layer: Erdős–Rényi, Mocanu et al. 2018), i.e.
  ``ε · sum(shape) / prod(shape)``; layers whose density would exceed 1 are made dense and ε is
  solved again on the rest. Within a layer the lowest scores are pruned.
- ``"lamp"``: global ranking of LAMP scores (Lee et al. 2021) computed from the given scores
  (``|w|`` for magnitude gives exactly LAMP).

Objects that need arguments: :class:`Sensitivity` (per-layer sparsities from a sweep, Li et al.
2017, "Pruning Filters for Efficient ConvNets", sec. 3.3 / 4.1), :class:`ResourceTarget`
(a target expressed as a fraction of the *model's* parameters or MACs) and :class:`LatencyTarget`
(a fraction of the dense model's *measured* latency, for structured pruning:
``ChannelPruner(..., target="latency")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from secateur.allocation import element as _allocation
from secateur.allocation.element import check_sparsity, global_, layerwise
from secateur.criteria.lamp import lamp_scores
from secateur.errors import ConfigError
from secateur.masks.element import original
from secateur.scope import Target

Masks = dict[str, torch.Tensor]
Allocation = Callable[..., Masks]

__all__ = [
    "LatencyTarget",
    "ResourceTarget",
    "Sensitivity",
    "erk",
    "erk_densities",
    "global_capped",
    "lamp",
    "register_allocation",
    "sensitivity_sparsities",
    "sensitivity_sweep",
    "uniform",
]


def register_allocation(name: str) -> Callable[[Allocation], Allocation]:
    """Decorator registering an allocation under ``name`` in ``secateur.allocation.element.ALLOCATIONS``
    (so ``Pruner(..., allocation=name)`` and recipes find it)."""

    def deco(fn: Allocation) -> Allocation:
        _allocation.ALLOCATIONS[name] = fn
        return fn

    return deco


def _flat(scores: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    s = scores.detach().double().flatten()
    if previous is not None:
        s = torch.where(previous.flatten().to(s.device), s, torch.full_like(s, -math.inf))
    return s


def _prev(previous: Mapping[str, torch.Tensor] | None, name: str) -> torch.Tensor | None:
    return None if previous is None else previous.get(name)


@register_allocation("uniform")
def uniform(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """The same fraction ``sparsity`` pruned in every layer (``floor(s · n_l)`` entries each).

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    return layerwise(scores, sparsity, previous)


@register_allocation("global_capped")
def global_capped(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    previous: Mapping[str, torch.Tensor] | None = None,
    *,
    max_sparsity: float = 0.9,
) -> Masks:
    """Global ranking with a per-layer cap: prune ``floor(sparsity · N)`` entries over all layers,
    the lowest scores first, but at most ``floor(max_sparsity · n_l)`` in layer ``l``.

    Water-filling: layers that the global threshold would prune beyond the cap are fixed at the
    cap, and the remaining budget is ranked globally over the other layers, until no layer
    exceeds its cap. Previously pruned entries count toward a layer's pruned total (and raise its
    cap to their number if they already exceed it). Both fractions are in [0, 1).

    Raises:
        ConfigError: a fraction outside [0, 1), or a ``sparsity`` that the caps make unreachable.
    """
    sp = check_sparsity(sparsity)
    cap_frac = check_sparsity(max_sparsity, "max_sparsity")
    names = list(scores)
    flats = {n: _flat(scores[n], _prev(previous, n)) for n in names}
    already = {n: int(torch.isinf(flats[n]).sum()) for n in names}
    caps = {n: max(math.floor(cap_frac * flats[n].numel()), already[n]) for n in names}
    total = sum(f.numel() for f in flats.values())
    k = math.floor(sp * total)
    if k > sum(caps.values()):
        raise ConfigError(
            f"sparsity {sp} unreachable with max_sparsity {cap_frac} per layer: the caps allow at most "
            f"{sum(caps.values()) / max(total, 1):.4f} of the scoped weights to be pruned"
        )
    capped: set[str] = set()
    while True:
        free = [n for n in names if n not in capped]
        budget = k - sum(caps[n] for n in capped)
        counts = dict.fromkeys(free, 0)
        if free and budget > 0:
            allflat = torch.cat([flats[n] for n in free])
            owner = torch.cat([torch.full((flats[n].numel(),), i) for i, n in enumerate(free)])
            chosen = owner[torch.sort(allflat, stable=True).indices[:budget]]
            per = torch.bincount(chosen, minlength=len(free))
            counts = {n: int(per[i]) for i, n in enumerate(free)}
        over = {n for n in free if counts[n] > caps[n]}
        if not over:
            break
        capped |= over
    out: Masks = {}
    for n in names:
        count = caps[n] if n in capped else counts[n]
        keep = torch.ones(flats[n].numel(), dtype=torch.bool, device=flats[n].device)
        keep[torch.sort(flats[n], stable=True).indices[:count]] = False
        out[n] = keep.view(scores[n].shape)
    return out


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """ERK layer densities whose parameter-weighted mean is ``density`` (a fraction in (0, 1]).

    ``density_l = min(1, ε · sum(shape_l) / prod(shape_l))`` (Evci et al. 2020, sec. 3: ERK for a
    conv ``(n_out, n_in, k_h, k_w)``, Erdős–Rényi for a linear ``(n_out, n_in)``), with ε solved so
    that ``Σ density_l · n_l = density · Σ n_l``; layers that would exceed 1 are set dense and ε is
    re-solved on the others (the procedure of the paper's released code).

    Raises:
        ConfigError: ``density`` outside (0, 1].
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be a fraction in (0, 1], got {density!r}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    target = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        if not rest:
            return dict.fromkeys(shapes, 1.0)
        eps = (target - sum(sizes[n] for n in dense)) / sum(raw[n] * sizes[n] for n in rest)
        over = {n for n in rest if eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


@register_allocation("erk")
def erk(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Per-layer sparsity ``1 - density_l`` from :func:`erk_densities` (shapes of the score tensors,
    so pass scores of the weights' shapes); the lowest scores of each layer are pruned.

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    sp = check_sparsity(sparsity)
    dens = erk_densities({n: tuple(s.shape) for n, s in scores.items()}, 1.0 - sp)
    return layerwise(
        scores, {n: min(max(1.0 - d, 0.0), math.nextafter(1.0, 0.0)) for n, d in dens.items()}, previous
    )


@register_allocation("lamp")
def lamp(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    previous: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Global pruning by LAMP scores (Lee et al. 2021, eq. 2) computed layer by layer from
    ``scores`` (entries already pruned count as zero), then the lowest ``floor(sparsity · N)``.

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    transformed = {}
    for n, s in scores.items():
        p = _prev(previous, n)
        v = s.detach().double()
        if p is not None:
            v = torch.where(p.to(v.device), v, torch.zeros_like(v))
        transformed[n] = lamp_scores(v)
    return global_(transformed, sparsity, previous)


# -- sensitivity-derived --------------------------------------------------------------------------
@torch.no_grad()
def sensitivity_sweep(
    targets: Sequence[Target],
    evaluate: Callable[[], float],
    sparsities: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    scores: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[float, float]]:
    """Prune each layer alone at each sparsity and evaluate (Li et al. 2017, sec. 3.3, fig. 2).

    For each target and each fraction ``s``, the ``floor(s · n)`` lowest-scoring entries of that
    layer only are zeroed (by ``|w|`` unless ``scores`` is given), ``evaluate()`` is called (e.g.
    validation accuracy, higher is better), and the weights are restored exactly.

    Returns:
        ``{target.name: {sparsity: metric}}``.

    Raises:
        ConfigError: a sparsity outside [0, 1).
    """
    sps = [check_sparsity(s) for s in sparsities]
    out: dict[str, dict[float, float]] = {}
    for t in targets:
        stored = original(t.module, t.param_name)
        saved = stored.detach().clone()
        s_layer = (
            getattr(t.module, t.param_name).detach().abs() if scores is None else scores[t.name].detach()
        )
        order = torch.sort(s_layer.flatten().double(), stable=True).indices
        out[t.name] = {}
        try:
            for s in sps:
                stored.copy_(saved)
                stored.view(-1)[order[: math.floor(s * order.numel())]] = 0
                out[t.name][s] = float(evaluate())
        finally:
            stored.copy_(saved)
    return out


def sensitivity_sparsities(
    sweep: Mapping[str, Mapping[float, float]], baseline: float, tolerance: float
) -> dict[str, float]:
    """Per layer, the largest swept sparsity whose metric is within ``tolerance`` of ``baseline``
    (``metric >= baseline - tolerance``, same units as the metric); 0.0 if none is.

    This is how Li et al. 2017 (sec. 4.1) choose which layers to prune and by how much.
    """
    out = {}
    for name, curve in sweep.items():
        ok = [s for s, metric in curve.items() if metric >= baseline - tolerance]
        out[name] = max(ok, default=0.0)
    return out


class Sensitivity:
    """Allocation with per-layer sparsities from a sensitivity sweep (see :func:`sensitivity_sparsities`).

    The pruner's ``sparsity`` (a fraction of all scoped weights) scales the per-layer values
    ``s_l`` proportionally: layer ``l`` gets ``s_l · sparsity / total``, where ``total`` (attribute
    :attr:`total_sparsity`) is the weighted mean of ``s_l`` over layer sizes. A schedule ending at
    ``total_sparsity`` therefore ends at exactly the sweep's per-layer values.

    Raises (on call):
        ConfigError: ``sparsity`` above ``total_sparsity`` (the sweep allows no more), or a layer
            of ``scores`` without a value.
    """

    def __init__(self, layer_sparsity: Mapping[str, float]) -> None:
        self.layer_sparsity = {n: check_sparsity(s, f"sparsity of {n}") for n, s in layer_sparsity.items()}

    def total(self, scores: Mapping[str, torch.Tensor]) -> float:
        missing = [n for n in scores if n not in self.layer_sparsity]
        if missing:
            raise ConfigError(f"sensitivity allocation has no sparsity for layers {missing}")
        sizes = {n: s.numel() for n, s in scores.items()}
        return sum(self.layer_sparsity[n] * sizes[n] for n in scores) / max(sum(sizes.values()), 1)

    def __call__(
        self,
        scores: Mapping[str, torch.Tensor],
        sparsity: float | None = None,
        previous: Mapping[str, torch.Tensor] | None = None,
    ) -> Masks:
        total = self.total(scores)
        factor = 1.0
        if sparsity is not None:
            sp = check_sparsity(sparsity)
            if sp > total + 1e-12:
                raise ConfigError(
                    f"sparsity {sp} unreachable: the sensitivity sweep allows at most {total:.4f} "
                    "of the scoped weights within its tolerance"
                )
            factor = sp / total if total > 0 else 0.0
        return layerwise(scores, {n: self.layer_sparsity[n] * factor for n in scores}, previous)


# -- resource targets -----------------------------------------------------------------------------
def _module_path(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


class ResourceTarget:
    """An allocation whose ``sparsity`` is a fraction of the whole model's parameters or MACs to remove.

    ``kind="params"``: remove ``fraction · P_total`` parameters, where ``P_total`` counts every
    parameter of the model (protected layers, biases and norms included). Element-wise pruning
    removes one parameter per pruned entry, so the scoped sparsity is
    ``fraction · P_total / P_scoped``, passed to ``base``.

    ``kind="macs"``: remove ``fraction`` of the dense MACs of one forward pass on
    ``example_inputs`` (counted by :func:`secateur.analysis.layer_table`). A layer's MACs scale
    with its weight density, so the scoped sparsity that ``base`` needs is found by bisection
    (monotone for ranking-based allocations).

    Args:
        model: the network (counted once, at construction).
        kind: ``"params"`` or ``"macs"``.
        example_inputs: needed for ``"macs"``.
        base: the allocation that distributes the scoped sparsity (a registered name or callable).

    Raises:
        ConfigError: unknown kind, missing example inputs for MACs, and on call a target the
            protected part of the model makes unreachable, e.g. ``"target 0.95 of parameters
            unreachable: parameters outside the pruned weights (protected layers, biases, norms)
            hold 12.0% of parameters"``.
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "params",
        example_inputs: Any = None,
        base: str | Allocation = "global",
    ) -> None:
        from secateur.analysis import count_params, layer_table

        if kind == "latency":
            raise ConfigError(
                "resource target kind 'latency' is not available for element-wise masks: zeroed weights "
                "do not make dense kernels faster; use ChannelPruner(..., target='latency'), which removes "
                "whole channels and measures the compacted model (see LatencyTarget)"
            )
        if kind not in ("params", "macs"):
            raise ConfigError(f"resource target kind must be 'params' or 'macs', got {kind!r}")
        self.kind = kind
        self.base: Allocation = _allocation.get_allocation(base) if isinstance(base, str) else base
        if kind == "params":
            self.total = count_params(model)["params"]
            self.layer_cost: dict[str, int] | None = None
        else:
            if example_inputs is None:
                raise ConfigError("a MACs target needs example_inputs to count the MACs of a forward pass")
            rows = layer_table(model, example_inputs)
            self.total = sum(r.macs for r in rows)
            self.layer_cost = {r.name: r.macs for r in rows}

    def _costs(self, scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
        if self.layer_cost is None:
            return {n: float(s.numel()) for n, s in scores.items()}
        out = {}
        for n in scores:
            path = _module_path(n)
            if path not in self.layer_cost:
                raise ConfigError(f"no MAC count for layer {path!r}: it did not run on the example inputs")
            out[n] = float(self.layer_cost[path])
        return out

    def removed(self, masks: Mapping[str, torch.Tensor], costs: Mapping[str, float]) -> float:
        """Resource removed by ``masks``: ``Σ_l cost_l · (pruned_l / n_l)``."""
        return sum(costs[n] * float((~m).sum()) / max(m.numel(), 1) for n, m in masks.items())

    def __call__(
        self,
        scores: Mapping[str, torch.Tensor],
        sparsity: float,
        previous: Mapping[str, torch.Tensor] | None = None,
    ) -> Masks:
        fraction = check_sparsity(sparsity, f"target fraction of {self.kind}")
        what = "parameters" if self.kind == "params" else "MACs"
        costs = self._costs(scores)
        removable = sum(costs.values()) / max(self.total, 1)
        if fraction >= removable:
            raise ConfigError(
                f"target {fraction} of {what} unreachable: {what} outside the pruned weights "
                f"(protected layers, biases, norms) hold {1 - removable:.1%} of {what}, so less than "
                f"{removable:.4f} can be removed"
            )
        goal = fraction * self.total
        if self.kind == "params":
            n_scoped = sum(s.numel() for s in scores.values())
            # floor(sp * n) must reach ceil(goal): aim half an entry above it against rounding.
            sp = min((math.ceil(goal - 1e-9) + 0.5) / n_scoped, math.nextafter(1.0, 0.0))
            return self.base(scores, sp, previous=previous)
        lo, hi = 0.0, math.nextafter(1.0, 0.0)
        best = self.base(scores, hi, previous=previous)
        for _ in range(40):
            mid = (lo + hi) / 2
            masks = self.base(scores, mid, previous=previous)
            if self.removed(masks, costs) >= goal:
                hi, best = mid, masks
            else:
                lo = mid
        return best


# -- measured latency -----------------------------------------------------------------------------
LatencyFn = Callable[[nn.Module, Any], float]


class LatencyTarget:
    """A target expressed as a fraction of the dense model's *measured* forward latency.

    Used by :class:`secateur.pruners.channel.ChannelPruner` with ``target="latency"``: a scheduled
    sparsity ``s`` means "remove ``s`` of the dense latency", i.e. the compacted model must run in at
    most ``(1 - s + tolerance) · L_dense`` milliseconds. Latency is not a sum of per-layer costs (kernel
    tiling, memory traffic and fixed per-call overhead do not scale with channel counts), so it is
    measured, not modelled: the search walks the *same ranking* the MAC target uses (for uniform
    allocation the common per-group fraction, for global allocation the greedy MAC-fraction order),
    compacts a copy of the model at each probe and times it against the dense copy (:meth:`ratio`),
    and bisects for the smallest removal whose latency meets the goal (:meth:`search`). The pruner
    measures each distinct removal once.

    This is how hardware-aware methods set budgets (e.g. NetAdapt, Yang et al. 2018, sec. 3: "the
    latency of the simplified network is measured" and the number of filters is chosen to meet a
    latency budget); here the ranking comes from the pruner's criterion and only the *amount* is
    chosen by measurement.

    Args:
        latency_fn: ``f(model, inputs) -> float`` milliseconds per forward. Default: medians from
            :func:`secateur.analysis.latency.compare_latency` (``torch.utils.benchmark`` blocks of the
            probe and the dense model interleaved, fixed thread count ``threads``, eval mode, no grad).
            Inject a deterministic function in tests.
        inputs: what to time the model on (a tensor, tuple or dict, as for ``measure_latency``);
            default: the pruner's ``example_inputs``. Latency at batch 1 of a tiny net is mostly fixed
            overhead, so a realistic batch is often the better choice.
        threads: torch intra-op threads during timing (default 1: reproducible on a shared machine).
        repeats: timed blocks per measurement (statistics over blocks; the median is used).
        tolerance: fraction of the dense latency by which a measurement may exceed the goal and still
            count as reaching it (absorbs timing noise), in [0, 1).
        steps: bisection steps over the ranking (each probe at most one compaction and one timing).

    Raises:
        ConfigError: a tolerance outside [0, 1), ``steps`` < 1, a ``latency_fn`` that is not callable
            or returns a non-positive / non-finite time (naming the value), and in :meth:`search` an
            unreachable target (the message gives the measured latency ratio).
    """

    def __init__(
        self,
        latency_fn: LatencyFn | None = None,
        *,
        inputs: Any = None,
        threads: int = 1,
        repeats: int = 20,
        tolerance: float = 0.02,
        steps: int = 30,
    ) -> None:
        if latency_fn is not None and not callable(latency_fn):
            raise ConfigError(f"latency_fn must be callable f(model, inputs) -> ms, got {latency_fn!r}")
        if not 0.0 <= tolerance < 1.0:
            raise ConfigError(f"latency tolerance must be a fraction in [0, 1), got {tolerance!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"latency search steps must be an int >= 1, got {steps!r}")
        self.latency_fn = latency_fn
        self.inputs = inputs
        self.threads = threads
        self.repeats = repeats
        self.tolerance = float(tolerance)
        self.steps = steps

    def measure(self, model: nn.Module, inputs: Any) -> float:
        """Milliseconds per forward of ``model`` on ``self.inputs`` (or ``inputs`` if that is None).

        Raises:
            ConfigError: the latency function returned something that is not a positive finite number.
        """
        x = inputs if self.inputs is None else self.inputs
        if self.latency_fn is None:
            from secateur.analysis.latency import measure_latency

            ms = measure_latency(model, x, threads=self.threads, repeats=self.repeats)["median_ms"]
        else:
            ms = self.latency_fn(model, x)
        return _positive_ms(ms)

    def ratio(self, model: nn.Module, reference: nn.Module, inputs: Any) -> float:
        """``model``'s latency as a fraction of ``reference``'s (e.g. 0.6: 40% faster).

        The default timer measures both in one interleaved run
        (:func:`secateur.analysis.latency.compare_latency`: one block of each in turn, order alternating),
        so a change in machine load during the search hits both alike; an injected ``latency_fn`` is
        called once on each.

        Raises:
            ConfigError: the latency function returned a non-positive or non-finite time.
        """
        x = inputs if self.inputs is None else self.inputs
        if self.latency_fn is None:
            from secateur.analysis.latency import compare_latency

            res = compare_latency(reference, model, x, threads=self.threads, repeats=self.repeats)
            return _positive_ms(res["pruned"]["median_ms"]) / _positive_ms(res["dense"]["median_ms"])
        return _positive_ms(self.latency_fn(model, x)) / _positive_ms(self.latency_fn(reference, x))

    def search(
        self,
        fraction: float,
        ratio_at: Callable[[float], float],
        hi: float,
        *,
        what: str = "the removal",
    ) -> float:
        """The smallest knob ``x`` in ``[0, hi]`` (found by bisection) whose model meets the goal.

        ``ratio_at(x)`` is the measured latency of the model pruned at knob ``x`` (a common per-group
        fraction, or a MAC fraction along a global ranking) as a fraction of the dense model's, assumed
        non-decreasing in removal; the goal is ``ratio_at(x) <= 1 - fraction + tolerance``. Returns 0.0
        for ``fraction`` 0. With noisy timing the returned knob's *measured* ratio meets the goal and the
        one just below it (to the bisection's resolution) measured above it.

        Raises:
            ConfigError: even ``x = hi`` (``what``: everything the allocation may remove) measures above
                the goal: the target is unreachable, and the message says by how much (fixed costs such
                as the stem, the classifier and per-call overhead).
        """
        if fraction <= 0.0:
            return 0.0
        limit = 1.0 - fraction + self.tolerance
        at_hi = ratio_at(hi)
        if at_hi > limit:
            raise ConfigError(
                f"latency target {fraction:.4g} unreachable: {what} still runs at {at_hi:.1%} of the dense "
                f"model's measured latency, above the goal of {1 - fraction:.1%} (+{self.tolerance:.1%} "
                f"tolerance); at most {max(1 - at_hi, 0.0):.4g} of the latency can be removed: the rest is "
                "in layers, units and per-call overhead that channel removal does not shrink"
            )
        lo = 0.0
        for _ in range(self.steps):
            mid = (lo + hi) / 2
            if ratio_at(mid) <= limit:
                hi = mid
            else:
                lo = mid
        return hi


def _positive_ms(ms: Any) -> float:
    try:
        value = float(ms)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"latency_fn must return milliseconds as a number, got {ms!r}") from exc
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"latency_fn must return a positive finite time in ms, got {ms!r}")
    return value
