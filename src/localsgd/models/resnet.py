"""CIFAR ResNets of depth 6n+2 (He et al., 2016, Section 4.2).

Three stages of ``n`` basic blocks with 16, 32 and 64 channels at 32x32, 16x16 and 8x8
resolution, global average pooling and one linear layer.

Shortcuts use **option A** of the paper: when a block halves the resolution and doubles the
width, the identity is subsampled with stride 2 and the new channels are zero-padded. This is
the variant the paper evaluates on CIFAR and the one behind the published parameter counts
(ResNet-20: 0.27M, ResNet-110: 1.7M). It also keeps the shortcut parameter-free, so every
parameter tensor is a conv, BatchNorm or the classifier, which keeps model averaging simple.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localsgd.models._init import init_weights

_STAGE_WIDTHS: tuple[int, int, int] = (16, 32, 64)


class _PadShortcut(nn.Module):
    """Option-A shortcut: strided subsampling plus zero channels, no parameters."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        # Split the zero channels evenly on both sides, as in the reference implementation; the
        # placement does not matter for accuracy but keeps results comparable with it.
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the trailing dims first: (W_l, W_r, H_t, H_b, C_front, C_back).
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (post-activation, as in v1)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        # Convs feed straight into BatchNorm, whose shift makes a conv bias redundant.
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; other sizes work thanks to global average pooling."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        n = (depth - 2) // 6
        self.depth = depth

        self.conv1 = nn.Conv2d(3, _STAGE_WIDTHS[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_WIDTHS[0])
        in_planes = _STAGE_WIDTHS[0]
        stages: list[nn.Module] = []
        for i, width in enumerate(_STAGE_WIDTHS):
            # The first stage keeps the stem's resolution; the next two halve it on entry.
            stride = 1 if i == 0 else 2
            blocks: list[nn.Module] = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, width, stride if j == 0 else 1))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet_cifar(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build ResNet-``depth`` for CIFAR; raises ValueError unless depth = 6n+2 (n >= 1)."""
    return CifarResNet(depth, num_classes)
