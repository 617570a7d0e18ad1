"""Feature boosting and suppression (Gao et al. 2019): k-WTA count, saliency formula, skip == masked."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateur.errors import ConfigError
from secateur.methods.fbs import FBS, FBSConv
from secateur.zoo import create_model


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 10, 3, padding=1),
        nn.BatchNorm2d(10),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(10, 3),
    )


@pytest.mark.parametrize("density", [0.25, 0.5, 0.7, 1.0])
def test_exactly_ceil_dC_channels_per_sample(density):
    torch.manual_seed(0)
    model = _net()
    fbs = FBS(model, density=density)
    with torch.no_grad():
        for l in fbs.layers.values():
            l.predictor.weight.normal_()
    x = torch.randn(7, 1, 8, 8)
    out = {}
    for name, l in fbs.layers.items():
        l.register_forward_hook(lambda m, a, o, name=name: out.__setitem__(name, o))
    model(x)
    for name, l in fbs.layers.items():
        c = l.conv.out_channels
        k = math.ceil(density * c)
        assert torch.all(l.gate.sum(1) == k), name
        active = (out[name].abs().flatten(2).sum(2) != 0).sum(1)
        assert torch.all(active <= k)


def test_saliency_formula():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)
    layer = FBSConv(conv, bn, 0.4)
    with torch.no_grad():
        layer.predictor.weight.normal_()
        layer.predictor.bias.normal_()
    x = torch.randn(4, 3, 6, 6)
    layer(x)
    w, b = layer.predictor.weight, layer.predictor.bias
    expect = torch.relu(x.mean((2, 3)) @ w.T + b)
    torch.testing.assert_close(layer.saliency, expect)
    assert torch.all(layer.gate.sum(1) == 2)


def test_skip_path_equals_masked_path_and_saves_macs():
    torch.manual_seed(0)
    model = _net()
    fbs = FBS(model, density=0.5)
    with torch.no_grad():
        for l in fbs.layers.values():
            l.predictor.weight.normal_()
            l.bn.running_mean.normal_()
            l.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(5, 1, 8, 8)
    masked = model(x)
    fbs.set_mode("skip")
    skipped = model(x)
    fbs.set_mode("masked")
    torch.testing.assert_close(skipped, masked, atol=1e-5, rtol=1e-5)
    macs = fbs.macs_per_sample(x)
    assert macs["gated"].shape == (5,)
    assert macs["ratio"] < 0.5  # second conv sees half its inputs, keeps half its outputs
    lat = fbs.latency(x[:1], repeats=2)
    assert set(lat) == {"masked", "skip"}


def test_training_with_saliency_loss_and_hook_agree():
    torch.manual_seed(0)
    m1, m2 = _net(), _net()
    m2.load_state_dict(m1.state_dict())
    f1, f2 = FBS(m1, 0.5, lam=0.1), FBS(m2, 0.5, lam=0.1)
    f2.layers["3"].predictor.load_state_dict(f1.layers["3"].predictor.state_dict())
    f2.layers["0"].predictor.load_state_dict(f1.layers["0"].predictor.state_dict())
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    (F.cross_entropy(m1(x), y) + f1.saliency_loss()).backward()
    f2.on_train_begin(None)
    F.cross_entropy(m2(x), y).backward()
    torch.testing.assert_close(f1.layers["3"].predictor.weight.grad, f2.layers["3"].predictor.weight.grad)


def test_vgg_small_and_errors():
    model = create_model("vgg_small", width=0.125)
    fbs = FBS(model, density=0.5, exclude=["features.0"])
    assert "features.0" not in fbs.layers and len(fbs.layers) == 7
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError):
        FBS(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ConfigError):
        FBS(_net(), density=0.0)
    with pytest.raises(ConfigError, match="nope"):
        FBS(_net(), exclude=["nope"])
