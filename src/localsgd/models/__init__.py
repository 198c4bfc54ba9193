"""Model zoo: CIFAR architectures as plain ``nn.Module``s, selected by ``ModelConfig.name``.

Models contain no distributed code; engines wrap them. Initialisation draws from the global
torch RNG only, so seeding before :func:`build_model` yields identical replicas on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from localsgd.config.schema import ModelConfig, ModelName
from localsgd.models import densenet, vgg
from localsgd.models.densenet import DenseNet, densenet40_12
from localsgd.models.resnet import CifarResNet, resnet_cifar
from localsgd.models.simple import SimpleCNN, simplecnn
from localsgd.models.vgg import VGG, vgg16_bn
from localsgd.models.wide_resnet import WideResNet, wrn28_10

__all__ = [
    "IMAGE_MODELS",
    "LM_MODELS",
    "CifarResNet",
    "DenseNet",
    "SimpleCNN",
    "VGG",
    "WideResNet",
    "build_model",
    "densenet40_12",
    "resnet_cifar",
    "simplecnn",
    "vgg16_bn",
    "wrn28_10",
]

LM_MODELS = (ModelName.gpt_tiny, ModelName.gpt_mini, ModelName.gpt2_124m)
"""Decoder-only transformers (``models.gpt``), built by the lm task."""
IMAGE_MODELS = tuple(m for m in ModelName if m not in LM_MODELS)
"""The image classifiers :func:`build_model` builds."""

_RESNET_DEPTHS: dict[ModelName, int] = {
    ModelName.resnet20: 20,
    ModelName.resnet32: 32,
    ModelName.resnet44: 44,
    ModelName.resnet56: 56,
    ModelName.resnet110: 110,
}

_OTHER_BUILDERS: dict[ModelName, Callable[[int], nn.Module]] = {
    ModelName.vgg16: vgg16_bn,
    ModelName.wrn28_10: wrn28_10,
    ModelName.densenet40_12: densenet40_12,
    ModelName.simplecnn: simplecnn,
}

# Smallest image side each architecture can process; others work down to 1 pixel because
# their only downsampling is padded strided convs followed by global pooling.
_MIN_IMAGE_SIZE: dict[ModelName, int] = {
    ModelName.vgg16: vgg.MIN_IMAGE_SIZE,
    ModelName.densenet40_12: densenet.MIN_IMAGE_SIZE,
}


def build_model(cfg: ModelConfig, num_classes: int, image_size: int = 32) -> nn.Module:
    """Instantiate ``cfg.name`` for ``num_classes`` outputs and square ``image_size`` inputs.

    All models end in global average pooling, so ``image_size`` does not change their
    parameters; it is only checked against the architecture's minimum so that a bad recipe
    fails here rather than deep inside the first forward pass. With ``cfg.channels_last``
    the 4-D weights are laid out channels_last (moving the model keeps the layout).
    """
    # Accept the raw string too: recipes merged without the structured schema yield strings.
    name = ModelName(cfg.name)
    if name in LM_MODELS:
        raise ValueError(f"model {name.value} is a language model: recipes build it with "
                         "task.name=lm (localsgd.tasks.lm), from the text's vocabulary")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    min_size = _MIN_IMAGE_SIZE.get(name, 1)
    if image_size < min_size:
        raise ValueError(
            f"model {name.value} needs images of at least {min_size}x{min_size}, "
            f"got image_size={image_size}"
        )
    if name in _RESNET_DEPTHS:
        model = resnet_cifar(_RESNET_DEPTHS[name], num_classes)
    else:
        model = _OTHER_BUILDERS[name](num_classes)
    if getattr(cfg, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model
