"""Network slimming (Liu et al. 2017): the L1 penalty's gradient and global removal by |γ|."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

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


@pytest.mark.parametrize("use_hook", [False, True])
def test_penalty_adds_lambda_sign_gamma(use_hook):
    torch.manual_seed(0)
    model = _net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -0.3, 1.0, -2.0, 0.1, 0.7]))
    x, y = torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 2, 0])
    model.eval()  # same BN statistics in both passes
    plain = _grads(model, x, y)
    sp = SlimmingPenalty(model, lam=0.01)
    if use_hook:
        sp.attach_hooks()
        pen = _grads(model, x, y)
        sp.remove_hooks()
    else:
        pen = _grads(model, x, y, sp.penalty)
    for g0, g1, bn in zip(plain, pen, (model[1], model[4])):
        torch.testing.assert_close(g1 - g0, 0.01 * torch.sign(bn.weight.detach()))


def test_slim_removes_smallest_gammas_globally():
    torch.manual_seed(0)
    model = _net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.01, 1.0, 0.02, 1.0, 1.0]))
        model[4].weight.copy_(torch.tensor([1.0, 1.0, 0.03, 1.0, 1.0, 1.0, 1.0, 1.0]))
    model.eval()
    x = torch.randn(2, 1, 5, 5)
    slim(model, x, ratio=3 / 14, verify=True)
    assert model[0].out_channels == 4 and model[3].in_channels == 4 and model[3].out_channels == 7
    assert torch.all(model[1].weight.abs() == 1.0) and torch.all(model[4].weight.abs() == 1.0)


def test_slim_on_resnet_honours_residual_coupling():
    model = create_model("resnet8").eval()
    x = torch.randn(2, 1, 28, 28)
    n0 = sum(p.numel() for p in model.parameters())
    slim(model, x, ratio=0.3, verify=True)
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
        slim(model, torch.randn(1, 1, 5, 5), ratio=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
