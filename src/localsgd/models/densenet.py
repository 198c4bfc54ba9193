"""DenseNet-40-12 for CIFAR (Huang et al., 2017), the basic (non-BC) variant.

Three dense blocks of (depth - 4) / 3 = 12 layers; each layer is BN-ReLU-conv3x3 producing
``growth_rate`` = 12 new channels that are concatenated onto its input. Transitions between
blocks are BN-ReLU-conv1x1 (no compression, since BC is off) followed by 2x2 average pooling.
The stem has 16 channels as in the paper's non-BC networks. About 1.0M parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localsgd.models._init import init_weights

# Two 2x2 average pools: a 4x4 input reaches the last block at 1x1.
MIN_IMAGE_SIZE = 4


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 whose output is concatenated onto its input along channels."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, growth_rate, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.dropout(self.conv(F.relu(self.bn(x))))
        return torch.cat([x, new], dim=1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-avgpool2 between dense blocks; halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv(F.relu(self.bn(x))))
        return F.avg_pool2d(out, 2)


class DenseNet(nn.Module):
    """Basic CIFAR DenseNet with three equal dense blocks."""

    def __init__(
        self,
        depth: int = 40,
        growth_rate: int = 12,
        num_classes: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # depth counts the stem conv, the two transition convs, the classifier and the
        # 3 * L layers of the dense blocks.
        if depth < 7 or (depth - 4) % 3 != 0:
            raise ValueError(f"DenseNet depth must be 3L+4 with L >= 1, got {depth}")
        if growth_rate < 1:
            raise ValueError(f"growth_rate must be positive, got {growth_rate}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers_per_block = (depth - 4) // 3

        channels = 16
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        modules: list[nn.Module] = []
        for block in range(3):
            for _ in range(layers_per_block):
                modules.append(DenseLayer(channels, growth_rate, dropout))
                channels += growth_rate
            if block < 2:
                # Without compression (non-BC) the transition keeps the channel count.
                modules.append(Transition(channels, channels, dropout))
        self.features = nn.Sequential(*modules)
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(self.conv1(x))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def densenet40_12(num_classes: int = 10, dropout: float = 0.0) -> DenseNet:
    """DenseNet-40 with growth rate 12 (non-BC), ~1.0M parameters."""
    return DenseNet(40, 12, num_classes, dropout)
