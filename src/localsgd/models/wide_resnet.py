"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis, 2016) for CIFAR.

Pre-activation blocks (BN-ReLU-conv, He et al. 2016b) in three stages of widths 16k, 32k and
64k, each with (d - 4) / 6 blocks. WRN-28-10 has ~36.5M parameters. Dropout between the two
convs of a block is supported but off by default: the paper's best CIFAR numbers use 0.3, but
local SGD comparisons usually train without it, and dropout would also make a worker's
forward pass depend on its RNG stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localsgd.models._init import init_weights


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 (-dropout) -BN-ReLU-conv3x3 with identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        # Width changes at every stage entry (16 -> 160 in the first stage too), so unlike the
        # thin CIFAR ResNets a projection is needed; zero-padding would waste most channels.
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        # The projection takes the pre-activated input so that both paths see normalised data,
        # as in the authors' code; the identity path keeps the raw input (true pre-activation).
        residual = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-widen_factor; final BN-ReLU before pooling, as pre-activation nets require."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be positive, got {widen_factor}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)

        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        in_planes = 16
        stages: list[nn.Module] = []
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks: list[nn.Module] = []
            for j in range(n):
                blocks.append(WideBasicBlock(in_planes, width, stride if j == 0 else 1, dropout))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def wrn28_10(num_classes: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10: 4 blocks per stage, widths 160/320/640, ~36.5M parameters."""
    return WideResNet(28, 10, num_classes, dropout)
