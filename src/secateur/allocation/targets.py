"""Resource targets: an amount stated as a fraction of the model's parameters, MACs or measured latency.

:class:`ResourceTarget` turns "remove this fraction of the *model's* parameters (or MACs)" into the
scoped sparsity an element allocation needs; :class:`LatencyTarget` is a fraction of the dense model's
*measured* latency, for structured pruning (``ChannelPruner(..., target="latency")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from secateur._validate import check_sparsity
from secateur.allocation.element import Allocation, Masks, get_allocation
from secateur.allocation.search import smallest_reaching
from secateur.errors import ConfigError

__all__ = ["LatencyTarget", "ResourceTarget"]


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
        self.base: Allocation = get_allocation(base) if isinstance(base, str) else base
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
        reached: dict[float, Masks] = {}

        def reaches(sp: float) -> bool:
            masks = self.base(scores, sp, previous=previous)
            if self.removed(masks, costs) >= goal:
                reached[sp] = masks
                return True
            return False

        _, hi = smallest_reaching(reaches, hi=math.nextafter(1.0, 0.0), steps=40)
        return reached[hi] if hi in reached else self.base(scores, hi, previous=previous)


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
        return smallest_reaching(lambda x: ratio_at(x) <= limit, hi=hi, steps=self.steps)[1]


def _positive_ms(ms: Any) -> float:
    try:
        value = float(ms)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"latency_fn must return milliseconds as a number, got {ms!r}") from exc
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"latency_fn must return a positive finite time in ms, got {ms!r}")
    return value
