"""Weight initialisation shared by all architectures."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit/zero BatchNorm, small-normal linear layers.

    ``fan_out`` with ReLU gain is the He et al. (2015) choice used by the original CIFAR ResNet,
    WRN and DenseNet code; it keeps activation variance roughly constant through deep plain
    stacks, so even ResNet-110 trains from the first step without warmup tricks. Every model
    calls this once at the end of its constructor, which makes initialisation a pure function
    of the global RNG state: seeding before ``build_model`` gives identical replicas on all
    workers, so no broadcast is needed for correctness (engines may still broadcast).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            # A small std keeps initial logits near zero (loss ~ log(num_classes)), which avoids
            # a large first-step gradient spike on the classifier at high learning rates.
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
