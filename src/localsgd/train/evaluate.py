"""Test-set evaluation of a model; the caller decides which model and how ranks combine."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             dtype: torch.dtype = torch.float32,
             memory_format: torch.memory_format = torch.preserve_format) -> torch.Tensor:
    """[loss sum, correct, count] (per target) over ``loader``, as float64 for exact sums;
    inputs are laid out in ``memory_format`` (the model's, so convolutions need no
    conversion)."""
    was_training = model.training
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        # Image batches take the model's dtype and layout; token ids stay integers.
        x = (x.to(device, dtype, non_blocking=True, memory_format=memory_format)
             if x.is_floating_point() else x.to(device, non_blocking=True))
        y = y.to(device, non_blocking=True)
        logits = model(x)
        # Logits [..., classes] against targets [...]: one loss term per target (an image's
        # label, or every position of a token window).
        totals[0] += loss_fn(logits.flatten(0, -2), y.flatten()).double()
        totals[1] += (logits.argmax(-1) == y).sum()
        totals[2] += y.numel()
    model.train(was_training)
    return totals
