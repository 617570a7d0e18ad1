"""Each criterion against an independent computation of its defining formula on a tiny model."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.criteria import get_criterion
from secateur.criteria.element.at_init import SNIP, GraSP, SynFlow
from secateur.criteria.element.lamp import LAMP, lamp_scores
from secateur.criteria.element.saliency import TaylorFO
from secateur.criteria.group.functional import (
    TaylorAccumulator,
    bn_scale_scores,
    fisher_channel_scores,
    fpgm_scores,
    norm_scores,
    redundant_features,
    taylor_group_scores,
)
from secateur.errors import ConfigError
from secateur.masks import masked_parameters
from secateur.pruners.element import Pruner
from secateur.scope import Scope


def mlp(bn: bool = False) -> nn.Module:
    layers = [nn.Linear(5, 6)]
    if bn:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers)


def batch(n: int = 8, d: int = 5, c: int = 3):
    return torch.randn(n, d), torch.randint(0, c, (n,))


def reference_grads(model, batches):
    """Gradients of the mean loss by plain .backward() on an independent copy."""
    m = copy.deepcopy(model)
    m.train()
    loss = sum(F.cross_entropy(m(x), y) for x, y in batches) / len(batches)
    loss.backward()
    return {
        f"{name}.weight": mod.weight.grad.clone()
        for name, mod in m.named_modules()
        if isinstance(mod, nn.Linear)
    }


def test_snip_equals_abs_w_times_g_on_one_batch():
    model = mlp()
    b = batch()
    targets = Scope().resolve(model)
    with torch.no_grad():  # Pruner.prune_to scores under no_grad; the criterion must still work
        scores = SNIP(model, b).scores(targets)
        assert not torch.is_grad_enabled()  # and the caller's grad mode is restored
    ref = reference_grads(model, [b])
    for t in targets:
        expected = (t.module.weight.detach() * ref[t.name]).abs()
        torch.testing.assert_close(scores[t.name], expected)


def test_snip_averages_batches_and_sees_masks():
    model = mlp()
    batches = [batch(), batch()]
    pruner = Pruner(model, 0.5)
    pruner.step(0)
    targets = pruner.targets
    scores = SNIP(model, batches, num_batches=None).scores(targets)
    ref_model = mlp()  # an independent copy holding the effective (masked) weights
    with torch.no_grad():
        for i in (0, 2):
            ref_model[i].weight.copy_(model[i].weight)
            ref_model[i].bias.copy_(model[i].bias)
    ref = reference_grads(ref_model, batches)
    for t in targets:
        w = t.module.weight.detach()
        torch.testing.assert_close(scores[t.name], (w * ref[t.name]).abs())
        assert torch.all(scores[t.name][~pruner.masks()[t.name]] == 0)


def test_data_criteria_restore_mode_requires_grad_buffers_and_grads():
    model = mlp(bn=True)
    model.eval()
    model[0].bias.requires_grad_(False)
    model[0].weight.requires_grad_(False)
    model[3].weight.grad = torch.full_like(model[3].weight, 7.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = Scope().resolve(model)
    for crit in (SNIP(model, batch()), GraSP(model, batch()), TaylorFO(model, batch())):
        crit.scores(targets)
        assert not model.training and not model[1].training
        assert model[0].weight.requires_grad is False and model[0].bias.requires_grad is False
        assert model[3].weight.requires_grad is True
        assert model[0].weight.grad is None and model[0].bias.grad is None
        assert torch.equal(model[3].weight.grad, torch.full_like(model[3].weight, 7.0))
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched


def test_data_criteria_without_data_say_so():
    model = mlp()
    for cls in (SNIP, GraSP, TaylorFO):
        with pytest.raises(ConfigError, match="needs data"):
            cls()
        with pytest.raises(ConfigError, match="needs data"):
            cls(model)
    with pytest.raises(ConfigError, match="needs data"):
        get_criterion("snip")
    with pytest.raises(ConfigError, match="needs data"):
        Pruner(model, 0.5, criterion="snip")
    assert not list(masked_parameters(model))
    with pytest.raises(ConfigError, match="input shape"):
        SynFlow(model)
    # Registered names build with data.
    assert isinstance(get_criterion("grasp", model=model, data=batch()), GraSP)
    with pytest.raises(ConfigError, match=r"\(x, y\)"):
        SNIP(model, torch.randn(4, 5)).scores(Scope().resolve(model))


def test_grasp_equals_w_times_explicit_hessian_times_gradient():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    targets = Scope().resolve(model)
    scores = GraSP(model, (x, y)).scores(targets)

    # Independent: flatten both weight matrices into one vector and build the full Hessian.
    w1, b1, w2, b2 = (
        p.detach().clone() for p in (model[0].weight, model[0].bias, model[2].weight, model[2].bias)
    )
    n1 = w1.numel()

    def loss_of(theta):
        a = theta[:n1].view_as(w1)
        c = theta[n1:].view_as(w2)
        return F.cross_entropy(torch.tanh(x @ a.T + b1) @ c.T + b2, y)

    theta = torch.cat([w1.flatten(), w2.flatten()])
    g = torch.autograd.functional.jacobian(loss_of, theta)
    h = torch.autograd.functional.hessian(loss_of, theta)
    paper_s = -theta * (h @ g)  # GraSP's S(-θ) = -θ ⊙ Hg, of which the paper prunes the highest
    ours = torch.cat([scores["0.weight"].flatten(), scores["2.weight"].flatten()])
    torch.testing.assert_close(ours, -paper_s)
    # Ranking: the entry we would prune first is the one the paper prunes first.
    assert int(torch.argmin(ours)) == int(torch.argmax(paper_s))


def test_synflow_equals_sum_over_paths_of_products_on_a_linear_chain():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False), nn.Linear(2, 2, bias=False)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = Scope().resolve(model)
    scores = SynFlow(model, example_inputs=(3,)).scores(targets)
    ws = [m.weight.detach().double().abs() for m in model]
    # Enumerate every input-to-output path i0 -> i1 -> i2 -> i3; a weight's score is the sum of
    # the path products over the paths through it.
    expected = [torch.zeros_like(w) for w in ws]
    for i0, i1, i2, i3 in itertools.product(range(3), range(4), range(2), range(2)):
        prod = ws[0][i1, i0] * ws[1][i2, i1] * ws[2][i3, i2]
        expected[0][i1, i0] += prod
        expected[1][i2, i1] += prod
        expected[2][i3, i2] += prod
    for t, e in zip(targets, expected):
        torch.testing.assert_close(scores[t.name], e)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_synflow_with_batchnorm_and_masks_restores_everything():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )
    model.train()
    pruner = Pruner(model, 0.5)
    pruner.step(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = SynFlow(model, torch.randn(2, 2, 6, 6)).scores(pruner.targets)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for t in pruner.targets:
        assert torch.all(scores[t.name][~pruner.masks()[t.name]] == 0)
        assert torch.all(scores[t.name][pruner.masks()[t.name]] > 0)


def test_lamp_scores_follow_the_normalised_squared_magnitude_formula():
    w = torch.randn(4, 5)
    got = lamp_scores(w)
    flat = w.flatten()
    for u in range(flat.numel()):
        denom = sum(float(v) ** 2 for v in flat if abs(float(v)) >= abs(float(flat[u])))
        assert float(got.flatten()[u]) == pytest.approx(float(flat[u]) ** 2 / denom, rel=1e-5)
    assert float(got.max()) == pytest.approx(1.0)
    model = mlp()
    targets = Scope().resolve(model)
    scores = LAMP().scores(targets)
    for t in targets:
        torch.testing.assert_close(scores[t.name], lamp_scores(t.module.weight))


def test_taylor_is_squared_w_times_g_averaged_over_batches():
    model = mlp()
    batches = [batch(), batch()]
    targets = Scope().resolve(model)
    scores = TaylorFO(model, batches, num_batches=2).scores(targets)
    refs = [reference_grads(model, [b]) for b in batches]
    for t in targets:
        w = t.module.weight.detach()
        expected = sum((w * r[t.name]) ** 2 for r in refs) / 2
        torch.testing.assert_close(scores[t.name], expected)


# -- structured criteria ---------------------------------------------------------------------------


def test_norm_scores_are_per_filter_lp_norms():
    filters = torch.randn(5, 3, 3, 3)
    l1 = norm_scores(filters, p=1)
    l2 = norm_scores(filters, p=2)
    # a float32 sum of 27 terms, in any order, is within 26 * 2**-24 ~ 1.6e-6 relative: rel=1e-5 bounds it
    for i in range(5):
        assert float(l1[i]) == pytest.approx(sum(abs(float(v)) for v in filters[i].flatten()), rel=1e-5)
        assert float(l2[i]) == pytest.approx(
            sum(float(v) ** 2 for v in filters[i].flatten()) ** 0.5, rel=1e-5
        )


def test_fpgm_prunes_the_filter_at_the_geometric_median():
    c, v1, v2 = torch.randn(3, 4, 3, 3).unbind(0)
    # A point set symmetric about c: its geometric median is c (the unit vectors cancel there).
    filters = torch.stack([c + v1, c - v2, c, c - v1, c + v2])
    scores = fpgm_scores(filters)
    for i in range(5):
        expected = sum(float((filters[i] - filters[j]).double().norm()) for j in range(5))
        assert float(scores[i]) == pytest.approx(expected, rel=1e-5)  # float32 cdist, any summation order
    assert int(torch.argmin(scores)) == 2  # the lowest score is the filter closest to the median
    median = fpgm_scores(filters, method="median")
    assert int(torch.argmin(median)) == 2 and float(median[2]) < 1e-6


def test_bn_scale_is_abs_gamma():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 0.0, 1.0]))
    assert bn_scale_scores(bn).tolist() == [0.5, 2.0, 0.0, 1.0]
    with pytest.raises(ConfigError, match="affine"):
        bn_scale_scores(nn.BatchNorm2d(4, affine=False))


def _components(sim: torch.Tensor, tau: float) -> list[set[int]]:
    n = sim.shape[0]
    seen, comps = set(), []
    for s in range(n):
        if s in seen:
            continue
        stack, comp = [s], set()
        while stack:
            u = stack.pop()
            if u in comp:
                continue
            comp.add(u)
            stack += [v for v in range(n) if v != u and float(sim[u, v]) >= tau]
        seen |= comp
        comps.append(comp)
    return comps


def test_redundant_features_single_linkage_is_threshold_graph_components():
    filters = torch.randn(12, 2, 2)
    flat = filters.flatten(1)
    sim = F.cosine_similarity(flat[:, None], flat[None, :], dim=2)
    tau = 0.3
    labels, keep = redundant_features(filters, tau, linkage="single")
    got = [set(torch.nonzero(labels == k).flatten().tolist()) for k in range(int(labels.max()) + 1)]
    assert sorted(map(sorted, got)) == sorted(map(sorted, _components(sim, tau)))
    for comp in got:
        kept = [i for i in comp if keep[i]]
        assert len(kept) == 1 and kept[0] == max(comp, key=lambda i: float(flat[i].norm()))


@pytest.mark.parametrize("linkage", ["average", "complete"])
def test_redundant_features_recovers_planted_clusters(linkage):
    directions = torch.eye(3)
    filters, planted = [], []
    for k, size in enumerate((3, 2, 4)):
        for _ in range(size):
            filters.append((directions[k] + 0.05 * torch.randn(3)) * (0.5 + torch.rand(1)))
            planted.append(k)
    perm = torch.randperm(len(filters))
    filters = torch.stack(filters)[perm]
    planted = torch.tensor(planted)[perm]
    labels, keep = redundant_features(filters, 0.9, linkage=linkage)
    for a in range(len(planted)):
        for b in range(len(planted)):
            assert (labels[a] == labels[b]) == (planted[a] == planted[b])
    assert int(keep.sum()) == 3


def test_taylor_group_score_equals_gate_formulation_after_batchnorm():
    conv, bn, fc = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(3, 2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(4, 2, 5, 5), torch.randint(0, 2, (4,))
    gate = torch.ones(3, requires_grad=True)
    h = bn(conv(x)) * gate[None, :, None, None]
    loss = F.cross_entropy(fc(torch.relu(h).mean((2, 3))), y)
    g_gamma, g_beta, g_gate = torch.autograd.grad(loss, [bn.weight, bn.bias, gate])
    scores = taylor_group_scores([(bn.weight, g_gamma), (bn.bias, g_beta)])
    torch.testing.assert_close(scores, (gate.detach().double() * g_gate.double()) ** 2)
    # Members with another unit dimension (the next layer's input channels, dim 1).
    w, g = torch.randn(3, 4), torch.randn(3, 4)
    expected = ((w * g).sum(0)) ** 2
    torch.testing.assert_close(taylor_group_scores([(w, g, 1)]), expected.double())


def test_taylor_accumulator_averages_batches_and_smooths_steps():
    acc = TaylorAccumulator(momentum=0.9)
    acc.add("g", torch.tensor([1.0, 2.0]))
    acc.add("g", torch.tensor([3.0, 4.0]))
    assert acc.step()["g"].tolist() == [2.0, 3.0]
    acc.add("g", torch.tensor([12.0, 3.0]))
    torch.testing.assert_close(
        acc.step()["g"], torch.tensor([0.9 * 2 + 0.1 * 12, 0.9 * 3 + 0.1 * 3]).double()
    )
    with pytest.raises(ConfigError, match="no mini-batch"):
        acc.step()


def test_fisher_channel_score_formula():
    a, g = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    got = fisher_channel_scores(a, g)
    for c in range(4):
        total = 0.0
        for n in range(3):
            inner = sum(float(a[n, c, i, j] * g[n, c, i, j]) for i in range(2) for j in range(2))
            total += inner**2
        assert float(got[c]) == pytest.approx(total / (2 * 3), rel=1e-6)
