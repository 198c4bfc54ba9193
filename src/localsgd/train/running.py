"""The epoch's running train sums, kept as the steps' own device tensors until read."""

from __future__ import annotations

import torch


class RunningStats:
    """Train loss sum, correct predictions and loss terms of this epoch on this rank.

    A step only keeps its detached loss and its predictions' hit mask: no kernel beyond the
    comparison and no copy (a sum over a bool mask alone launches five ops, and a running
    ``totals[i] += ...`` a view, a cast and a copy each). They are folded into ``totals``
    (float64, on the host) when something reads the sums: a log step, which waits for the
    device anyway, a checkpoint, the epoch's end. The fold adds the losses in step order in
    float64, exactly as ``totals[0] += loss.double() * n`` at every step would, so where the
    folds fall never changes the sums.
    """

    FOLD_AT = 1024
    """Micro-batches held at most between reads (a long log interval still folds, waiting
    for the device once per this many)."""

    def __init__(self, totals: torch.Tensor) -> None:
        self.totals = totals
        """[loss sum, correct, count] (float64, host): the checkpointed ``TrainState.stats``."""
        self._loss: list[torch.Tensor] = []
        self._hits: list[torch.Tensor] = []
        self._count: list[int] = []

    def add(self, loss: torch.Tensor, hits: torch.Tensor, count: int) -> None:
        """One micro-batch: its mean loss over ``count`` terms and where its predictions
        were right (a bool mask, or a count)."""
        self._loss.append(loss)
        self._hits.append(hits)
        self._count.append(count)
        if len(self._count) >= self.FOLD_AT:
            self.fold()

    def fold(self) -> torch.Tensor:
        """Fold the pending steps into ``totals`` and return it."""
        if not self._count:
            return self.totals
        losses = torch.stack(self._loss).double().tolist()
        # Whole numbers below 2**53: their float64 sum is exact in any order.
        right = int(torch.cat([h.reshape(-1) for h in self._hits]).sum(dtype=torch.int64))
        loss_sum, correct, count = self.totals.tolist()
        for loss, n in zip(losses, self._count, strict=True):
            loss_sum += loss * n
            count += n
        correct += right
        self.totals.copy_(torch.tensor([loss_sum, correct, count], dtype=torch.float64))
        self._loss, self._hits, self._count = [], [], []
        return self.totals
