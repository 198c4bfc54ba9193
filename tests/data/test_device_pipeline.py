"""The device data pipeline against the torchvision one, on real CIFAR-10."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_args, torchrun
from helpers import final_model
from torchvision import transforms as T

from localsgd.config import ConfigError
from localsgd.config.schema import DataConfig, DatasetName
from localsgd.data import CIFAR_STATS, build_datasets, build_train_loader, mix_seed
from localsgd.data import device as device_module
from localsgd.data.device import build_device_loader, crop_flip_draws
from localsgd.data.loaders import mix_seeds
from localsgd.recipe import load_config


def loaders(root: Path, rank: int, world: int, augment: bool = True) -> tuple:
    cfg = DataConfig(name=DatasetName.cifar10, root=str(root), download=False,
                     train_subset=300, augment=augment)
    train = build_datasets(cfg, seed=0).train
    mean, std = CIFAR_STATS[DatasetName.cifar10]
    tv = build_train_loader(train, 16, rank, world, seed=5, num_workers=0)
    dev = build_device_loader(train, 16, rank, world, 5, torch.device("cpu"), mean, std,
                              augment)
    return tv, dev


@pytest.mark.parametrize("augment", [True, False])
def test_both_pipelines_give_the_same_batches_bit_for_bit(cifar_root: Path, augment: bool,
                                                          monkeypatch) -> None:
    """Same partition, same reshuffle, same crops and flips, same normalisation; also after
    a mid-epoch resume, and across the chunks the device loader prepares its draws in (2
    batches here, so 9 batches make 5 chunks, the last one short)."""
    monkeypatch.setattr(device_module, "CHUNK_BATCHES", 2)
    for rank in range(2):
        (tv, tv_sampler), (dev, dev_sampler) = loaders(cifar_root, rank, 2, augment)
        assert len(tv) == len(dev) == 300 // 2 // 16
        for epoch, skip in ((0, 0), (1, 0), (2, 3)):
            for sampler in (tv_sampler, dev_sampler):
                sampler.set_epoch(epoch)
                sampler.set_resume(epoch, skip)
            got = list(zip(tv, dev, strict=True))
            assert len(got) == len(tv) == len(dev)  # len() follows the resume point
            for (x1, y1), (x2, y2) in got:
                assert torch.equal(y1, y2)
                assert torch.equal(x1, x2) and x1.stride() == x2.stride()


def per_sample_draws(seeds: list[int]) -> torch.Tensor:
    """The draws with one seeded torch.Generator per sample, as torchvision makes them."""
    out = torch.empty(len(seeds), 3, dtype=torch.long)
    gen = torch.Generator()
    for k, seed in enumerate(seeds):
        gen.manual_seed(seed)
        out[k, 0] = torch.randint(0, 9, (1,), generator=gen)
        out[k, 1] = torch.randint(0, 9, (1,), generator=gen)
        out[k, 2] = int(torch.rand(1, generator=gen) < 0.5)
    return out


def test_vectorised_draws_equal_one_generator_per_sample() -> None:
    """Random 63-bit seeds and the edges of the 32 bits the generator keeps."""
    rng = np.random.default_rng(7)
    seeds = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1,
             *rng.integers(0, 2**63 - 1, 3000, dtype=np.int64).tolist()]
    assert torch.equal(crop_flip_draws(seeds), per_sample_draws(seeds))
    assert crop_flip_draws([]).shape == (0, 3)


def test_draws_are_torchvisions_crops_and_flips() -> None:
    """RandomCrop(32, padding=4) + RandomHorizontalFlip of an image whose pixels encode
    their position, under each sample's seed, cut where the draws say."""
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    image = torch.stack([rows, cols, torch.zeros_like(rows)]).float() + 1  # 0 is padding
    tv = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    seeds = [mix_seed(11, 2, i) for i in range(200)]
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    with torch.random.fork_rng(devices=[]):
        for seed, (top, left, flip) in zip(seeds, crop_flip_draws(seeds).tolist(),
                                           strict=True):
            torch.manual_seed(seed)
            want = padded[:, top:top + 32, left:left + 32]
            assert torch.equal(tv(image), want.flip(-1) if flip else want)


def test_vectorised_seeds_equal_mix_seed() -> None:
    indices = np.array([0, 1, 2, 49_999, 2**31, 2**40 + 3], dtype=np.int64)
    for seed, epoch in ((0, 0), (5, 3), (2**62, 299)):
        assert mix_seeds(seed, epoch, indices).tolist() == [
            mix_seed(seed, epoch, int(i)) for i in indices]


def test_crop_and_flip_draws_are_uniform() -> None:
    """9 x 9 offsets and the flip, from 40,500 per-sample seeds: each offset pair within
    25% of its expected 500 and the flip within 2% of one half (about 5 standard deviations
    for the offsets)."""
    draws = crop_flip_draws([mix_seed(3, 0, i) for i in range(40_500)])
    pairs = Counter((int(a), int(b)) for a, b, _ in draws)
    assert set(pairs) == {(a, b) for a in range(9) for b in range(9)}
    assert all(375 <= n <= 625 for n in pairs.values()), pairs
    assert abs(draws[:, 2].float().mean().item() - 0.5) < 0.02


def test_device_pipeline_is_for_cifar_only() -> None:
    with pytest.raises(ConfigError, match="data.pipeline: device holds CIFAR-10/100"):
        load_config(None, ["data.name=synthetic", "data.pipeline=device"])


@pytest.mark.slow
def test_training_with_either_pipeline_gives_the_same_model(tmp_path: Path,
                                                            cifar_root: Path) -> None:
    common = ["data.name=cifar10", f"data.root={cifar_root}", "data.download=false",
              "data.train_subset=256", "data.test_subset=64", "data.image_size=32",
              "data.augment=true", "sync.algorithm=local", "sync.period=2", "train.epochs=2"]
    torchrun(synthetic_args(tmp_path / "tv", *common))
    torchrun(synthetic_args(tmp_path / "dev", *common, "data.pipeline=device"))
    a, b = final_model(tmp_path / "tv"), final_model(tmp_path / "dev")
    assert all(torch.equal(a[k], b[k]) for k in a)


class FakeCifar(torch.utils.data.Dataset):
    """What the device pipeline reads of a torchvision CIFAR set: uint8 HWC images, labels."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)
        self.targets = [i % 10 for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.data[i], self.targets[i]


@pytest.mark.parametrize("augment", [True, False])
def test_channels_last_batches_hold_the_same_values_in_the_model_layout(augment: bool) -> None:
    """model.channels_last: device batches come channels_last (the crop's gather already
    lies that way), with the values of the default layout's batches."""
    mean, std = CIFAR_STATS[DatasetName.cifar10]
    made = [build_device_loader(FakeCifar(), 8, 0, 1, 5, torch.device("cpu"), mean, std,
                                augment, layout)[0]
            for layout in (torch.contiguous_format, torch.channels_last)]
    for (x1, y1), (x2, y2) in zip(*made, strict=True):
        assert torch.equal(y1, y2) and torch.equal(x1, x2)
        assert x1.is_contiguous()
        assert x2.is_contiguous(memory_format=torch.channels_last) and not x2.is_contiguous()
