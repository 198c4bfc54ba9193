"""The device data pipeline against the torchvision one, on real CIFAR-10."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import synthetic_args, torchrun
from helpers import final_model

from localsgd.config import ConfigError
from localsgd.config.schema import DataConfig, DatasetName
from localsgd.data import CIFAR_STATS, build_datasets, build_train_loader, mix_seed
from localsgd.data.device import build_device_loader, crop_flip_draws
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
def test_both_pipelines_give_the_same_batches_bit_for_bit(cifar_root: Path,
                                                          augment: bool) -> None:
    """Same partition, same reshuffle, same crops and flips, same normalisation; also after
    a mid-epoch resume."""
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


def test_training_with_either_pipeline_gives_the_same_model(tmp_path: Path,
                                                            cifar_root: Path) -> None:
    common = ["data.name=cifar10", f"data.root={cifar_root}", "data.download=false",
              "data.train_subset=256", "data.test_subset=64", "data.image_size=32",
              "data.augment=true", "sync.algorithm=local", "sync.period=2", "train.epochs=2"]
    torchrun(synthetic_args(tmp_path / "tv", *common))
    torchrun(synthetic_args(tmp_path / "dev", *common, "data.pipeline=device"))
    a, b = final_model(tmp_path / "tv"), final_model(tmp_path / "dev")
    assert all(torch.equal(a[k], b[k]) for k in a)
