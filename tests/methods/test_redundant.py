"""Redundant feature pruning (Ayinde & Zurada 2018): identical filters collapse, scale is ignored."""

import numpy as np
import pytest
import torch
from torch import nn

from secateur.criteria.group.redundant import RedundantCriterion
from secateur.errors import ConfigError
from secateur.graph import DependencyGraph
from secateur.methods.redundant import filter_clusters, prune_redundant
from secateur.zoo import create_model


def _net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    with torch.no_grad():
        w = torch.linalg.qr(torch.randn(18, 18))[0][:6].reshape(6, 2, 3, 3)  # orthogonal filters
        model[0].weight.copy_(w)
        model[0].weight[4].copy_(model[0].weight[1])  # filter 4 duplicates filter 1
    return model


def test_identical_filters_collapse_into_one():
    model = _net()
    x = torch.randn(2, 2, 6, 6)
    clusters = filter_clusters(model, x, tau=0.9)
    labels, keep = clusters["0.weight:0"]
    assert labels[1] == labels[4] and len(labels.unique()) == 5
    assert int(keep[[1, 4]].sum()) == 1
    prune_redundant(model, x, tau=0.9)
    assert model[0].out_channels == 5 and model[3].in_channels == 5


def test_scaling_a_filter_does_not_change_its_cluster():
    model = _net()
    x = torch.randn(2, 2, 6, 6)
    before = filter_clusters(model, x, tau=0.9)["0.weight:0"][0]
    with torch.no_grad():
        model[0].weight[4].mul_(7.0)
        model[0].weight[2].mul_(0.01)
    after = filter_clusters(model, x, tau=0.9)["0.weight:0"][0]
    assert torch.equal(before, after)


def test_sparsity_budget_is_exact_and_resnet_coupling():
    model = _net()
    prune_redundant(model, torch.randn(2, 2, 6, 6), sparsity=0.5)
    assert model[0].out_channels == 3 and model[3].out_channels == 2
    net = create_model("resnet8").eval()
    x = torch.randn(2, 1, 28, 28)
    n0 = sum(p.numel() for p in net.parameters())
    prune_redundant(net, x, sparsity=0.25)
    assert sum(p.numel() for p in net.parameters()) < n0


def test_errors_leave_model_untouched():
    model = _net()
    before = [p.clone() for p in model.parameters()]
    x = torch.randn(1, 2, 6, 6)
    for kwargs in (
        {},
        {"tau": 0.5, "sparsity": 0.5},
        {"tau": 2.0},
        {"sparsity": 1.0},
        {"tau": 0.5, "linkage": "x"},
    ):
        with pytest.raises(ConfigError):
            prune_redundant(model, x, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _planted(seed: int, n: int = 12) -> nn.Module:
    """One conv group of ``n`` filters: three planted directions plus noise, random scales."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 18, generator=g, dtype=torch.float64)
    f = centres[torch.arange(n) % 3] + 0.3 * torch.randn(n, 18, generator=g, dtype=torch.float64)
    f = f * torch.rand(n, 1, generator=g, dtype=torch.float64).add(0.2)
    model = nn.Sequential(nn.Conv2d(2, n, 3, bias=False), nn.ReLU(), nn.Conv2d(n, 3, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(f.view(n, 2, 3, 3))
    return model


@pytest.mark.parametrize("linkage", ["single", "complete", "average"])
def test_scores_below_minus_tau_are_the_clusters_at_tau_minus_their_strongest_filter(linkage):
    from secateur.criteria.group.functional import redundant_features

    for seed in range(3):
        model = _planted(seed)
        graph = DependencyGraph.build(model, torch.randn(1, 2, 5, 5, dtype=torch.float64))
        (g,) = graph.prunable_groups()
        scores = RedundantCriterion(linkage).group_scores(g, model)
        w = model[0].weight.detach().reshape(12, -1)
        strength = w.norm(dim=1)
        for tau in (0.95, 0.7, 0.4, 0.0, -0.5):
            labels, _ = redundant_features(w, tau, linkage)
            kept = torch.from_numpy(scores > -tau)
            for c in labels.unique():
                members = (labels == c).nonzero().flatten()
                assert int(kept[members].sum()) == 1, (seed, tau)  # one filter per cluster stays
                assert int(members[kept[members]]) == int(members[strength[members].argmax()])


def test_redundant_is_a_registered_criterion_the_driver_uses():
    from secateur.criteria.group import available_group_criteria
    from secateur.pruners.channel import ChannelPruner
    from secateur.pruners.oneshot import prune_channels

    assert "redundant" in available_group_criteria()
    x = torch.randn(2, 2, 6, 6)
    a, b, c = _net(), _net(), _net()
    _, plan_a = prune_redundant(a, x, sparsity=0.5)
    _, plan_b = prune_channels(b, x, 0.5, criterion="redundant", allocation="uniform")
    pruner = ChannelPruner(c, x, schedule=0.5, criterion="redundant", allocation="uniform")
    pruner.step(0)
    pruner.finalize()
    assert plan_a["groups"] == plan_b["groups"] == pruner.plan["groups"]


def test_tau_removes_exactly_the_filters_scoring_below_minus_tau_on_resnet():
    net = create_model("resnet8").eval()
    x = torch.randn(2, 1, 28, 28)
    graph = DependencyGraph.build(net, x)
    crit = RedundantCriterion()
    expect = {}
    for g in graph.prunable_groups():
        s = crit.group_scores(g, net)
        if s is not None and ((s <= -0.1) & g.prunable).any():
            expect[g.name] = sorted(np.nonzero((s <= -0.1) & g.prunable)[0].tolist())
    assert expect
    _, plan = prune_redundant(net, x, tau=0.1)
    assert {gr["group"]: sorted(gr["removed"]) for gr in plan["groups"]} == expect
