"""Each criterion against an independent computation of its defining formula on a tiny model."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.criteria import get_criterion
from secateur.criteria.at_init import SNIP, GraSP, SynFlow
from secateur.criteria.lamp import LAMP, lamp_scores
from secateur.criteria.saliency import TaylorFO
from secateur.errors import ConfigError
from secateur.masks import masked_parameters
from secateur.pruner import Pruner
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
