"""Group criteria (secateur.criteria.group) against independent formulas on tiny networks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import secateur as sc
from secateur.criteria.group import (
    FisherCriterion,
    TaylorCriterion,
    available_group_criteria,
    get_group_criterion,
)
from secateur.criteria.group.base import producer_members
from secateur.criteria.group.functional import fisher_channel_scores
from secateur.errors import ConfigError
from secateur.graph import DependencyGraph
from secateur.pruners.channel import ChannelPruner
from secateur.zoo import create_model


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


def test_l1_is_the_group_l1_norm_of_each_channel_and_reads_through_masks():
    """The old formula (producers only, β and biases included, each member mean-normalised) ranked
    channels unlike Torch-Pruning's group L1 norm and lost to it after fine-tuning (docs/tradeoff.md):
    ``l1`` is now Σ|w| over every weight removed with the channel, biases and β skipped."""
    model = tiny_net()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1, 1)
    x = torch.randn(2, 2, 8, 8)
    graph, gi = only_group(model, x)
    ours = get_group_criterion("l1").scores(model, graph, [gi])[gi]
    w0, w3 = model[0].weight.detach().double(), model[3].weight.detach().double()
    filters = w0.abs().sum((1, 2, 3))  # producing conv: each channel's filter
    gamma = model[1].weight.detach().double().abs()  # BatchNorm scale γ
    reads = w3.abs().sum((0, 2, 3))  # consuming conv: each channel's input slice
    np.testing.assert_allclose(ours, (filters + gamma + reads).numpy(), rtol=1e-6)
    l2 = get_group_criterion("l2").scores(model, graph, [gi])[gi]
    sq = w0.pow(2).sum((1, 2, 3)) + gamma.pow(2) + w3.pow(2).sum((0, 2, 3))
    np.testing.assert_allclose(l2, sq.numpy(), rtol=1e-6)
    filt = get_group_criterion("l1", producers_only=True).scores(model, graph, [gi])[gi]
    np.testing.assert_allclose(filt, (filters + gamma).numpy(), rtol=1e-6)
    # with masks attached (parametrizations), names still resolve and masked units score 0
    pruner = ChannelPruner(model, x, schedule=0.25, criterion="l1", allocation="uniform", graph=graph)
    pruner.step(0)
    (rm,) = pruner.removed.values()
    after = pruner.criterion.scores(model, graph, [gi])[gi]
    assert rm.size == 1 and after[rm[0]] == 0.0


def test_l1_removes_the_channel_the_next_layer_never_reads_whatever_its_shift():
    """A hand-built group whose best channel is known: channel 0 is read by no consumer (its input slice
    is zero), so removing it leaves the output exactly as it was. Filters and γ are equal across channels,
    and channel 0 has the largest BatchNorm shift β: the previous formula (producers only, β counted, each
    member mean-normalised) ranked it first to keep and removed a channel the network uses."""
    torch.manual_seed(0)
    model = tiny_net().double().eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.sign(torch.randn(4, 2, 3, 3)) * 0.3)  # equal L1 norm per filter
        model[0].bias.fill_(0.1)
        model[1].weight.fill_(1.0)
        model[1].bias.copy_(torch.tensor([3.0, 0.1, 0.2, 0.1]))
        model[1].running_var.uniform_(0.5, 2.0)
        model[3].weight.uniform_(0.2, 1.0)
        model[3].weight[:, 0] = 0.0  # nobody reads channel 0
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    dense = model(x)
    graph, gi = only_group(model, x)
    scores = get_group_criterion("l1").scores(model, graph, [gi])[gi]
    assert int(np.argmin(scores)) == 0
    with torch.no_grad():  # biases and β are not read: moving them leaves the scores as they are
        model[1].bias.mul_(-7.0)
        model[0].bias.add_(5.0)
    assert np.array_equal(get_group_criterion("l1").scores(model, graph, [gi])[gi], scores)
    with torch.no_grad():
        model[1].bias.div_(-7.0)
        model[0].bias.sub_(5.0)
    pruned, plan = sc.prune_channels(copy.deepcopy(model), x, 0.25, criterion="l1")
    assert [g["removed"] for g in plan["groups"]] == [[0]]
    torch.testing.assert_close(pruned(x), dense, rtol=1e-12, atol=1e-12)


def test_l1_sums_every_weight_of_a_residual_group_by_hand():
    """On a residual net (groups with several producers, BatchNorms and consumers, and the classifier's
    input), each channel's score is Σ|w| over every parameter slice of it but biases, by index loops in
    float64."""
    torch.manual_seed(0)
    model = create_model("resnet8", width=0.25)
    x = torch.randn(2, 1, 28, 28)
    graph = DependencyGraph.build(model, x)
    ids = [gi for gi, g in enumerate(graph.groups) if g.n_prunable]
    scores = get_group_criterion("l1").scores(model, graph, ids)
    params = dict(model.named_parameters())
    assert max(len(producer_members(graph.groups[gi], model)) for gi in ids) >= 2  # residual groups
    for gi in ids:
        g = graph.groups[gi]
        expected = np.zeros(g.n_units)
        for m in g.members:
            if m.is_buffer or m.name.endswith(".bias"):
                continue
            w = params[m.name].detach().double()
            for i, u in enumerate(m.unit_of):
                expected[u] += float(w.select(m.dim, i).abs().sum())
        np.testing.assert_allclose(scores[gi], expected, rtol=1e-6, err_msg=g.name)


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
