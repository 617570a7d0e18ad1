"""Tests of the model zoo: every model builds, runs and trains on 28x28; architecture facts hold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateur.errors import ConfigError
from secateur.zoo import (
    Attention,
    BasicBlock,
    CifarResNet,
    InvertedResidual,
    create_model,
    list_models,
    rebuild_model,
    register_model,
)

ALL_MODELS = list_models()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_lists_the_families() -> None:
    for name in (
        "lenet5",
        "vgg_small",
        "vgg11_bn",
        "resnet8",
        "resnet14",
        "resnet20",
        "resnet32",
        "resnet56",
        "resnet20_w8",
        "mobilenetv2",
        "vit_tiny",
    ):
        assert name in ALL_MODELS
    assert ALL_MODELS == sorted(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize(("num_classes", "in_chans"), [(10, 1), (3, 3), (10, 3), (3, 1)])
def test_forward_backward(name: str, num_classes: int, in_chans: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_chans=in_chans)
    x = torch.randn(2, in_chans, 28, 28)
    out = model(x)
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, num_classes - 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reached {pname}"
    assert model.secateur_zoo == {"name": name, "num_classes": num_classes, "in_chans": in_chans}


def test_standard_modules_only() -> None:
    for name in ALL_MODELS:
        model = create_model(name)
        assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()), name


def test_rebuild_from_record() -> None:
    model = create_model("resnet20", num_classes=3, in_chans=3, width=0.5, stem_stride=2)
    again = rebuild_model(dict(model.secateur_zoo))
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in again.state_dict().items()
    }
    assert again.conv1.stride == (2, 2)


def test_unknown_name_raises_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("resnet9000")
    assert "resnet9000" in str(info.value)
    assert "resnet20" in str(info.value) and "vit_tiny" in str(info.value)


def test_bad_arguments_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("lenet5", num_classes=0)
    with pytest.raises(ConfigError, match="in_chans"):
        create_model("lenet5", in_chans=0)
    with pytest.raises(ConfigError, match="bogus"):
        create_model("resnet20", bogus=1)
    with pytest.raises(ConfigError, match="depth"):
        create_model("resnet_cifar", depth=21)
    with pytest.raises(ConfigError, match="patch_size"):
        create_model("vit_tiny", patch_size=5)
    with pytest.raises(ConfigError, match="already registered"):
        register_model("lenet5")(lambda **kw: nn.Linear(1, 1))


def _resnet_param_count(n: int, in_chans: int, num_classes: int, widths: tuple[int, int, int]) -> int:
    """ResNet-(6n+2) parameters from layer shapes: 3x3 convs without bias, BN (gamma, beta), option-B
    projections (1x1 conv + BN) where the channel count changes, and the final linear layer."""
    bn = 2
    total = 9 * in_chans * widths[0] + bn * widths[0]  # stem
    c_in = widths[0]
    for c in widths:
        for j in range(n):
            total += 9 * c_in * c + bn * c + 9 * c * c + bn * c
            if j == 0 and c_in != c:
                total += c_in * c + bn * c
            c_in = c
    return total + c_in * num_classes + num_classes


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "n"), [("resnet8", 1), ("resnet14", 2), ("resnet20", 3), ("resnet32", 5), ("resnet56", 9)]
)
def test_resnet_depth_and_param_count(name: str, n: int) -> None:
    model = create_model(name, num_classes=10, in_chans=3)
    assert isinstance(model, CifarResNet)
    stages = [model.layer1, model.layer2, model.layer3]
    assert [len(s) for s in stages] == [n, n, n]
    assert all(isinstance(b, BasicBlock) for s in stages for b in s)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) + 1 == 6 * n + 2  # 3x3 convs plus the fc layer: the paper's layer count
    assert _count(model) == _resnet_param_count(n, 3, 10, (16, 32, 64))


def test_resnet20_matches_paper_size_and_layout() -> None:
    model = create_model("resnet20", num_classes=10, in_chans=3)
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters (projections add about 3k here)
    assert 0.26e6 < _count(model) < 0.28e6
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.fc, nn.Linear)
    assert [
        model.layer1[0].conv1.out_channels,
        model.layer2[0].conv1.out_channels,
        model.layer3[0].conv1.out_channels,
    ] == [16, 32, 64]
    assert model.layer1[0].downsample is None
    for stage in (model.layer2, model.layer3):
        proj = stage[0].downsample
        assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1) and proj[0].stride == (2, 2)
        assert isinstance(proj[1], nn.BatchNorm2d)
        assert all(b.downsample is None for b in stage[1:])


def test_resnet_width_and_stem_stride() -> None:
    narrow = create_model("resnet20", width=0.5)
    named = create_model("resnet20_w8")
    assert narrow.conv1.out_channels == named.conv1.out_channels == 8
    assert _count(narrow) == _count(named) == _resnet_param_count(3, 1, 10, (8, 16, 32))
    fast = create_model("resnet20", stem_stride=2)
    seen: dict[str, torch.Size] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen[name] = output.shape

        return hook

    fast.layer1.register_forward_hook(record("layer1"))
    fast.layer3.register_forward_hook(record("layer3"))
    assert fast(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert seen["layer1"][-2:] == (14, 14) and seen["layer3"][-2:] == (4, 4)


def test_mobilenetv2_has_depthwise_convs_and_residuals() -> None:
    model = create_model("mobilenetv2")
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) >= 5
    for block in blocks:
        dw = block.depthwise[0]
        assert dw.kernel_size == (3, 3)
        assert dw.groups == dw.in_channels == dw.out_channels > 1
        pw = block.project[0]
        assert pw.kernel_size == (1, 1) and pw.groups == 1
        # linear bottleneck: the projection ends in BN, no activation
        assert isinstance(block.project[-1], nn.BatchNorm2d)
    residual = [b for b in blocks if b.use_residual]
    assert residual, "some blocks must keep stride 1 and width, hence use the residual"
    for b in blocks:
        block_in = (b.depthwise[0] if b.expand is None else b.expand[0]).in_channels
        stride_one = b.depthwise[0].stride == (1, 1)
        assert b.use_residual == (stride_one and block_in == b.project[0].out_channels)
    # the residual is really added: zeroing the last BN makes the block the identity
    b = residual[0].eval()
    nn.init.zeros_(b.project[1].weight)
    nn.init.zeros_(b.project[1].bias)
    x = torch.randn(2, b.project[0].out_channels, 7, 7)
    assert torch.equal(b(x), x)
    assert any(b.expand is not None for b in blocks)  # expansion t > 1 present


def test_vit_tiny_structure() -> None:
    model = create_model("vit_tiny")
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attns) == 4
    for a in attns:
        assert (a.num_heads, a.head_dim) == (4, 16)
        assert a.qkv.in_features == 64 and a.qkv.out_features == 3 * 64 and a.proj.in_features == 64
    assert model.pos_embed.shape == (1, (28 // 7) ** 2 + 1, 64)
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 64
    fine = create_model("vit_tiny", patch_size=4)
    assert fine.pos_embed.shape[1] == 50
    assert fine(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_vit_attention_matches_reference_formula() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2)
    x = torch.randn(3, 5, 8)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
        heads.append(w @ v[..., sl])
    expected = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)
