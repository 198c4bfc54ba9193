"""Data loaders: a per-epoch random partition of the training set, sharded evaluation.

Training order: every epoch all ranks draw the same permutation (from ``seed`` and the epoch)
and rank r takes every world_size-th index of it, so the ranks' shards are disjoint and
equally sized (the tail that does not divide evenly is dropped, as is any partial batch), and
every rank runs exactly :func:`steps_per_epoch` steps. The caller calls
``sampler.set_epoch(epoch)`` before each epoch.

Augmentation: each sample's random transform is seeded from (seed, epoch, dataset index).
The random crop/flip a sample gets therefore depends neither on the number of loader workers,
nor on which rank draws it, nor on whether the run was interrupted and resumed.

Resuming mid-epoch: ``build_train_loader(..., start_epoch=e, skip_batches=k)`` (or
``sampler.set_resume(e, k)`` on an existing loader) makes epoch ``e`` start at batch ``k``:
the sampler drops the first ``k * batch_size`` indices of that epoch's order before any
sample is loaded, so batches k, k+1, ... are exactly those of the uninterrupted run. Other
epochs are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, get_worker_info

from localsgd.data.errors import DataError

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Combine integers into one well-spread 63-bit seed (splitmix64 finaliser per part).

    Plain sums such as ``seed + rank`` collide (seed 0 / rank 1 == seed 1 / rank 0); this
    keeps streams for different (seed, rank, epoch, index) tuples unrelated.
    """
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (part & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state >> 1


def _splitmix_round(state: Any, part: Any, mask: Any, *consts: Any) -> Any:
    """One part of ``mix_seed`` on Python ints or on numpy uint64 arrays alike."""
    golden, mul1, mul2, s30, s27, s31 = consts
    state = (state ^ part) & mask
    state = (state + golden) & mask
    state = ((state ^ (state >> s30)) * mul1) & mask
    state = ((state ^ (state >> s27)) * mul2) & mask
    return state ^ (state >> s31)


def mix_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """``mix_seed(seed, epoch, i)`` for every ``i`` of ``indices``, in a few array ops
    (the per-sample seeds of a whole chunk of batches at once); int64 array."""
    state = 0x9E3779B97F4A7C15
    ints = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 30, 27, 31)
    for part in (seed, epoch):
        state = _splitmix_round(state, part & _MASK64, _MASK64, *ints)
    u64 = [np.uint64(c) for c in ints]
    # uint64 arithmetic wraps modulo 2**64, which is the mask of the integer version.
    with np.errstate(over="ignore"):
        out = _splitmix_round(np.uint64(state), np.asarray(indices).astype(np.uint64),
                              np.uint64(_MASK64), *u64)
    return (out >> np.uint64(1)).astype(np.int64)


