"""Each allocation's defining property, checked against an independent computation."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from secateur.allocation import (
    ALLOCATIONS,
    ResourceTarget,
    Sensitivity,
    erk,
    erk_densities,
    global_,
    global_capped,
    lamp,
    sensitivity_sparsities,
    sensitivity_sweep,
    uniform,
)
from secateur.allocation.search import smallest_reaching
from secateur.allocation.structured import (
    CostModel,
    uniform_bracket,
    uniform_fraction_for,
    uniform_removal,
    uniform_removal_for,
)
from secateur.analysis import count_macs, count_params
from secateur.errors import ConfigError
from secateur.graph.groups import Group, Member
from secateur.masks import masked_parameters
from secateur.pruners.element import Pruner
from secateur.scope import Scope


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def test_registered_names():
    for name in ("uniform", "global_capped", "erk", "lamp"):
        assert name in ALLOCATIONS
    model = net()
    pruner = Pruner(model, 0.6, allocation="erk")
    pruner.step(0)
    assert pruner.sparsity() == pytest.approx(0.6, abs=0.01)


def test_uniform_is_the_same_fraction_everywhere():
    scores = {"a": torch.rand(10, 4), "b": torch.rand(3, 3)}
    masks = uniform(scores, 0.5)
    assert int((~masks["a"]).sum()) == 20 and int((~masks["b"]).sum()) == 4


def test_global_capped_never_exceeds_the_cap_and_redistributes():
    torch.manual_seed(0)
    scores = {"small": torch.rand(20) * 0.01, "big1": torch.rand(50), "big2": torch.rand(30) + 0.2}
    masks = global_capped(scores, 0.4, max_sparsity=0.7)
    k = math.floor(0.4 * 100)
    assert sum(int((~m).sum()) for m in masks.values()) == k
    # The small layer would be wiped out by a plain global threshold; the cap holds it at 70%.
    assert int((~global_(scores, 0.4)["small"]).sum()) == 20
    assert int((~masks["small"]).sum()) == 14
    assert torch.equal(~masks["small"], scores["small"] <= torch.sort(scores["small"]).values[13])
    # Independent: the remaining 26 go to the 26 lowest of the other layers together.
    rest = torch.cat([scores["big1"], scores["big2"]])
    thr = torch.sort(rest).values[25]
    assert int((scores["big1"] <= thr).sum()) <= 35  # below big1's own cap
    assert torch.equal(~masks["big1"], scores["big1"] <= thr)
    assert torch.equal(~masks["big2"], scores["big2"] <= thr)
    with pytest.raises(ConfigError, match="unreachable with max_sparsity 0.5"):
        global_capped(scores, 0.6, max_sparsity=0.5)


def test_erk_densities_are_proportional_to_the_erdos_renyi_kernel_ratio():
    shapes = {"conv1": (8, 3, 3, 3), "conv2": (16, 8, 3, 3), "fc1": (32, 64), "fc2": (10, 32), "tiny": (2, 2)}
    dens = erk_densities(shapes, 0.2)
    ratio = {
        "conv1": (3 + 8 + 3 + 3) / (3 * 8 * 3 * 3),
        "conv2": (8 + 16 + 3 + 3) / (8 * 16 * 3 * 3),
        "fc1": (64 + 32) / (64 * 32),  # (n_in + n_out) / (n_in * n_out)
        "fc2": (32 + 10) / (32 * 10),
        "tiny": (2 + 2) / (2 * 2),
    }
    assert dens["tiny"] == 1.0  # eps * 1 > 1: set dense and re-solved
    sparse = [n for n in shapes if dens[n] < 1.0]
    eps = {dens[n] / ratio[n] for n in sparse}
    assert max(eps) == pytest.approx(min(eps))
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    assert sum(dens[n] * sizes[n] for n in shapes) == pytest.approx(0.2 * sum(sizes.values()))
    scores = {n: torch.rand(s) for n, s in shapes.items()}
    masks = erk(scores, 0.8)
    for n in shapes:
        assert int(masks[n].sum()) == pytest.approx(dens[n] * sizes[n], abs=1)


def test_lamp_allocation_is_global_on_lamp_scores_and_keeps_every_layer_alive():
    w = {"a": torch.randn(30), "b": torch.randn(40) * 1e-3}
    masks = lamp({n: v.abs() for n, v in w.items()}, 0.9)
    assert int(masks["b"].sum()) >= 1 and int(masks["a"].sum()) >= 1
    assert int((~global_({n: v.abs() for n, v in w.items()}, 0.9)["a"]).sum()) < 30
    # Independent: LAMP scores by the sorted suffix-sum formula, then one global threshold.
    ref = {}
    for n, v in w.items():
        sq = v**2
        ref[n] = torch.tensor([float(sq[u]) / float(sq[v.abs() >= v[u].abs()].sum()) for u in range(len(v))])
    expected = global_(ref, 0.9)
    for n in w:
        assert torch.equal(masks[n], expected[n])


def test_sensitivity_sweep_picks_largest_sparsity_within_tolerance():
    model = net()
    targets = Scope().resolve(model)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        dense = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def evaluate() -> float:
        with torch.no_grad():
            return -float((model(x) - dense).pow(2).mean())

    sweep = sensitivity_sweep(targets, evaluate, sparsities=(0.0, 0.3, 0.6, 0.9))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(sweep[t.name][0.0] == 0.0 for t in targets)
    chosen = sensitivity_sparsities(sweep, baseline=0.0, tolerance=1e-3)
    for name, curve in sweep.items():
        within = [s for s, m in curve.items() if m >= -1e-3]
        assert chosen[name] == max(within)
    synthetic = {"a": {0.1: 0.9, 0.5: 0.89, 0.7: 0.8, 0.9: 0.895}, "b": {0.1: 0.5}}
    assert sensitivity_sparsities(synthetic, 0.9, 0.02) == {"a": 0.9, "b": 0.0}

    alloc = Sensitivity({"a": 0.5, "b": 0.9})
    scores = {"a": torch.rand(100), "b": torch.rand(100)}
    masks = alloc(scores, 0.7)
    assert int((~masks["a"]).sum()) == 50 and int((~masks["b"]).sum()) == 90
    half = alloc(scores, 0.35)
    assert int((~half["a"]).sum()) == 25 and int((~half["b"]).sum()) == 45
    with pytest.raises(ConfigError, match="sensitivity sweep allows at most 0.7"):
        alloc(scores, 0.8)


def test_params_target_counts_the_whole_model_and_names_protected_share():
    model = net()
    scope = Scope(exclude_first=True, exclude_last=True)
    pruner = Pruner(model, 0.0, scope=scope)
    total = count_params(model)["params"]
    pruner.allocate = ResourceTarget(model, "params")
    pruner.prune_to(0.5)
    zeros = total - count_params(model)["nonzero_params"]
    assert zeros == math.ceil(0.5 * total)
    scoped = sum(t.module.weight.numel() for t in pruner.targets)
    protected = 1 - scoped / total
    with pytest.raises(ConfigError, match=rf"target 0.95 of parameters unreachable.*{protected:.1%}"):
        pruner.prune_to(0.95)


def test_macs_target_reaches_the_fraction_of_dense_macs():
    model = net()
    x = torch.randn(1, 3, 8, 8)
    dense = count_macs(model, x)["macs"]
    pruner = Pruner(model, 0.0, scope=Scope(exclude_first=True))
    pruner.allocate = ResourceTarget(model, "macs", example_inputs=x)
    pruner.prune_to(0.4)
    sparse = count_macs(model, x)["sparse_macs"]
    removed = 1 - sparse / dense
    assert 0.4 <= removed <= 0.41
    with pytest.raises(ConfigError, match="MACs unreachable"):
        pruner.prune_to(0.9)  # the protected stem conv holds a large share of the MACs
    with pytest.raises(ConfigError, match="example_inputs"):
        ResourceTarget(model, "macs")


# -- measured latency targets (ChannelPruner(target="latency")) ----------------------------------------
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


def tiled_latency(model: nn.Module, inputs) -> float:
    """A deterministic stand-in for a kernel that works in tiles of 4 channels (a step function)."""
    t = 5.0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            t += math.ceil(m.out_channels / 4) * 4 * math.ceil(m.in_channels / 4) * 4
    return t


def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_latency_target_uniform_finds_the_smallest_removal_meeting_a_stepwise_latency():
    from secateur.allocation.targets import LatencyTarget
    from secateur.pruners.channel import ChannelPruner

    torch.manual_seed(0)
    model, x = chain(), torch.randn(2, 3, 8, 8)
    calls = []

    def fake(m, inputs):
        calls.append(tuple(conv_widths(m)))
        return tiled_latency(m, inputs)

    lt = LatencyTarget(fake, tolerance=0.02)
    pruner = ChannelPruner(
        model, x, schedule=0.5, criterion="l1", allocation="uniform", target="latency", latency=lt
    )
    pruner.prune_to(0.5)
    # Independently: every group has 8 units, so uniform allocation removes the same k from each; the
    # smallest k whose tiled latency is within (1 - 0.5 + 0.02) of the dense one.
    dense = tiled_latency(chain(), None)
    k_star = min(k for k in range(8) if tiled_latency(chain((8 - k,) * 3), None) <= (0.52) * dense)
    assert k_star == 4  # widths 5..7 still use two tiles: a MAC-proportional guess (k=3) would miss
    compacted = pruner.finalize()
    assert conv_widths(compacted) == [8 - k_star] * 3
    assert pruner.history == [] and pruner.dense_ms == dense
    assert tiled_latency(compacted, None) <= 0.52 * dense
    assert all(len(set(c)) == 1 for c in calls)  # every probe was a compacted, uniformly pruned copy


def test_latency_target_global_with_affine_latency_equals_the_mac_target():
    from secateur.allocation.targets import LatencyTarget
    from secateur.pruners.channel import ChannelPruner

    torch.manual_seed(1)
    base, x = chain((8, 12, 6)), torch.randn(1, 3, 8, 8)
    m0 = count_macs(base, x)["macs"]

    def affine(m, inputs):  # 2 ms of fixed overhead + 1 ms per 1000 MACs of one image
        return 2.0 + count_macs(m, x)["macs"] / 1000

    s, tol = 0.45, 0.01
    lat_model = chain((8, 12, 6))
    lat_model.load_state_dict(base.state_dict())
    lp = ChannelPruner(
        lat_model,
        x,
        schedule=s,
        criterion="l1",
        target="latency",
        latency=LatencyTarget(affine, tolerance=tol),
    )
    lp.prune_to(s)
    # latency <= (1 - s + tol) L0  <=>  MACs <= ((1 - s + tol) L0 - 2) * 1000: a MAC target of f_star
    l0 = 2.0 + m0 / 1000
    f_star = 1 - ((1 - s + tol) * l0 - 2.0) * 1000 / m0
    mac_model = chain((8, 12, 6))
    mac_model.load_state_dict(base.state_dict())
    mp = ChannelPruner(mac_model, x, schedule=f_star, criterion="l1", target="macs")
    mp.prune_to(f_star)
    assert lp.removed_units() == mp.removed_units() and lp.removed_units()
    assert lp.sparsity() == pytest.approx(1 - affine(lp.finalize(), x) / l0)
    assert affine(lat_model, x) <= (1 - s + tol) * l0


def test_unreachable_latency_target_says_why_and_leaves_the_model_untouched():
    from secateur.allocation.targets import LatencyTarget
    from secateur.pruners.channel import ChannelPruner

    model, x = chain(), torch.randn(1, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lt = LatencyTarget(tiled_latency, tolerance=0.02)
    # the most-pruned model (width 1, still one tile of 4) runs 53 of the dense 165 "ms": at most 0.679
    with pytest.raises(
        ConfigError, match=r"0\.8 of latency is unreachable.*at most 0\.6788.*dense 165 ms.*at 32\.1%"
    ):
        ChannelPruner(
            model, x, schedule=0.8, criterion="l1", allocation="uniform", target="latency", latency=lt
        )
    pruner = ChannelPruner(
        model, x, schedule=0.5, criterion="l1", allocation="uniform", target="latency", latency=lt
    )
    with pytest.raises(ConfigError, match="unreachable"):
        pruner.prune_to(0.75)
    assert not list(masked_parameters(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the search itself explains an unreachable goal with the measured numbers
    with pytest.raises(
        ConfigError, match=r"latency target 0\.9 unreachable: x still runs at 32\.1% of the dense model"
    ):
        lt.search(0.9, lambda v: 53 / 165, 1.0, what="x")


def test_latency_settings_are_validated():
    from secateur.allocation.targets import LatencyTarget
    from secateur.pruners.channel import ChannelPruner

    with pytest.raises(ConfigError, match="tolerance"):
        LatencyTarget(tolerance=1.5)
    with pytest.raises(ConfigError, match="callable"):
        LatencyTarget(latency_fn=3.0)
    with pytest.raises(ConfigError, match="positive finite"):
        LatencyTarget(lambda m, i: -1.0).measure(chain(), None)
    with pytest.raises(ConfigError, match="use target='latency'"):
        ChannelPruner(chain(), torch.randn(1, 3, 8, 8), schedule=0.1, target="macs", latency=LatencyTarget())
    with pytest.raises(ConfigError, match="do not make dense kernels faster"):
        ResourceTarget(chain(), "latency")
    # the default timer (torch.utils.benchmark, fixed threads, median) returns milliseconds
    assert LatencyTarget(repeats=2).measure(chain(), torch.randn(1, 3, 8, 8)) > 0


# -- structured: the bisection and the least-overshoot uniform removal ---------------------------------
@pytest.mark.parametrize("steps", [0, 1, 7, 40])
@pytest.mark.parametrize("threshold", [1e-9, 0.3, 0.5, 0.999])
def test_smallest_reaching_brackets_the_threshold_in_exactly_steps_calls(threshold, steps):
    calls = []

    def reaches(x: float) -> bool:
        calls.append(x)
        return x >= threshold

    lo, hi = smallest_reaching(reaches, hi=1.0, steps=steps)
    assert len(calls) == steps
    assert hi - lo == 2.0**-steps  # exact: halvings of [0, 1] are dyadic
    assert lo < threshold <= hi


def hand_group(name: str, n: int) -> Group:
    """A group of ``n`` channels, one member, all prunable."""
    member = Member(f"{name}.weight", 0, np.arange(n))
    return Group(name, n, [member], np.ones(n, dtype=bool), [], np.arange(n))


def per_unit_cost(sizes: list[int], base: list[float]) -> CostModel:
    """Group ``g`` costs ``base[g]`` (e.g. MACs), scaling with its kept fraction; total = Σ base."""
    cm = CostModel(sum(base))
    for gi, (n, b) in enumerate(zip(sizes, base)):
        cm.add_item(b, [cm.add_slot(gi, np.ones(n, dtype=np.int64))])
    return cm


def test_uniform_removal_for_steps_groups_one_at_a_time_lowest_scores_first():
    """Three groups of 16 channels step together at every common fraction k/16: for a target between the
    removals at 5/16 and 6/16 the smallest common fraction reaching it overshoots by a step of all three
    (VGG's four 64-channel layers do this). uniform_removal_for takes the steps one at a time, the group
    whose next channel scores lowest (relative to its group's mean) first, and stops at the target."""
    sizes, base = [16, 16, 16], [100.0, 100.0, 100.0]
    groups = [hand_group(f"g{i}", n) for i, n in enumerate(sizes)]
    rng = np.random.default_rng(0)
    scores = {gi: rng.uniform(1.0, 2.0, n) for gi, n in enumerate(sizes)}
    scores[1][:6] = np.linspace(0.01, 0.06, 6)  # group 1's six weakest channels are near zero
    cost = per_unit_cost(sizes, base)
    none = {gi: np.zeros(0, dtype=np.int64) for gi in range(3)}
    target = 0.33  # 5/16 = 0.3125 removed just below 6/16; one group's step adds 1/48
    plain = uniform_removal(groups, scores, none, uniform_fraction_for(groups, scores, none, cost, target))
    assert [plain[gi].size for gi in range(3)] == [6, 6, 6]  # every group stepped: 0.375 removed
    rm = uniform_removal_for(groups, scores, none, cost, target)
    assert [rm[gi].size for gi in range(3)] == [5, 6, 5]
    assert cost.state(rm).removed_fraction() == pytest.approx((5 + 6 + 5) / 48)
    assert target <= cost.state(rm).removed_fraction() < cost.state(plain).removed_fraction()
    for gi in range(3):  # each group's removal is a uniform one: its lowest-scoring channels
        assert set(rm[gi]) == set(np.argsort(scores[gi], kind="stable")[: rm[gi].size])


@pytest.mark.parametrize("target", [0.0, 0.1, 0.26, 0.5, 0.62, 0.9, 0.99])
def test_uniform_removal_for_reaches_the_target_within_one_step_of_a_common_fraction(target):
    sizes, base = [8, 16, 16, 16, 12], [40.0, 300.0, 90.0, 70.0, 25.0]
    groups = [hand_group(f"g{i}", n) for i, n in enumerate(sizes)]
    rng = np.random.default_rng(1)
    scores = {gi: rng.random(n) for gi, n in enumerate(sizes)}
    cost = per_unit_cost(sizes, base)
    none = {gi: np.zeros(0, dtype=np.int64) for gi in range(5)}
    lo, hi = uniform_bracket(groups, scores, none, cost, target)
    rm = uniform_removal_for(groups, scores, none, cost, target)
    at_lo, at_hi = (uniform_removal(groups, scores, none, f) for f in (lo, hi))
    if hi == 1.0:  # unreachable (every group keeps a channel): the most uniform allocation removes
        assert target > 0.9 and all(np.array_equal(rm[gi], at_hi[gi]) for gi in range(5))
        return
    assert cost.state(rm).removed_fraction() >= target - 1e-12
    assert cost.state(rm).removed_fraction() <= cost.state(at_hi).removed_fraction()
    assert all(np.array_equal(rm[gi], at_lo[gi]) or np.array_equal(rm[gi], at_hi[gi]) for gi in range(5))
    stepped = [gi for gi in range(5) if not np.array_equal(rm[gi], at_lo[gi])]
    if stepped:  # it stops at the target: without the last step taken (one of them), the target is missed
        fewer = [{**rm, gi: at_lo[gi]} for gi in stepped]
        assert any(cost.state(f).removed_fraction() < target - 1e-12 for f in fewer)
