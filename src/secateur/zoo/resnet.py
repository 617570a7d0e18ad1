"""CIFAR-style residual networks (He et al., "Deep Residual Learning for Image Recognition",
CVPR 2016, section 4.2), for 28x28 inputs.

6n+2 weighted layers: a 3x3 stem conv, three stages of n basic blocks (two 3x3 convs each) with
16/32/64 channels (times ``width``) at strides 1/2/2, global average pooling and a linear ``fc``.
Where a block changes shape, the shortcut is a 1x1 conv + BN projection (the paper's option B).
``stem_stride=2`` makes the stem downsample 28 -> 14, quartering compute for fast CPU runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from secateur.errors import ConfigError
from secateur.zoo.registry import register_model

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet20_w8",
    "resnet32",
    "resnet56",
    "resnet_cifar",
]

#: Channels of the three stages at width 1.0.
STAGE_WIDTHS: tuple[int, int, int] = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    Input (N, in_planes, H, W) -> (N, planes, H/stride, W/stride). ``downsample`` is None (identity
    shortcut) or ``Sequential(Conv2d 1x1 stride s, BatchNorm2d)`` when the shape changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2): ``conv1``/``bn1`` stem, ``layer1..layer3`` (n blocks each), ``pool``, ``fc``.

    Input (N, in_chans, 28, 28) -> logits (N, num_classes). With width 1.0 and n=3 (ResNet-20) it
    has about 0.27M parameters, as in the paper's Table 6.

    Raises:
        ConfigError: ``depth`` not of the form 6n+2 with n >= 1, ``width`` <= 0, ``stem_stride`` < 1.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 1,
        width: float = 1.0,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(
                f"CifarResNet: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth!r}"
            )
        if not width > 0:
            raise ConfigError(f"CifarResNet: width must be > 0, got {width!r}")
        if not isinstance(stem_stride, int) or stem_stride < 1:
            raise ConfigError(f"CifarResNet: stem_stride must be an int >= 1, got {stem_stride!r}")
        n = (depth - 2) // 6
        self.depth = depth
        self.blocks_per_stage = n
        widths = [max(1, int(round(c * width))) for c in STAGE_WIDTHS]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages = []
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def _make(depth: int, default_width: float = 1.0) -> Callable[..., CifarResNet]:
    def factory(
        num_classes: int = 10, in_chans: int = 1, width: float = default_width, stem_stride: int = 1
    ) -> CifarResNet:
        return CifarResNet(
            depth, num_classes=num_classes, in_chans=in_chans, width=width, stem_stride=stem_stride
        )

    factory.__doc__ = (
        f"CIFAR ResNet-{depth} (He et al. 2016, sec. 4.2): {(depth - 2) // 6} blocks per stage, "
        f"stage widths 16/32/64 x width (default {default_width}), option-B projection shortcuts."
    )
    return factory


resnet8 = register_model("resnet8")(_make(8))
resnet14 = register_model("resnet14")(_make(14))
resnet20 = register_model("resnet20")(_make(20))
resnet32 = register_model("resnet32")(_make(32))
resnet56 = register_model("resnet56")(_make(56))
resnet20_w8 = register_model("resnet20_w8")(_make(20, default_width=0.5))


@register_model("resnet_cifar")
def resnet_cifar(
    num_classes: int = 10, in_chans: int = 1, depth: int = 20, width: float = 1.0, stem_stride: int = 1
) -> CifarResNet:
    """CIFAR ResNet of any depth 6n+2 (He et al. 2016, sec. 4.2); see :class:`CifarResNet`."""
    return CifarResNet(
        depth, num_classes=num_classes, in_chans=in_chans, width=width, stem_stride=stem_stride
    )
