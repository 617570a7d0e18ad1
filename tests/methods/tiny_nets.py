"""The tiny Conv-BatchNorm network the method tests (and tests/test_train_rebind.py) prune.

Import it as ``from tiny_nets import conv_bn_net`` (pytest puts tests/methods on the path for the tests
here; a test elsewhere inserts it first).
"""

from __future__ import annotations

from torch import nn


def conv_bn_net(width: int = 8, conv2_bias: bool = False) -> nn.Sequential:
    """Conv(1 -> 6, no bias)-BN-ReLU, Conv(6 -> ``width``)-BN-ReLU, global average pool,
    Linear(``width`` -> 3).

    Input ``(N, 1, H, W)``, 3 classes; parameters drawn from the global torch RNG (seed before calling).
    """
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, width, 3, padding=1, bias=conv2_bias),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 3),
    )
