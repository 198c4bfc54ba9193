"""The ``device`` data pipeline: CIFAR held on the training device, augmented by the batch.

The training set is uploaded once as uint8 (N, 3, 32, 32), 150 MB for CIFAR-10's 50,000
images. Batches come from the same sampler as the torchvision pipeline (the same random
partition and per-epoch reshuffle, the same mid-epoch resume), and every sample's crop
offsets and flip are drawn exactly as torchvision's ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip`` draw them under that sample's seed (two ``randint(0, 9)`` then one
``rand``), so both pipelines give the same batches bit for bit; only the pixel work moves
from per-sample PIL calls in loader processes to a few tensor ops per batch.

The draws themselves need no generator per sample. ``torch.Generator.manual_seed(s)`` on the
CPU is MT19937 seeded with the low 32 bits of ``s``, and a sample's three draws are the
generator's first three 32-bit outputs, which depend on only 8 of its 624 state words. Those
words, the twist and the tempering are computed for every seed of a chunk of batches at once
in numpy (about 400 array operations per chunk, whatever its size), and the sample indices
and draws of the chunk go to the device in one copy each.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from localsgd.config.schema import DataConfig, DataPipeline
from localsgd.data.datasets import CIFAR_STATS, DatasetBundle
from localsgd.data.loaders import (
    ResumableDistributedSampler,
    _check_layout,
    _SeededBatchSampler,
    build_train_loader,
    check_batches,
    mix_seeds,
)

PAD = 4
SIZE = 32


MT_N, MT_M = 624, 397
"""MT19937's state size and its twist offset."""
_MT_INIT = np.uint32(1812433253)
CHUNK_BATCHES = 32
"""Batches whose indices and draws are prepared together (one host-to-device copy each)."""


