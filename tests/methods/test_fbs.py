"""Feature boosting and suppression (Gao et al. 2019): k-WTA count, saliency formula, skip == masked."""

import copy
import math

import pytest
import torch
from tiny_nets import conv_bn_net
from torch import nn
from trainer_grads import assert_no_hooks, own_loop_grads, trainer_grads

from secateur.errors import ConfigError
from secateur.methods.fbs import FBS, FBSConv, find_conv_bn_pairs
from secateur.zoo import create_model

X = torch.randn(2, 1, 8, 8)


def _net() -> nn.Module:
    return conv_bn_net(10, conv2_bias=True)


@pytest.mark.parametrize("density", [0.25, 0.5, 0.7, 1.0])
def test_exactly_ceil_dC_channels_per_sample(density):
    torch.manual_seed(0)
    model = _net()
    fbs = FBS(model, X, density=density)
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
    fbs = FBS(model, X, density=0.5)
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
    assert set(lat) == {"masked", "skip"} and all(lat[k]["median_ms"] > 0 for k in lat)
    assert all(l.mode == "masked" for l in fbs.layers.values())


def _fbs(model, **kw):
    torch.manual_seed(1)  # the predictors' initialisation
    return FBS(model, X, 0.5, lam=0.1, **kw)


def test_trainer_path_equals_own_loop_and_saliency_loss_formula():
    torch.manual_seed(0)
    m1 = _net()
    m2 = copy.deepcopy(m1)
    f1, f2 = _fbs(m1), _fbs(m2)
    inputs = {}
    for name, l in f1.layers.items():
        l.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0].detach()))
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    p1 = [l.predictor.weight for l in f1.layers.values()] + [m1[8].weight]
    p2 = [l.predictor.weight for l in f2.layers.values()] + [m2[8].weight]
    own = own_loop_grads(m1, x, y, p1, extra=f1.penalty)
    via = trainer_grads(m2, f2, x, y, p2)
    for g1, g2 in zip(own, via):
        torch.testing.assert_close(g2, g1, rtol=0, atol=0)
    # the loss term is λ Σ_layers mean_n ||ReLU(W_s pool(x) + b_s)||_1 (Gao et al. 2019, sec. 3.4)
    expect = sum(
        torch.relu(inputs[n].mean((2, 3)) @ l.predictor.weight.T + l.predictor.bias).sum(1).mean()
        for n, l in f1.layers.items()
    )
    torch.testing.assert_close(f1.penalty(), 0.1 * expect)
    for m in (m1, m2):
        for l in list(m.modules()):
            l._forward_pre_hooks.clear()
    assert_no_hooks(m2)


def _resnet8_fbs(density=0.5, **kw):
    torch.manual_seed(0)
    model = create_model("resnet8")
    x = torch.randn(6, 1, 12, 12)
    fbs = FBS(model, x[:2], density=density, **kw)
    with torch.no_grad():
        for l in fbs.layers.values():
            l.predictor.weight.normal_()
            l.predictor.bias.uniform_(-0.5, 0.5)
            l.bn.running_mean.normal_()
            l.bn.running_var.uniform_(0.5, 2.0)
    return model, fbs, x


@pytest.mark.parametrize("density", [0.3, 0.5])
def test_resnet8_gates_every_block_after_bn_before_the_residual_add(density):
    model, fbs, x = _resnet8_fbs(density)
    assert {"layer1.0.conv2", "layer2.0.conv2", "layer2.0.downsample.0", "conv1"} <= set(fbs.layers)
    assert fbs.bn_of["layer1.0.conv2"] == "layer1.0.bn2" and not fbs.refused
    block = model.layer2[0]
    seen = {}
    block.register_forward_hook(lambda m, a, o: seen.update(x=a[0], out=o))
    block.conv2.register_forward_pre_hook(lambda m, a: seen.update(h=a[0]))
    model.eval()
    model(x)
    for name, l in fbs.layers.items():
        k = math.ceil(density * l.conv.out_channels)
        assert torch.all(l.gate.sum(1) == k), name
    with torch.no_grad():
        gated = block.conv2(seen["h"])  # π ⊙ BN(conv(h)): the residual branch, gated
        shortcut = block.downsample(seen["x"])  # itself gated: Conv+BN in the Sequential
        off = ~block.conv2.gate
        assert torch.all(gated.flatten(2).abs().sum(2)[off] == 0)
        torch.testing.assert_close(seen["out"], torch.relu(gated + shortcut))


def test_resnet8_skip_path_equals_masked_path_and_per_sample_macs():
    model, fbs, x = _resnet8_fbs(0.5)
    model.eval()
    with torch.no_grad():
        masked = model(x)
    ins = {}
    name = "layer1.0.conv2"
    layer = fbs.layers[name]
    layer.register_forward_pre_hook(lambda m, a: ins.__setitem__("x", a[0]))
    fbs.set_mode("skip")
    with torch.no_grad():
        skipped = model(x)
    fbs.set_mode("masked")
    torch.testing.assert_close(skipped, masked, atol=1e-5, rtol=1e-5)
    macs = fbs.macs_per_sample(x)
    assert macs["gated"].shape == (6,)
    # one layer by hand: kept outputs × non-zero inputs × k_h k_w × H' W', plus the predictor
    alive = (ins["x"].flatten(2).abs().sum(2) != 0).sum(1)
    c = layer.conv
    expect = 8 * alive * 9 * 12 * 12 + c.in_channels * c.out_channels
    assert torch.equal(layer.macs, expect)
    assert torch.all(alive < c.in_channels)  # its input is the gated first conv of the block, after ReLU
    assert macs["ratio"] < 0.6


