"""Measured latency targets: the search over each allocation's knob, its noise handling, and the backends
(eager, ONNX Runtime in memory). Timing values are never asserted, only their structure and sign."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from secateur.allocation.targets import LatencyTarget
from secateur.errors import ConfigError
from secateur.masks import masked_parameters
from secateur.pruners.channel import ChannelPruner

pytest.importorskip("onnxruntime")


def chain(widths=(8, 8, 8)) -> nn.Module:
    w1, w2, w3 = widths
    return nn.Sequential(
        nn.Conv2d(3, w1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(w1, w2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(w2, w3, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(w3, 10),
    )


def widths(model: nn.Module) -> tuple[int, ...]:
    return tuple(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def tiled(model: nn.Module, inputs) -> float:
    """Deterministic stand-in for kernels working in tiles of 4 channels: a step function of the widths."""
    t = 5.0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            t += math.ceil(m.out_channels / 4) * 4 * math.ceil(m.in_channels / 4) * 4
    return t


# -- the search ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("allocation", ["global", "isomorphic"])
def test_search_finds_the_smallest_removal_along_the_knob_that_meets_the_goal(allocation):
    """Independently of the bisection: walk the allocation's knob on a fine grid, time each distinct removal
    with the fake function, and take the first that meets (1 - s + tol) of the dense latency."""
    torch.manual_seed(3)
    x = torch.randn(1, 3, 8, 8)
    base = chain((8, 12, 8))
    s, tol = 0.4, 0.01
    model = chain((8, 12, 8))
    model.load_state_dict(base.state_dict())
    pruner = ChannelPruner(
        model, x, schedule=s, criterion="l1", allocation=allocation, target="latency",
        latency=LatencyTarget(tiled, tolerance=tol),
    )
    chosen = pruner.select(s)
    scores = pruner.scores()
    at, hi, _ = pruner._knob(scores)
    dense = tiled(base, None)
    first, seen = None, set()
    for v in np.linspace(0.0, hi, 2001):
        rm = at(float(v))
        key = pruner.latency_probe.key(rm)
        if key in seen:
            continue
        seen.add(key)
        if tiled(pruner.latency_probe.candidate(rm), None) <= (1 - s + tol) * dense:
            first = rm
            break
    assert first is not None and any(len(r) for r in first.values())  # a real removal, not the dense model
    assert {gi: r.tolist() for gi, r in chosen.items()} == {gi: first.get(gi, np.zeros(0)).tolist()
                                                           for gi in chosen}
    assert pruner.latency_probe.log and all(e["run"] == 1 for e in pruner.latency_probe.log)  # exact fn


def test_close_calls_are_remeasured_and_decided_by_the_median():
    lt = LatencyTarget(tiled, tolerance=0.0, retries=2, recheck=0.03)
    reads = [0.51, 0.55, 0.56]
    samples: list[float] = []

    def median_of(n: int) -> float:
        while len(samples) < n:
            samples.append(reads[len(samples)])
        return float(np.median(samples))

    ok, r = lt.decide(0.52, median_of)
    assert not ok and r == pytest.approx(0.55) and len(samples) == 3  # 0.51 alone would have passed
    samples.clear()
    assert lt.decide(0.70, median_of) == (True, 0.51) and len(samples) == 1  # far from the goal: one run
    samples.clear()
    assert LatencyTarget(tiled, retries=0).decide(0.52, median_of) == (True, 0.51) and len(samples) == 1


def test_search_with_rechecks_is_not_fooled_by_one_fast_outlier():
    """True ratios fall by 0.05 per step along 11 removals (k = 0..10); the goal is 0.5 (tolerance 0). The
    first timing of removal 4 (true 0.52) reads 0.49, a lucky block: without rechecks the search stops at 4,
    with them (0.49, 0.52, 0.52: median 0.52) it goes on to 5, the true answer."""
    true = {k: 0.72 - 0.05 * k for k in range(11)}
    counts: dict[int, int] = {}

    def runs_at(x: float, n: int) -> float:
        k = min(int(x * 10 + 1e-9), 10)
        counts[k] = max(counts.get(k, 0), n)
        return float(np.median([0.49 if (k, i) == (4, 0) else true[k] for i in range(n)]))

    lt = LatencyTarget(tiled, tolerance=0.0, retries=2, recheck=0.03, steps=12)
    x = lt.search(0.5, lambda v: runs_at(v, 1), 1.0, runs_at=runs_at)
    assert min(int(x * 10 + 1e-9), 10) == 5 and counts[4] == 3
    naive = LatencyTarget(tiled, tolerance=0.0, retries=0, steps=12)
    assert min(int(naive.search(0.5, lambda v: runs_at(v, 1), 1.0) * 10 + 1e-9), 10) == 4


def test_unreachable_is_declared_on_the_median_of_remeasurements_not_on_one_timing():
    reads = {0: [0.55, 0.45, 0.46]}  # at hi: one slow first timing, then two that meet 0.5

    def runs_at(x: float, n: int) -> float:
        return float(np.median(reads[0][:n])) if x == 1.0 else 0.4 + 0.2 * (1 - x)

    lt = LatencyTarget(tiled, tolerance=0.0, retries=2, recheck=0.0, steps=6)
    assert 0 < lt.search(0.5, lambda v: runs_at(v, 1), 1.0, runs_at=runs_at) <= 1.0
    reads[0] = [0.55, 0.56, 0.45]  # median 0.55: unreachable, and the message gives the median
    with pytest.raises(ConfigError, match=r"still runs at 55\.0% of the dense"):
        lt.search(0.5, lambda v: runs_at(v, 1), 1.0, runs_at=runs_at)


# -- the backends ----------------------------------------------------------------------------------------
def test_onnxruntime_backend_runs_the_same_model_and_returns_positive_ms():
    from secateur.analysis.backends import backend_latency, compare_backend, prepare_runner

    torch.manual_seed(0)
    model, x = chain(), torch.randn(4, 3, 8, 8)
    model.train()
    run = prepare_runner(model, x, "onnxruntime", threads=1)
    with torch.no_grad():
        want = model.eval()(x)
    model.train()
    np.testing.assert_allclose(run()[0], want.numpy(), rtol=1e-4, atol=1e-5)
    res = backend_latency(model, x, "onnxruntime", repeats=2)
    assert res["median_ms"] > 0 and res["n"] == 2 and res["device"] == "onnxruntime:cpu"
    assert model.training  # mode restored
    both = compare_backend({"a": model, "b": chain((4, 4, 4))}, x, "eager", repeats=2)
    assert list(both) == ["a", "b"] and all(r["median_ms"] > 0 for r in both.values())
    assert LatencyTarget(backend="onnxruntime", repeats=2).measure(model, x) > 0


def test_channel_pruner_latency_target_in_onnxruntime_compacts_a_measured_removal():
    torch.manual_seed(1)
    model, x = chain((8, 16, 8)), torch.randn(2, 3, 8, 8)
    lt = LatencyTarget(backend="onnxruntime", repeats=2, steps=4, tolerance=0.5)
    pruner = ChannelPruner(model, x, schedule=0.3, criterion="l1", target="latency", latency=lt)
    assert pruner.dense_ms > 0 and pruner.latency.backend == "onnxruntime"
    pruner.prune_to(0.3)
    log = pruner.latency_probe.log
    assert log and all(e["ratio"] > 0 and e["units_removed"] >= 0 for e in log)
    out = pruner.finalize()
    assert sum(widths(out)) < 32 and out(x).shape == (2, 10)


def test_bad_backend_names_are_named_errors_and_leave_the_model_untouched():
    model, x = chain(), torch.randn(1, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"unknown latency backend 'onnxrt' \(did you mean 'onnxruntime'"):
        ChannelPruner(model, x, schedule=0.3, target="latency", latency="onnxrt")
    with pytest.raises(ConfigError, match=r"backend 'onnx'; choose one of \('eager', 'onnxruntime'\)"):
        ChannelPruner(model, x, schedule=0.3, target="latency", latency="onnx")
    with pytest.raises(ConfigError, match=r"unknown latency backend 'tensorrt'"):
        LatencyTarget(backend="tensorrt")
    with pytest.raises(ConfigError, match="not both"):
        LatencyTarget(tiled, backend="onnxruntime")
    with pytest.raises(ConfigError, match="LatencyTarget or a backend name"):
        ChannelPruner(model, x, schedule=0.3, target="latency", latency=3)
    with pytest.raises(ConfigError, match="exporter"):
        LatencyTarget(backend="onnxruntime", exporter="tvm")
    with pytest.raises(ConfigError, match="retries"):
        LatencyTarget(retries=-1)
    assert not list(masked_parameters(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
