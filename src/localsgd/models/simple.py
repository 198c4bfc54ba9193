"""A tiny convnet without BatchNorm or dropout, for smoke and exactness tests.

Its forward pass on a sample does not depend on the other samples in the batch nor on any RNG,
so the gradient of a mean loss over a global batch equals the average of per-worker gradients
over equal shards. That makes it the reference model for checking that distributed
synchronisation reproduces single-process training up to floating-point rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from localsgd.models._init import init_weights

# Spatial side of the map fed to the classifier: fixed, so the linear layer's size does not
# depend on the image size.
_POOLED_SIZE = 4


class SimpleCNN(nn.Module):
    """conv-ReLU-maxpool x2, adaptive average pool to 4x4, one linear layer (~10k params)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            # ceil_mode lets a 1-pixel map pass instead of shrinking to zero, so any image size
            # (including the tiny synthetic ones in tests) is accepted.
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            # Upsamples maps smaller than 4x4 by replication and averages larger ones.
            nn.AdaptiveAvgPool2d(_POOLED_SIZE),
        )
        self.classifier = nn.Linear(32 * _POOLED_SIZE * _POOLED_SIZE, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def simplecnn(num_classes: int = 10) -> SimpleCNN:
    """The BatchNorm-free test model; accepts any square or rectangular image size."""
    return SimpleCNN(num_classes)