def test_refuses_a_conv_whose_output_is_also_read_elsewhere_and_remove_restores():
    class Shortcut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.conv(x)
            h = self.bn(h) + h  # the conv output is read outside its BatchNorm
            return self.bn2(self.conv2(h))

    model = Shortcut().eval()
    x = torch.randn(2, 2, 5, 5)
    ref = model(x)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="conv .*outside bn"):
        FBS(model, x, include=["conv"])
    assert isinstance(model.conv, nn.Conv2d) and isinstance(model.bn, nn.BatchNorm2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fbs = FBS(model, x)
    assert set(fbs.layers) == {"conv2"} and "conv" in fbs.refused
    assert isinstance(model.bn2, nn.Identity)
    fbs.remove()
    assert isinstance(model.conv2, nn.Conv2d) and isinstance(model.bn2, nn.BatchNorm2d)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert_no_hooks(model)


def test_vgg_small_and_errors():
    model = create_model("vgg_small", width=0.125)
    x = torch.randn(2, 1, 28, 28)
    fbs = FBS(model, x, density=0.5, exclude=["features.0"])
    assert "features.0" not in fbs.layers and len(fbs.layers) == 7
    assert model(x).shape == (2, 10)
    with pytest.raises(ConfigError):
        FBS(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2))
    with pytest.raises(ConfigError):
        FBS(_net(), X, density=0.0)
    with pytest.raises(ConfigError, match="nope"):
        FBS(_net(), X, exclude=["nope"])


def test_trainer_trains_fbs_on_resnet8_and_gates_stay_exact():
    from secateur.data import TensorLoader
    from secateur.train import Trainer

    model, fbs, x = _resnet8_fbs(0.5, exclude=["conv1"])
    assert "conv1" not in fbs.layers
    before = {n: l.predictor.weight.detach().clone() for n, l in fbs.layers.items()}
    y = torch.randint(0, 10, (6,))
    trainer = Trainer(model, TensorLoader(x, y, 3), epochs=1, lr=0.05, callbacks=[fbs], progress=False)
    trainer.fit()
    assert all(not torch.equal(before[n], l.predictor.weight) for n, l in fbs.layers.items())
    model.eval()
    with torch.no_grad():
        model(x)
    for name, l in fbs.layers.items():
        assert torch.all(l.gate.sum(1) == math.ceil(0.5 * l.conv.out_channels)), name
    assert_no_hooks(model)


def test_resnet20_every_block_conv_is_gated_and_skip_equals_masked():
    torch.manual_seed(0)
    fresh = create_model("resnet20", width=0.25, stem_stride=2)
    expect = {n for n, m in fresh.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("layer")}
    model = copy.deepcopy(fresh).eval()
    x = torch.randn(3, 1, 28, 28)
    fbs = FBS(model, x[:1], 0.4, include=["layer*"])
    assert set(fbs.layers) == expect and len(expect) == 20  # 9 blocks x 2 convs + 2 downsample convs
    with torch.no_grad():
        for l in fbs.layers.values():  # s = ReLU(Wx + b) ~ 1: the boost does not compound over 20 layers
            l.predictor.weight.normal_(std=0.05)
            l.predictor.bias.uniform_(0.5, 1.5)
            l.bn.running_var.uniform_(0.5, 2.0)
        masked = model(x)
        assert torch.isfinite(masked).all()
        fbs.set_mode("skip")
        skipped = model(x)
    torch.testing.assert_close(skipped, masked, atol=1e-5, rtol=1e-5)
    for name, l in fbs.layers.items():
        assert torch.all(l.gate.sum(1) == math.ceil(0.4 * l.conv.out_channels)), name


def test_a_batchnorm_after_a_relu_is_not_fused_with_the_conv():
    """conv -> ReLU -> BN: the BN carries the conv's channels but does not read its output directly;
    with fresh statistics (BN ≈ identity) the real model cannot tell, the randomised check does."""

    class ReluFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn2(self.conv2(self.bn(torch.relu(self.conv(x)))))

    model = ReluFirst().eval()
    pairs, refused = find_conv_bn_pairs(model, torch.randn(2, 1, 5, 5))
    assert pairs == {"conv2": "bn2"} and "op sits between" in refused["conv"]


def test_static_export_removes_the_least_used_channels_through_the_driver():
    torch.manual_seed(0)
    model = _net().eval()
    fbs = FBS(model, X, density=0.5, exclude=["0"])
    layer = fbs.layers["3"]
    with torch.no_grad():  # saliencies 1..10 for every input: the gate always keeps channels 5..9
        layer.predictor.weight.zero_()
        layer.predictor.bias.copy_(torch.arange(1.0, 11.0))
    data = [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    usage = fbs.gate_usage(data)
    torch.testing.assert_close(usage["3"], torch.tensor([0.0] * 5 + [6.0, 7, 8, 9, 10], dtype=torch.float64))
    _, plan = fbs.prune_static(X, data)  # sparsity 1 - density
    assert {g["group"]: g["removed"] for g in plan["groups"]} == {"3.weight:0": [0, 1, 2, 3, 4]}
    assert isinstance(model[3], nn.Conv2d) and isinstance(model[4], nn.BatchNorm2d)
    assert model[3].out_channels == 5 and model[8].in_features == 5
    assert not fbs.layers
    assert_no_hooks(model)
