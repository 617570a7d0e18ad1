"""LeNet-5 (LeCun et al., "Gradient-based learning applied to document recognition", 1998).

Modernised the usual way: ReLU and max pooling instead of scaled tanh and trainable subsampling,
and the first convolution padded by 2 so a 28x28 input plays the role of the paper's 32x32.
"""

from __future__ import annotations

import torch
from torch import nn

from secateur.zoo.registry import register_model

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """Conv(6,5x5)-pool-Conv(16,5x5)-pool-FC(120)-FC(84)-FC(num_classes).

    Input (N, in_chans, 28, 28) -> logits (N, num_classes). Spatial sizes: 28 -> 14 -> 10 -> 5,
    so ``fc1`` sees 16*5*5 = 400 features.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_chans: int = 1) -> LeNet5:
    """LeNet-5 for 28x28 inputs (about 61.7k parameters for 1 input channel, 10 classes)."""
    return LeNet5(num_classes=num_classes, in_chans=in_chans)