def _mt19937_first_outputs(seeds: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` (< MT_N - MT_M) outputs of MT19937 seeded like ``torch.Generator``'s
    CPU generator (``init_genrand`` with the seed's low 32 bits), for every seed at once;
    uint32 array (len(seeds), count). Output i tempers the twist of state words i, i + 1 and
    i + MT_M, so only those words of the initialisation recurrence are kept."""
    word = (np.asarray(seeds).astype(np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    head, tail = [word], []
    for j in range(1, MT_M + count):
        # uint32 arithmetic wraps modulo 2**32, as the reference implementation's does.
        word = _MT_INIT * (word ^ (word >> np.uint32(30))) + np.uint32(j)
        if j <= count:
            head.append(word)
        elif j >= MT_M:
            tail.append(word)
    out = np.empty((len(word), count), dtype=np.uint32)
    for i in range(count):
        y = (head[i] & np.uint32(0x80000000)) | (head[i + 1] & np.uint32(0x7FFFFFFF))
        v = tail[i] ^ (y >> np.uint32(1)) ^ ((y & np.uint32(1)) * np.uint32(0x9908B0DF))
        v ^= v >> np.uint32(11)
        v ^= (v << np.uint32(7)) & np.uint32(0x9D2C5680)
        v ^= (v << np.uint32(15)) & np.uint32(0xEFC60000)
        v ^= v >> np.uint32(18)
        out[:, i] = v
    return out


def crop_flip_draws(seeds: Sequence[int] | np.ndarray) -> torch.Tensor:
    """(top, left, flip) per sample, as torchvision draws them under each seed: each offset
    is ``randint(0, 9)``, one 32-bit output modulo 9, and the flip is ``rand(1) < 0.5``, whose
    float32 is the output's low 24 bits over 2**24."""
    if len(seeds) == 0:
        return torch.empty(0, 3, dtype=torch.long)
    raw = _mt19937_first_outputs(np.asarray(seeds, dtype=np.uint64), 3)
    out = np.empty((len(raw), 3), dtype=np.int64)
    out[:, :2] = raw[:, :2] % np.uint32(2 * PAD + 1)
    out[:, 2] = (raw[:, 2] & np.uint32(0xFFFFFF)) < np.uint32(1 << 23)
    return torch.from_numpy(out)


def _arrays(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x H x W x C, labels) of a torchvision CIFAR set or a Subset of one."""
    indices: Any = slice(None)
    while isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices)[indices]
        dataset = dataset.dataset
    return np.asarray(dataset.data)[indices], np.asarray(dataset.targets)[indices]  # type: ignore[attr-defined]


class DeviceLoader:
    """Yields ``(images, labels)`` batches already on ``device``; ``len()`` batches per
    epoch, like the DataLoader it replaces."""

    def __init__(self, dataset: Dataset, batches: _SeededBatchSampler, device: torch.device,
                 mean: tuple[float, ...], std: tuple[float, ...], augment: bool,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        images, labels = _arrays(dataset)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
        self.labels = torch.from_numpy(labels).long().to(device)
        self.batches = batches
        self.device = device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.augment = augment
        self.memory_format = memory_format
        span = torch.arange(SIZE, device=device)
        self._rows, self._cols = span.view(1, SIZE, 1), span.view(1, 1, SIZE)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The batch sampler's order and seeds (mix_seed(seed, epoch, index)), computed for a
        # chunk of batches at a time instead of one Python call per sample.
        sampler, size = self.batches.sampler, self.batches.batch_size
        epoch = sampler.epoch
        order = np.fromiter(iter(sampler), dtype=np.int64)
        order = order[:len(order) // size * size]
        step = CHUNK_BATCHES * size
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            index = torch.from_numpy(chunk).to(self.device)
            if self.augment:
                draws = crop_flip_draws(mix_seeds(self.batches.seed, epoch, chunk))
                draws = draws.to(self.device)
            for b in range(0, len(chunk), size):
                i = index[b:b + size]
                x = self.images[i]
                if self.augment:
                    x = self._crop_flip(x, draws[b:b + size])
                else:  # laid out while still uint8; the float ops below keep the layout
                    x = x.contiguous(memory_format=self.memory_format)
                # ToTensor then Normalize, in the same float32 operations.
                yield x.float().div(255).sub(self.mean).div(self.std), self.labels[i]

    def _crop_flip(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (PAD, PAD, PAD, PAD))  # zeros, as RandomCrop's fill=0
        rows = (draws[:, 0].view(-1, 1, 1) + self._rows).expand(-1, SIZE, SIZE)
        cols = (draws[:, 1].view(-1, 1, 1) + self._cols).expand(-1, SIZE, SIZE)
        flip = draws[:, 2].bool().view(-1, 1, 1)
        cols = torch.where(flip, cols.flip(-1), cols)
        b = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
        # (B, H, W, C) gathered per sample, then back to channels first in the model's
        # layout: the usual one by default (a channels-last tensor would send convolutions
        # down another, differently rounding, path than the torchvision pipeline's batches
        # take); for a channels_last model the gathered tensor is already that, uncopied.
        gathered = padded.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)
        return gathered.contiguous(memory_format=self.memory_format)


def build_device_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int,
                        seed: int, device: torch.device, mean: tuple[float, ...],
                        std: tuple[float, ...], augment: bool,
                        memory_format: torch.memory_format = torch.contiguous_format,
                        ) -> tuple[DeviceLoader, ResumableDistributedSampler]:
    """The device pipeline's loader and its sampler (``build_train_loader``'s contract)."""
    _check_layout(batch_size, rank, world_size, 0)
    check_batches(dataset, batch_size, world_size)
    sampler = ResumableDistributedSampler(dataset, world_size, rank, seed, batch_size)  # type: ignore[arg-type]
    batches = _SeededBatchSampler(sampler, batch_size, seed)
    return DeviceLoader(dataset, batches, device, mean, std, augment, memory_format), sampler


def build_train_pipeline(data: DatasetBundle, cfg: DataConfig, rank: int, world_size: int,
                         seed: int, device: torch.device,
                         memory_format: torch.memory_format) -> tuple[Any, Any]:
    """The training loader ``cfg.pipeline`` names and its resumable sampler; device batches
    come in ``memory_format`` (torchvision's are laid out when they reach the device)."""
    if cfg.pipeline == DataPipeline.device:
        mean, std = CIFAR_STATS[cfg.name]
        layout = (torch.contiguous_format if memory_format == torch.preserve_format
                  else memory_format)
        return build_device_loader(data.train, cfg.batch_size, rank, world_size, seed, device,
                                   mean, std, cfg.augment, layout)
    return build_train_loader(data.train, cfg.batch_size, rank, world_size, seed,
                              cfg.num_workers)
