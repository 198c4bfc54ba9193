"""The epoch's running train sums, kept as the steps' own device tensors until read."""

from __future__ import annotations

import torch


class RunningStats:
    """Train loss sum, correct predictions and loss terms of this epoch on this rank.

    A step only keeps its detached loss and correct-count tensors (no kernel, no copy);
    they are folded into ``totals`` (float64 on the host) when something reads the sums: a
    log step, which waits for the device anyway, a checkpoint, the epoch's end. The fold
    adds them in step order in float64, exactly as a running ``totals[0] += loss * n``
    would, so where the folds fall never changes the sums.
    """

    FOLD_AT = 1024
    """Micro-batches held at most between reads (a long log interval still folds, waiting
    for the device once per this many)."""

    def __init__(self, totals: torch.Tensor) -> None:
        self.totals = totals
        """[loss sum, correct, count] (float64, host): the checkpointed ``TrainState.stats``."""
        self._loss: list[torch.Tensor] = []
        self._correct: list[torch.Tensor] = []
        self._count: list[int] = []

    def add(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        """One micro-batch: its mean loss over ``count`` terms and its correct predictions."""
        self._loss.append(loss)
        self._correct.append(correct)
        self._count.append(count)
        if len(self._count) >= self.FOLD_AT:
            self.fold()

    def fold(self) -> torch.Tensor:
        """Fold the pending steps into ``totals`` and return it."""
        if not self._count:
            return self.totals
        losses = torch.stack(self._loss).double().tolist()
        correct = torch.stack(self._correct).tolist()
        loss_sum, right, count = self.totals.tolist()
        for loss, c, n in zip(losses, correct, self._count, strict=True):
            loss_sum += loss * n
            right += c
            count += n
        self.totals.copy_(torch.tensor([loss_sum, right, count], dtype=torch.float64))
        self._loss, self._correct, self._count = [], [], []
        return self.totals
