"""Resource targets: an amount stated as a fraction of the model's parameters, MACs or measured latency.

:class:`ResourceTarget` turns "remove this fraction of the *model's* parameters (or MACs)" into the
scoped sparsity an element allocation needs; :class:`LatencyTarget` is a fraction of the dense model's
*measured* latency, for structured pruning (``ChannelPruner(..., target="latency")``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from secateur._validate import check_sparsity
from secateur.allocation.element import Allocation, Masks, get_allocation
from secateur.allocation.search import smallest_reaching
from secateur.errors import ConfigError

__all__ = ["LatencyProbe", "LatencyTarget", "ResourceTarget"]


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

    Used by :class:`secateur.pruners.channel.ChannelPruner` with ``target="latency"`` (``latency=`` this
    object, or a backend name: ``latency="onnxruntime"``): a scheduled sparsity ``s`` means "remove ``s`` of
    the dense latency", i.e. the compacted model must run in at most ``(1 - s + tolerance) · L_dense``.
    Latency is not a sum of per-layer costs (kernel tiling, memory traffic and fixed per-call overhead do not
    scale with channel counts), so it is measured, not modelled: the search walks the *same ranking* the
    allocation uses for a MAC target (for uniform allocation the common per-group fraction, for global the
    greedy MAC-fraction order, for isomorphic the shared per-class ratio, for sensitivity the loss budget),
    compacts a copy of the model at each probe (:class:`LatencyProbe`) and times it against the dense copy,
    and bisects for the smallest removal whose latency meets the goal (:meth:`search`).

    Noise. Each measurement times the dense model and the candidate *interleaved* (one block of each in
    turn, order alternating; :func:`secateur.analysis.latency.compare_callables`) and takes the ratio of
    the two medians over ``repeats`` blocks, so a change in machine load hits both alike. A probe whose
    ratio lies within ``recheck`` of the goal (where a wrong decision is likely) is measured again, up to
    ``retries`` more times, and decided by the median of its ratios. Each distinct removal is measured once
    (or its re-measurements), so bisection steps that land on the same removal decide alike. What the
    search guarantees is about *measured* ratios: the result's median ratio is at most
    ``1 - s + tolerance``, and the removal one step smaller measured above it; re-timing the result later
    differs by the timing noise (on an idle machine at 1 thread, typically 1-2% of the dense latency).

    This is how hardware-aware methods set budgets (e.g. NetAdapt, Yang et al. 2018, sec. 3: "the
    latency of the simplified network is measured" and the number of filters is chosen to meet a
    latency budget); here the ranking comes from the pruner's criterion and only the *amount* is
    chosen by measurement.

    Args:
        latency_fn: ``f(model, inputs) -> float`` milliseconds per forward, instead of a backend (e.g. a
            deterministic function in tests, or a remote device). Called once on the dense model and once
            per measurement of a candidate.
        backend: the runtime timed when no ``latency_fn`` is given: ``"eager"`` (PyTorch, eval mode, no
            grad) or ``"onnxruntime"`` (the candidate exported to ONNX in memory and run by ONNX Runtime's
            CPU provider; :mod:`secateur.analysis.backends`).
        inputs: what to time the model on (a tensor, tuple or dict, as for ``measure_latency``); default:
            the pruner's ``example_inputs``. The batch is the one given: latency at batch 1 of a tiny net is
            mostly fixed overhead, so a realistic batch (e.g. 32) is often the better choice.
        threads: intra-op threads during timing (torch's, and ONNX Runtime's; default 1: reproducible on
            a shared machine).
        repeats: timed blocks per measurement (the median over blocks is used).
        tolerance: fraction of the dense latency by which a measurement may exceed the goal and still
            count as reaching it, in [0, 1).
        steps: bisection steps over the ranking (each probe at most one compaction and one timing).
        retries: how many more times a probe within ``recheck`` of the goal is measured (>= 0).
        recheck: the band around the goal, as a fraction of the dense latency, in which a probe is
            re-measured (>= 0).
        exporter: the ONNX exporter for ``"onnxruntime"`` (:data:`secateur.analysis.backends.EXPORTERS`).

    Raises:
        ConfigError: a tolerance outside [0, 1), ``steps`` < 1, ``retries`` < 0, ``recheck`` < 0, an
            unknown backend (naming the backends), ``latency_fn`` together with a non-default backend, a
            ``latency_fn`` that is not callable or returns a non-positive / non-finite time (naming the
            value), and in :meth:`search` an unreachable target (the message gives the measured ratio).
        ImportError: ``backend="onnxruntime"`` without onnxruntime installed.
    """

    def __init__(
        self,
        latency_fn: LatencyFn | None = None,
        *,
        backend: str = "eager",
        inputs: Any = None,
        threads: int = 1,
        repeats: int = 20,
        tolerance: float = 0.02,
        steps: int = 30,
        retries: int = 2,
        recheck: float = 0.03,
        exporter: str = "auto",
    ) -> None:
        from secateur.analysis.backends import EXPORTERS, check_backend

        if latency_fn is not None and not callable(latency_fn):
            raise ConfigError(f"latency_fn must be callable f(model, inputs) -> ms, got {latency_fn!r}")
        check_backend(backend)
        if latency_fn is not None and backend != "eager":
            raise ConfigError(
                f"give latency_fn or backend={backend!r}, not both: latency_fn replaces the backend's timer"
            )
        if exporter not in EXPORTERS:
            raise ConfigError(f"unknown ONNX exporter {exporter!r}; choose one of {EXPORTERS}")
        if not 0.0 <= tolerance < 1.0:
            raise ConfigError(f"latency tolerance must be a fraction in [0, 1), got {tolerance!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"latency search steps must be an int >= 1, got {steps!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"latency retries must be an int >= 0, got {retries!r}")
        if not (isinstance(recheck, (int, float)) and math.isfinite(recheck) and recheck >= 0):
            raise ConfigError(f"latency recheck band must be a fraction >= 0, got {recheck!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"latency threads must be an int >= 1, got {threads!r}")
        self.latency_fn = latency_fn
        self.backend = backend
        self.inputs = inputs
        self.threads = threads
        self.repeats = repeats
        self.tolerance = float(tolerance)
        self.steps = steps
        self.retries = retries
        self.recheck = float(recheck)
        self.exporter = exporter

    def timed_inputs(self, inputs: Any) -> Any:
        """What is timed: :attr:`inputs` if set, else ``inputs`` (the pruner's example inputs)."""
        return inputs if self.inputs is None else self.inputs

    def measure(self, model: nn.Module, inputs: Any) -> float:
        """Milliseconds per forward of ``model`` on ``self.inputs`` (or ``inputs`` if that is None): the
        ``latency_fn``'s value, or the backend's median over ``repeats`` blocks.

        Raises:
            ConfigError: the latency function returned something that is not a positive finite number.
        """
        x = self.timed_inputs(inputs)
        if self.latency_fn is not None:
            return _positive_ms(self.latency_fn(model, x))
        from secateur.analysis.backends import backend_latency

        res = backend_latency(
            model, x, self.backend, threads=self.threads, repeats=self.repeats, exporter=self.exporter
        )
        return _positive_ms(res["median_ms"])

    def runner(self, model: nn.Module, inputs: Any) -> Callable[[], Any]:
        """A prepared forward of ``model`` in the backend (:func:`secateur.analysis.backends.prepare_runner`;
        eager puts ``model`` in eval mode): built once, timed by :meth:`ratio_of`."""
        from secateur.analysis.backends import prepare_runner

        return prepare_runner(
            model, self.timed_inputs(inputs), self.backend, threads=self.threads, exporter=self.exporter
        )

    def ratio_of(self, candidate: Callable[[], Any], reference: Callable[[], Any]) -> float:
        """One interleaved timing of two runners (:meth:`runner`): the candidate's median over the
        reference's.

        Raises:
            ConfigError: a non-positive or non-finite median.
        """
        from secateur.analysis.latency import compare_callables

        res = compare_callables(
            {"dense": reference, "candidate": candidate}, threads=self.threads, repeats=self.repeats
        )
        return _positive_ms(res["candidate"]["median_ms"]) / _positive_ms(res["dense"]["median_ms"])

    def ratio(self, model: nn.Module, reference: nn.Module, inputs: Any) -> float:
        """``model``'s latency as a fraction of ``reference``'s (e.g. 0.6: 40% faster).

        The backend measures both in one interleaved run (:meth:`ratio_of`, eval mode; the models' modes are
        restored); an injected ``latency_fn`` is called once on each.

        Raises:
            ConfigError: the latency function returned a non-positive or non-finite time.
        """
        x = self.timed_inputs(inputs)
        if self.latency_fn is not None:
            return _positive_ms(self.latency_fn(model, x)) / _positive_ms(self.latency_fn(reference, x))
        modes = {m: m.training for net in (model, reference) for m in net.modules()}
        try:
            return self.ratio_of(self.runner(model, x), self.runner(reference, x))
        finally:
            for m, t in modes.items():
                m.training = t

    def decide(self, limit: float, ratio_at: Callable[[int], float]) -> tuple[bool, float]:
        """Whether a probe meets ``limit``: ``ratio_at(n)`` is the median ratio over ``n`` measurements;
        while it lies within :attr:`recheck` of ``limit`` it is measured again (``n`` up to
        ``1 + retries``). Returns ``(ratio <= limit, the last median ratio)``."""
        n, r = 1, ratio_at(1)
        while n <= self.retries and abs(r - limit) <= self.recheck:
            n += 1
            r = ratio_at(n)
        return r <= limit, r

    def search(
        self,
        fraction: float,
        ratio_at: Callable[[float], float],
        hi: float,
        *,
        what: str = "the removal",
        runs_at: Callable[[float, int], float] | None = None,
    ) -> float:
        """The smallest knob ``x`` in ``[0, hi]`` (found by bisection) whose model meets the goal.

        ``ratio_at(x)`` is the measured latency of the model pruned at knob ``x`` (a common per-group
        fraction, a MAC fraction along a global ranking, a shared per-class ratio or a loss budget) as a
        fraction of the dense model's, assumed non-decreasing in removal; the goal is
        ``ratio <= 1 - fraction + tolerance``. With ``runs_at(x, n)`` (the median over ``n`` measurements of
        the same removal), probes within ``recheck`` of the goal are re-measured (:meth:`decide`), and so is
        ``hi`` whenever it fails (the target is declared unreachable on the median of ``1 + retries``
        measurements, not on one). Returns 0.0 for ``fraction`` 0. The returned knob's measured ratio meets
        the goal and the one just below it (to the bisection's resolution) measured above it. Bisection
        assumes the latency falls as the removal grows; where it does not (a width off a kernel's block
        size can run slower than a larger one), the result meets the goal but may not be the smallest
        removal that does.

        Raises:
            ConfigError: even ``x = hi`` (``what``: everything the allocation may remove) measures above
                the goal: the target is unreachable, and the message says by how much (fixed costs such
                as the stem, the classifier and per-call overhead).
        """
        if fraction <= 0.0:
            return 0.0
        limit = 1.0 - fraction + self.tolerance

        def probe(x: float) -> tuple[bool, float]:
            if runs_at is None:
                r = ratio_at(x)
                return r <= limit, r
            return self.decide(limit, lambda n: runs_at(x, n))

        ok, at_hi = probe(hi)
        if not ok and runs_at is not None and self.retries:  # never give up on one unlucky timing
            at_hi = runs_at(hi, 1 + self.retries)
            ok = at_hi <= limit
        if not ok:
            raise ConfigError(
                f"latency target {fraction:.4g} unreachable: {what} still runs at {at_hi:.1%} of the dense "
                f"model's measured latency, above the goal of {1 - fraction:.1%} (+{self.tolerance:.1%} "
                f"tolerance); at most {max(1 - at_hi, 0.0):.4g} of the latency can be removed: the rest is "
                "in layers, units and per-call overhead that channel removal does not shrink"
            )
        return smallest_reaching(lambda x: probe(x)[0], hi=hi, steps=self.steps)[1]


Removal = Mapping[int, Any]


class LatencyProbe:
    """Measured latency ratios of removals from one model: the memo behind a latency search.

    At construction it takes a mask-free copy of ``model`` (masks baked in,
    :func:`secateur.analysis.onnx.baked_copy`: latency depends on shapes only) and measures the dense
    latency (:attr:`dense_ms`). :meth:`ratio` compacts a copy of that base with a removal
    (``{group index: unit indices}`` of ``graph``, :func:`secateur.compact.make_plan`), times it against the
    base (:meth:`LatencyTarget.ratio_of`, interleaved) and keeps every measurement per distinct removal;
    the backend's dense runner (an ONNX Runtime session for ``"onnxruntime"``) is prepared once, the latest
    candidate's is kept for its re-measurements. :attr:`log` records one entry per measurement
    (``{"units_removed", "ratio", "run"}``).

    Args:
        target: the :class:`LatencyTarget` (backend or ``latency_fn``, inputs, threads, repeats).
        model: the model to prune (not changed).
        graph: its dependency graph (removals index ``graph.groups``).
        example_inputs: the inputs timed when ``target.inputs`` is None.
    """

    def __init__(self, target: LatencyTarget, model: nn.Module, graph: Any, example_inputs: Any) -> None:
        from secateur.analysis.onnx import baked_copy

        self.target = target
        self.graph = graph
        self.inputs = example_inputs
        self.base = baked_copy(model)
        self.base.eval()
        self.samples: dict[tuple, list[float]] = {}
        self.log: list[dict[str, Any]] = []
        self._dense_runner: Callable[[], Any] | None = None
        self._last: tuple[tuple, Callable[[], Any]] | None = None
        if target.latency_fn is None:
            from secateur.analysis.latency import compare_callables

            self._dense_runner = target.runner(self.base, example_inputs)
            res = compare_callables(
                {"dense": self._dense_runner}, threads=target.threads, repeats=target.repeats
            )
            self.dense_ms = _positive_ms(res["dense"]["median_ms"])
        else:
            self.dense_ms = target.measure(self.base, example_inputs)

    @staticmethod
    def key(removed: Removal) -> tuple:
        """A hashable key of a removal (groups with no unit removed are dropped)."""
        rm = {gi: np.asarray(r, dtype=np.int64) for gi, r in removed.items() if len(r)}
        return tuple(sorted((int(gi), tuple(r.tolist())) for gi, r in rm.items()))

    def candidate(self, removed: Removal) -> nn.Module:
        """A compacted copy of the mask-free base with ``removed`` gone (eval mode)."""
        from secateur.compact import compact, make_plan

        rm = {gi: np.asarray(r, dtype=np.int64) for gi, r in removed.items() if len(r)}
        return compact(copy.deepcopy(self.base), make_plan(self.graph, rm)).eval()

    def _measure_once(self, key: tuple, removed: Removal) -> float:
        t = self.target
        if t.latency_fn is not None:
            return t.ratio(self.candidate(removed), self.base, self.inputs)
        if self._last is None or self._last[0] != key:
            self._last = (key, t.runner(self.candidate(removed), self.inputs))
        assert self._dense_runner is not None
        return t.ratio_of(self._last[1], self._dense_runner)

    def ratio(self, removed: Removal, runs: int = 1) -> float:
        """The median of at least ``runs`` measured latency ratios (candidate / dense) of ``removed``;
        measures only the runs not made yet."""
        key = self.key(removed)
        got = self.samples.setdefault(key, [])
        while len(got) < runs:
            got.append(self._measure_once(key, removed))
            units = sum(len(r) for _, r in key)
            self.log.append({"units_removed": units, "ratio": got[-1], "run": len(got)})
        return float(np.median(got))


def _positive_ms(ms: Any) -> float:
    try:
        value = float(ms)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"latency_fn must return milliseconds as a number, got {ms!r}") from exc
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"latency_fn must return a positive finite time in ms, got {ms!r}")
    return value