def steps_per_epoch(dataset_len: int, batch_size: int, world_size: int) -> int:
    """Batches each rank runs per epoch: the sampler keeps floor(n / world_size) indices per
    rank (drop_last) and the loader drops the last partial batch."""
    return dataset_len // world_size // batch_size


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle, drop_last) that can start one epoch part-way through.

    ``set_resume(epoch, skip_batches)`` drops the first ``skip_batches * batch_size`` indices
    of that epoch only; ``len()`` shrinks accordingly so ``len(loader)`` is the number of
    batches still to come.
    """

    def __init__(
        self, dataset: Sized, num_replicas: int, rank: int, seed: int, batch_size: int
    ) -> None:
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.batch_size = batch_size
        self._resume_epoch: int | None = None
        self._skip_samples = 0

    def set_resume(self, epoch: int, skip_batches: int) -> None:
        """Start ``epoch`` at batch ``skip_batches`` (0 clears a previous resume point)."""
        full = self.num_samples // self.batch_size
        if not 0 <= skip_batches <= full:
            raise ValueError(f"skip_batches={skip_batches} outside [0, {full}] batches/epoch")
        self._resume_epoch = epoch if skip_batches else None
        self._skip_samples = skip_batches * self.batch_size

    def _skip(self) -> int:
        return self._skip_samples if self.epoch == self._resume_epoch else 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self._skip() :])

    def __len__(self) -> int:
        return self.num_samples - self._skip()


class _SeededBatchSampler(Sampler[list[tuple[int, int]]]):
    """Groups the sampler's indices into full batches, tagging each index with its
    augmentation seed; the epoch is read when iteration starts, i.e. after set_epoch."""

    def __init__(self, sampler: ResumableDistributedSampler, batch_size: int, seed: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        batch: list[tuple[int, int]] = []
        for index in self.sampler:
            batch.append((index, mix_seed(self.seed, epoch, index)))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        # A partial last batch is dropped so every rank runs the same number of steps.

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


class _SeededDataset(Dataset):
    """Runs the wrapped dataset's random transforms under a per-sample CPU RNG seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        gen = torch.default_generator
        if get_worker_info() is not None:
            # A worker's RNG serves only this loader, so it can simply be re-seeded.
            gen.manual_seed(seed)
            return self.dataset[index]
        # In the training process (num_workers=0) the global RNG must come back untouched;
        # only the CPU generator is used, so CUDA RNG streams are never disturbed.
        state = gen.get_state()
        try:
            gen.manual_seed(seed)
            return self.dataset[index]
        finally:
            gen.set_state(state)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def _check_layout(batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def check_batches(dataset: Dataset, batch_size: int, world_size: int) -> None:
    """DataError unless every rank gets at least one full batch per epoch."""
    n = len(dataset)  # type: ignore[arg-type]
    if steps_per_epoch(n, batch_size, world_size) == 0:
        raise DataError(
            f"the training set has {n} samples, fewer than world_size * batch_size = "
            f"{world_size} * {batch_size}, so no rank would get a single batch. Fix: lower "
            f"data.batch_size or raise data.train_subset / data.synthetic_samples."
        )


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int,
    *,
    start_epoch: int = 0,
    skip_batches: int = 0,
) -> tuple[DataLoader, ResumableDistributedSampler]:
    """Training loader over this rank's shard of a fresh random partition every epoch.

    Returns the loader and its sampler; call ``sampler.set_epoch(epoch)`` before each epoch.
    ``start_epoch``/``skip_batches`` resume mid-epoch (see the module docstring). The loader
    yields ``steps_per_epoch(len(dataset), batch_size, world_size)`` full batches per epoch.
    """
    _check_layout(batch_size, rank, world_size, num_workers)
    check_batches(dataset, batch_size, world_size)
    sampler = ResumableDistributedSampler(dataset, world_size, rank, seed, batch_size)  # type: ignore[arg-type]
    sampler.set_epoch(start_epoch)
    sampler.set_resume(start_epoch, skip_batches)
    loader = DataLoader(
        _SeededDataset(dataset),
        batch_sampler=_SeededBatchSampler(sampler, batch_size, seed),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        # Worker base seeds, for any randomness outside the per-sample seeding.
        generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
    )
    return loader, sampler


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ...: disjoint shards covering every sample once.

    Unlike ``DistributedSampler`` it never pads with duplicates, so summing correct counts
    and sample counts over ranks gives the exact test accuracy.
    """

    def __init__(self, dataset_len: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    shard: bool,
    num_workers: int,
) -> DataLoader:
    """Evaluation loader in dataset order, keeping the last partial batch.

    ``shard=True``: this rank sees only its :class:`ShardSampler` shard (reduce the metric
    sums over ranks); ``shard=False``: every rank sees the whole test set.
    """
    _check_layout(batch_size, rank, world_size, num_workers)
    n = len(dataset)  # type: ignore[arg-type]
    sampler = ShardSampler(n, rank, world_size) if shard else ShardSampler(n, 0, 1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
