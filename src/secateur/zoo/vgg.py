"""VGG with batch normalisation (Simonyan & Zisserman, "Very Deep Convolutional Networks", 2015;
BN as in Ioffe & Szegedy, 2015), adapted to 28x28 inputs.

A 28x28 image allows only three halvings before the map collapses (28 -> 14 -> 7 -> 3), so the
VGG-11 layout keeps its eight 3x3 convolutions but the last two stages both run at 3x3; global
average pooling replaces the flatten, and the classifier is FC-ReLU-FC.
"""

from __future__ import annotations

import torch
from torch import nn

from secateur.errors import ConfigError
from secateur.zoo.registry import register_model

__all__ = ["VGG", "VGG11_LAYOUT", "vgg11_bn", "vgg_small"]

#: Output channels of each 3x3 conv at width 1.0; "M" is a 2x2 max pool.
VGG11_LAYOUT: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, 512, 512)


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG(nn.Module):
    """Plain VGG: ``features`` (Conv-BN-ReLU blocks and max pools), global average pool, ``classifier``.

    Input (N, in_chans, 28, 28) -> logits (N, num_classes). ``width`` multiplies every channel count.

    Raises:
        ConfigError: ``width`` <= 0 or a layout with no convolution.
    """

    def __init__(
        self,
        layout: tuple[int | str, ...] = VGG11_LAYOUT,
        num_classes: int = 10,
        in_chans: int = 1,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if not width > 0:
            raise ConfigError(f"VGG: width must be > 0, got {width!r}")
        layers: list[nn.Module] = []
        channels = in_chans
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = _scaled(int(item), width)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        if not any(isinstance(m, nn.Conv2d) for m in layers):
            raise ConfigError(f"VGG: layout {layout!r} has no convolution")
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register_model("vgg11_bn")
def vgg11_bn(num_classes: int = 10, in_chans: int = 1, width: float = 1.0) -> VGG:
    """VGG-11 with BN, full width (about 9.5M parameters); see the module docstring for the 28x28 layout."""
    return VGG(VGG11_LAYOUT, num_classes=num_classes, in_chans=in_chans, width=width)


@register_model("vgg_small")
def vgg_small(num_classes: int = 10, in_chans: int = 1, width: float = 0.25) -> VGG:
    """VGG-11-BN layout at a quarter width (16..128 channels, about 0.6M parameters): trains on a CPU."""
    return VGG(VGG11_LAYOUT, num_classes=num_classes, in_chans=in_chans, width=width)
