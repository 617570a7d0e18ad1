"""Network slimming (Liu et al. 2017): the L1 penalty's gradient and global removal by |γ|."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trainer_grads import assert_no_hooks, own_loop_grads, trainer_grads

from secateur.errors import ConfigError
from secateur.methods.slimming import SlimmingPenalty, slim
from secateur.zoo import create_model


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _grads(model, x, y, extra=None):
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    if extra is not None:
        loss = loss + extra()
    loss.backward()
    return [model[1].weight.grad.clone(), model[4].weight.grad.clone()]


@pytest.mark.parametrize("form", ["penalty", "subgradient"])
def test_penalty_adds_lambda_sign_gamma(form):
    torch.manual_seed(0)
    model = _net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -0.3, 1.0, -2.0, 0.1, 0.7]))
    x, y = torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 2, 0])
    model.eval()  # same BN statistics in both passes
    plain = _grads(model, x, y)
    sp = SlimmingPenalty(model, lam=0.01)
    if form == "subgradient":
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sp.add_subgradient()
        pen = [model[1].weight.grad.clone(), model[4].weight.grad.clone()]
    else:
        pen = _grads(model, x, y, sp.penalty)
    for g0, g1, bn in zip(plain, pen, (model[1], model[4])):
        torch.testing.assert_close(g1 - g0, 0.01 * torch.sign(bn.weight.detach()))


def test_trainer_path_equals_own_loop_subgradient():
    torch.manual_seed(0)
    m1 = _net()
    with torch.no_grad():
        m1[1].weight.copy_(torch.tensor([0.5, -0.3, 1.0, -2.0, 0.1, 0.7]))
        m1[4].weight.uniform_(-1.0, 1.0)
    m0, m2 = copy.deepcopy(m1), copy.deepcopy(m1)
    x, y = torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 2, 0])
    sp1, sp2 = SlimmingPenalty(m1, lam=0.01), SlimmingPenalty(m2, lam=0.01)
    params = [m0[1].weight, m0[4].weight]
    plain = own_loop_grads(m0, x, y, params)
    own = own_loop_grads(m1, x, y, [m1[1].weight, m1[4].weight], after=sp1.add_subgradient)
    via = trainer_grads(m2, sp2, x, y, [m2[1].weight, m2[4].weight])
    for g0, g1, g2, p in zip(plain, own, via, params):
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)
        torch.testing.assert_close(g1 - g0, 0.01 * torch.sign(p.detach()))
    assert_no_hooks(m2)


def test_slim_removes_smallest_gammas_globally():
    torch.manual_seed(0)
    model = _net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.01, 1.0, 0.02, 1.0, 1.0]))
        model[4].weight.copy_(torch.tensor([1.0, 1.0, 0.03, 1.0, 1.0, 1.0, 1.0, 1.0]))
    model.eval()
    x = torch.randn(2, 1, 5, 5)
    slim(model, x, sparsity=3 / 14)
    assert model[0].out_channels == 4 and model[3].in_channels == 4 and model[3].out_channels == 7
    assert torch.all(model[1].weight.abs() == 1.0) and torch.all(model[4].weight.abs() == 1.0)


def test_slim_on_resnet_honours_residual_coupling():
    model = create_model("resnet8").eval()
    x = torch.randn(2, 1, 28, 28)
    n0 = sum(p.numel() for p in model.parameters())
    slim(model, x, sparsity=0.3)
    assert sum(p.numel() for p in model.parameters()) < n0
    assert model(x).shape == (2, 10)


def test_errors():
    with pytest.raises(ConfigError):
        SlimmingPenalty(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError):
        SlimmingPenalty(_net(), lam=-1.0)
    model = _net()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ConfigError):
        slim(model, torch.randn(1, 1, 5, 5), sparsity=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_slim_sparsity_is_a_fraction_of_the_batchnorm_channels_only():
    """The hidden Linear group has no γ: slim leaves it whole and removes half of the BN channels."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
        nn.ReLU(),
        nn.Linear(10, 3),
    ).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]))
    slim(model, torch.randn(2, 1, 5, 5), sparsity=0.5)
    assert model[0].out_channels == 4 and model[5].out_features == 10
    torch.testing.assert_close(model[1].weight.detach(), torch.tensor([0.9, 0.8, 0.7, 0.6]))
