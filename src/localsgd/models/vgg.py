"""VGG-16 with BatchNorm, adapted to 32x32 CIFAR images.

The 13 conv layers follow Simonyan & Zisserman's configuration D, each followed by BatchNorm
(which VGG-16 needs to train from scratch at the large learning rates used for local SGD).
After five 2x2 max-pools a 32x32 image is a 1x1x512 map, so the ImageNet classifier
(three huge fully connected layers over a 7x7 map) is replaced by a single 512 -> classes
linear layer, the usual CIFAR adaptation (~14.7M parameters, almost all in the convs).
"""

from __future__ import annotations

import torch
from torch import nn

from localsgd.models._init import init_weights

# Output channels per conv; "M" is a 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip

# Five halvings: smaller images would shrink to zero before the last pool.
MIN_IMAGE_SIZE = 32


class VGG(nn.Module):
    """VGG-BN feature extractor plus a single linear classifier."""

    def __init__(self, cfg: tuple[int | str, ...], num_classes: int = 10) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(v, int)
                # No conv bias: the following BatchNorm's shift subsumes it.
                layers += [
                    nn.Conv2d(in_ch, v, 3, padding=1, bias=False),
                    nn.BatchNorm2d(v),
                    nn.ReLU(inplace=True),
                ]
                in_ch = v
        self.features = nn.Sequential(*layers)
        # Identity on 32x32 inputs; lets larger images (e.g. ImageFolder at 64px) reuse the
        # same classifier instead of changing its input size.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.features(x))
        return self.classifier(torch.flatten(out, 1))


def vgg16_bn(num_classes: int = 10) -> VGG:
    """VGG-16 with BatchNorm for 32x32 inputs (needs images of at least 32x32)."""
    return VGG(_VGG16_CFG, num_classes)
