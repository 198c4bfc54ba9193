"""The epoch's running train sums: folded late, equal to adding every step as it comes."""

from __future__ import annotations

import torch

from localsgd.train.running import RunningStats


def test_folds_anywhere_equal_the_running_float64_sums() -> None:
    gen = torch.Generator().manual_seed(0)
    losses = torch.rand(50, generator=gen) * 3
    correct = torch.randint(0, 9, (50,), generator=gen)
    counts = [8 if k % 7 else 5 for k in range(50)]  # a short last batch now and then
    expected = torch.zeros(3, dtype=torch.float64)
    for loss, c, n in zip(losses, correct, counts, strict=True):  # the per-step reference
        expected[0] += loss.double() * n
        expected[1] += c
        expected[2] += n
    stats = RunningStats(torch.zeros(3, dtype=torch.float64))
    for k, (loss, c, n) in enumerate(zip(losses, correct, counts, strict=True)):
        stats.add(loss, c, n)
        if k in (3, 4, 20):
            stats.fold()
    assert torch.equal(stats.fold(), expected)
    assert stats.totals[2] == sum(counts)


def test_sums_hit_masks_of_any_shape() -> None:
    stats = RunningStats(torch.zeros(3, dtype=torch.float64))
    hits = [torch.tensor([[True, False, True]]), torch.tensor([True, True]), torch.tensor(1)]
    for h in hits:
        stats.add(torch.tensor(0.5), h, h.numel())
    assert stats.fold().tolist() == [0.5 * 6, 5.0, 6.0]


def test_holds_at_most_fold_at_steps() -> None:
    stats = RunningStats(torch.zeros(3, dtype=torch.float64))
    for _ in range(RunningStats.FOLD_AT + 1):
        stats.add(torch.tensor(1.0), torch.tensor(2), 4)
    assert len(stats._count) == 1  # the rest folded
    assert stats.totals.tolist() == [4.0 * RunningStats.FOLD_AT, 2.0 * RunningStats.FOLD_AT,
                                     4.0 * RunningStats.FOLD_AT]
