"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018),
scaled down for 28x28 inputs.

Each inverted residual expands channels by t with a 1x1 conv, filters with a depthwise 3x3 conv
(``groups`` = channels), and projects back with a linear 1x1 conv (no activation: the linear
bottleneck); the input is added when stride is 1 and channels match. The stem keeps stride 1 and
only three stages downsample (28 -> 14 -> 7 -> 4), with seven blocks instead of seventeen.
"""

from __future__ import annotations

import torch
from torch import nn

from secateur.errors import ConfigError
from secateur.zoo.registry import register_model

__all__ = ["BLOCK_SETTINGS", "InvertedResidual", "MobileNetV2", "mobilenetv2"]

#: (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
BLOCK_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled channel count to a multiple of ``divisor``, never dropping below 90% of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] - depthwise 3x3-BN-ReLU6 - 1x1 project-BN, plus input if ``use_residual``.

    Input (N, in_planes, H, W) -> (N, out_planes, ceil(H/stride), ceil(W/stride)). ``expand`` is
    None when t == 1 (no expansion conv, as in the paper's first block).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_planes * expand_ratio
        self.use_residual = stride == 1 and in_planes == out_planes
        self.expand: nn.Sequential | None = None
        if expand_ratio != 1:
            self.expand = nn.Sequential(
                nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()
            )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """``stem`` (3x3 conv-BN-ReLU6), ``blocks`` (inverted residuals), ``head_conv`` (1x1 to
    ``last_channels``), global average pool, ``classifier``.

    Input (N, in_chans, 28, 28) -> logits (N, num_classes). ``width`` scales every channel count
    (rounded to multiples of 8); as in the paper, the last conv is not narrowed below its default.

    Raises:
        ConfigError: ``width`` <= 0.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        width: float = 1.0,
        stem_channels: int = 32,
        last_channels: int = 256,
    ) -> None:
        super().__init__()
        if not width > 0:
            raise ConfigError(f"MobileNetV2: width must be > 0, got {width!r}")
        channels = make_divisible(stem_channels * width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU6(),
        )
        blocks: list[nn.Module] = []
        for t, c, n, s in BLOCK_SETTINGS:
            out = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        last = make_divisible(last_channels * max(1.0, width))
        self.head_conv = nn.Sequential(
            nn.Conv2d(channels, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head_conv(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10, in_chans: int = 1, width: float = 1.0) -> MobileNetV2:
    """Small MobileNetV2 for 28x28 (seven inverted residuals, about 0.13M parameters at width 1.0)."""
    return MobileNetV2(num_classes=num_classes, in_chans=in_chans, width=width)
