"""Group criteria (secateur.criteria.group) against independent formulas on tiny networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from secateur.criteria.group import (
    FisherCriterion,
    TaylorCriterion,
    available_group_criteria,
    get_group_criterion,
)
from secateur.criteria.group.functional import fisher_channel_scores
from secateur.errors import ConfigError
from secateur.graph import DependencyGraph
from secateur.pruners.channel import ChannelPruner


def tiny_net(c: int = 4) -> nn.Module:
    """conv(2->c) - BN - ReLU - conv(c->3) - pool - flatten: one prunable group of c channels."""
    return nn.Sequential(
        nn.Conv2d(2, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.Conv2d(c, 3, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def only_group(model: nn.Module, x: torch.Tensor) -> tuple[DependencyGraph, int]:
    graph = DependencyGraph.build(model, x)
    ids = [gi for gi, g in enumerate(graph.groups) if g.n_prunable > 0]
    assert len(ids) == 1
    return graph, ids[0]


def test_registry_names_and_errors():
    assert {"random", "l1", "l2", "bn_scale", "fpgm", "taylor", "fisher"} <= set(available_group_criteria())
    with pytest.raises(ConfigError, match="unknown group criterion"):
        get_group_criterion("nope")
    with pytest.raises(ConfigError, match="fpgm method"):
        get_group_criterion("fpgm", method="mean")


def test_l1_is_the_normalised_sum_of_filter_norms_and_reads_through_masks():
    model = tiny_net()
    with torch.no_grad():
        model[1].bias.uniform_(-1, 1)
    x = torch.randn(2, 2, 8, 8)
    graph, gi = only_group(model, x)
    ours = get_group_criterion("l1").scores(model, graph, [gi])[gi]
    # independent formula: producing members (conv filters and bias, BN γ and β), each as mean |w| per
    # channel divided by its mean over channels, summed
    parts = [
        model[0].weight.detach().double().abs().mean((1, 2, 3)),
        model[0].bias.detach().double().abs(),
        model[1].weight.detach().double().abs(),
        model[1].bias.detach().double().abs(),
    ]
    expected = sum(p / p.mean() for p in parts).numpy()  # float64, as the criterion computes
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    # with masks attached (parametrizations), names still resolve and masked units score 0
    pruner = ChannelPruner(model, x, schedule=0.25, criterion="l1", allocation="uniform", graph=graph)
    pruner.step(0)
    (rm,) = pruner.removed.values()
    after = pruner.criterion.scores(model, graph, [gi])[gi]
    assert rm.size == 1 and after[rm[0]] == 0.0


def test_callable_criterion_and_shape_check():
    model = tiny_net()
    x = torch.randn(2, 2, 8, 8)
    pruner = ChannelPruner(model, x, schedule=0.25, criterion=lambda g, m: np.arange(g.n_units, dtype=float))
    pruner.step(0)
    assert [rm.tolist() for rm in pruner.removed.values()] == [[0]]
    bad = ChannelPruner(tiny_net(), x, schedule=0.25, criterion=lambda g, m: np.ones(2))
    with pytest.raises(ConfigError, match="shape"):
        bad.step(0)


def test_taylor_group_score_is_squared_sum_of_w_times_g_and_ema_follows_momentum():
    model = tiny_net()
    model.train()
    x0 = torch.randn(2, 2, 8, 8)
    graph, gi = only_group(model, x0)
    crit = TaylorCriterion(momentum=0.9)

    def batch(seed: int) -> np.ndarray:
        torch.manual_seed(seed)
        x, y = torch.randn(4, 2, 8, 8), torch.randint(0, 3, (4,))
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        c1, bn, c2 = model[0], model[1], model[3]
        # independent formula: per channel c, (Σ over every coupled weight of w·g)^2

        def wg(p: torch.Tensor) -> torch.Tensor:
            return p.detach().double() * p.grad.double()

        s = (
            wg(c1.weight).sum((1, 2, 3))
            + wg(c1.bias)
            + wg(bn.weight)
            + wg(bn.bias)
            + wg(c2.weight).sum((0, 2, 3))
        )
        expected = (s**2).numpy()
        crit.accumulate(model, graph, [gi])
        return expected

    e1, e2 = batch(1), batch(2)
    first = crit.scores(model, graph, [gi])[gi]
    np.testing.assert_allclose(first, (e1 + e2) / 2, rtol=1e-10, atol=1e-15)
    e3 = batch(3)
    second = crit.scores(model, graph, [gi])[gi]
    np.testing.assert_allclose(second, 0.9 * first + 0.1 * e3, rtol=1e-10, atol=1e-15)
    # no batch since the last step: the EMA is reused, not stepped
    np.testing.assert_allclose(crit.scores(model, graph, [gi])[gi], second)


def test_taylor_without_gradients_raises_config_error():
    model = tiny_net()
    x = torch.randn(2, 2, 8, 8)
    graph, gi = only_group(model, x)
    with pytest.raises(ConfigError, match="needs gradients"):
        TaylorCriterion().scores(model, graph, [gi])


def test_fisher_matches_theis_formula_at_the_producer_output():
    model = tiny_net()
    x0 = torch.randn(2, 2, 8, 8)
    graph, gi = only_group(model, x0)
    crit = FisherCriterion()
    crit.attach(model, graph, [gi])
    acts = []

    def keep(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        out.retain_grad()
        acts.append(out)

    h = model[0].register_forward_hook(keep)
    x, y = torch.randn(5, 2, 8, 8), torch.randint(0, 3, (5,))
    nn.functional.cross_entropy(model(x), y).backward()
    h.remove()
    crit.detach()
    got = crit.scores(model, graph, [gi])[gi]
    a = acts[0]
    expected = fisher_channel_scores(a, a.grad).numpy()  # 1/(2N) Σ_n (Σ_hw a g)^2
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    crit.after_prune()
    with pytest.raises(ConfigError, match="fisher"):
        crit.scores(model, graph, [gi])


def test_fpgm_removes_the_filter_closest_to_the_geometric_median():
    model = nn.Sequential(
        nn.Conv2d(1, 5, 2), nn.ReLU(), nn.Conv2d(5, 2, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    eye = torch.eye(4)
    c = torch.full((4,), 3.0)
    filters = torch.stack([c + eye[0], c - eye[0], c + eye[1], c - eye[1], c + 0.1 * eye[2]])
    with torch.no_grad():
        model[0].weight.copy_(filters.view(5, 1, 2, 2))
    x = torch.randn(1, 1, 6, 6)
    # not the smallest L1 norm: c - e0 and c - e1 are smaller than the median filter
    assert int(filters.abs().sum(1).argmin()) != 4
    pruner = ChannelPruner(model, x, schedule=0.2, criterion="fpgm", allocation="uniform")
    pruner.step(0)
    assert [rm.tolist() for rm in pruner.removed.values()] == [[4]]


def test_bn_scale_removes_smallest_abs_gamma_and_names_groups_without_norm():
    model = tiny_net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.5, -0.05, 2.0]))
    x = torch.randn(2, 2, 8, 8)
    pruner = ChannelPruner(model, x, schedule=0.25, criterion="bn_scale")
    pruner.step(0)
    assert [rm.tolist() for rm in pruner.removed.values()] == [[2]]

    no_bn = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    p2 = ChannelPruner(no_bn, torch.randn(2, 3), schedule=0.5, criterion="bn_scale")
    with pytest.raises(ConfigError, match=r"bn_scale: group 0\.weight:0 has no BatchNorm"):
        p2.step(0)
