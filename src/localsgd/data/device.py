"""The ``device`` data pipeline: CIFAR held on the training device, augmented by the batch.

The training set is uploaded once as uint8 (N, 3, 32, 32), 150 MB for CIFAR-10's 50,000
images. Batches come from the same sampler as the torchvision pipeline (the same random
partition and per-epoch reshuffle, the same mid-epoch resume), and every sample's crop
offsets and flip are drawn exactly as torchvision's ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip`` draw them under that sample's seed (two ``randint(0, 9)`` then one
``rand``), so both pipelines give the same batches bit for bit; only the pixel work moves
from per-sample PIL calls in loader processes to a few tensor ops per batch.
"""

from __future__ import annotations

from collections.abc import Iterator
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
)

PAD = 4
SIZE = 32


def crop_flip_draws(seeds: list[int]) -> torch.Tensor:
    """(top, left, flip) per sample, drawn as torchvision draws them under each seed."""
    out = torch.empty(len(seeds), 3, dtype=torch.long)
    gen = torch.Generator()
    for k, seed in enumerate(seeds):
        gen.manual_seed(seed)
        # One call for both offsets draws the same two numbers as RandomCrop's two calls.
        out[k, :2] = torch.randint(0, 2 * PAD + 1, (2,), generator=gen)
        out[k, 2] = int(torch.rand(1, generator=gen) < 0.5)
    return out


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
        for batch in self.batches:
            index = torch.tensor([i for i, _ in batch], device=self.device)
            x = self.images[index]
            if self.augment:
                x = self._crop_flip(x, crop_flip_draws([s for _, s in batch]).to(self.device))
            else:  # laid out while still uint8; the float ops below keep the layout
                x = x.contiguous(memory_format=self.memory_format)
            # ToTensor then Normalize, in the same float32 operations.
            yield x.float().div(255).sub(self.mean).div(self.std), self.labels[index]

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
