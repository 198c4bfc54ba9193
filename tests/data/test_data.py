"""Tests of localsgd.data: datasets, error messages, partitioning, sharding and resuming."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
from conftest import CIFAR_ROOT
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10

from localsgd.config.schema import DataConfig, DatasetName
from localsgd.data import (
    DataError,
    build_datasets,
    build_eval_loader,
    build_train_loader,
    steps_per_epoch,
)


class IndexDataset(Dataset):
    """Returns its own index, so a loader's output is its sample order."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


class RandomAugDataset(IndexDataset):
    """Stands in for a random transform: each item is (index, a draw from torch's RNG)."""

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:  # type: ignore[override]
        return index, torch.rand(())


def epoch_indices(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(i) for batch in loader for i in batch]


def rank_orders(n: int, bs: int, ws: int, seed: int, epoch: int) -> list[list[int]]:
    orders = []
    for rank in range(ws):
        loader, sampler = build_train_loader(IndexDataset(n), bs, rank, ws, seed, num_workers=0)
        sampler.set_epoch(epoch)
        orders.append(epoch_indices(loader))
    return orders


# ------------------------------------------------------------------------------------ datasets


@pytest.mark.skipif(
    not (CIFAR_ROOT / "cifar-10-batches-py").is_dir(),
    reason=f"real CIFAR-10 not present at {CIFAR_ROOT}/cifar-10-batches-py",
)
def test_real_cifar10_loads_normalised() -> None:
    cfg = DataConfig(name=DatasetName.cifar10, root=str(CIFAR_ROOT), download=False)
    bundle = build_datasets(cfg, seed=0, allow_download=False)
    assert (len(bundle.train), len(bundle.test)) == (50000, 10000)
    assert (bundle.num_classes, bundle.image_size) == (10, 32)
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    sample = torch.stack([bundle.test[i][0] for i in range(0, 10000, 10)])
    mean = sample.mean(dim=(0, 2, 3))
    std = sample.std(dim=(0, 2, 3))
    assert torch.all(mean.abs() < 0.1), mean
    assert torch.all((std - 1).abs() < 0.1), std


def test_missing_cifar_names_path_and_fix(tmp_path: Path) -> None:
    cfg = DataConfig(name=DatasetName.cifar10, root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DataError) as info:
        build_datasets(cfg, seed=0)
    msg = str(info.value)
    assert "data.root=" in msg and "cifar-10-batches-py" in msg
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg


def test_missing_cifar_without_download_permission_does_not_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(self: CIFAR10) -> None:
        raise AssertionError("a rank without download permission tried to download")

    monkeypatch.setattr(CIFAR10, "download", forbidden)
    cfg = DataConfig(name=DatasetName.cifar100, root=str(tmp_path), download=True)
    with pytest.raises(DataError, match="cifar-100-python"):
        build_datasets(cfg, seed=0, allow_download=False)


def test_failed_download_becomes_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(self: CIFAR10) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(CIFAR10, "download", offline)
    cfg = DataConfig(name=DatasetName.cifar10, root=str(tmp_path), download=True)
    with pytest.raises(DataError, match="download failed") as info:
        build_datasets(cfg, seed=0)
    assert "data.root=" in str(info.value)
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_corrupt_cifar_file_is_named(tmp_path: Path) -> None:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in ["data_batch_1", "data_batch_2", "batches.meta"]:
        (base / name).write_bytes(b"not a pickle")
    cfg = DataConfig(name=DatasetName.cifar10, root=str(tmp_path), download=False)
    with pytest.raises(DataError, match="data_batch_1") as info:
        build_datasets(cfg, seed=0)
    assert info.value.__cause__ is not None


def test_imagefolder_missing_and_present(tmp_path: Path) -> None:
    cfg = DataConfig(name=DatasetName.imagefolder, root=str(tmp_path), image_size=16)
    with pytest.raises(DataError) as info:
        build_datasets(cfg, seed=0)
    assert "train" in str(info.value) and "val" in str(info.value)
    assert "data.root=" in str(info.value)

    for split in ["train", "val"]:
        for cls in ["cat", "dog"]:
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (40 * i, 100, 200)).save(folder / f"{i}.png")
    bundle = build_datasets(cfg, seed=0)
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (4, 4, 2)
    assert bundle.train[0][0].shape == (3, 16, 16)
    assert bundle.test[3][0].shape == (3, 16, 16)

    (tmp_path / "val" / "dog" / "1.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="1.png"):
        build_datasets(cfg, seed=0).test[3]


def test_synthetic_deterministic_learnable_shape_and_subsets() -> None:
    cfg = DataConfig(name=DatasetName.synthetic, synthetic_samples=64, synthetic_classes=5)
    a, b = build_datasets(cfg, seed=3), build_datasets(cfg, seed=3)
    c = build_datasets(cfg, seed=4)
    assert (len(a.train), len(a.test), a.num_classes, a.image_size) == (64, 16, 5, 32)
    for x, y in zip(a.train.tensors, b.train.tensors, strict=True):  # type: ignore[attr-defined]
        assert torch.equal(x, y)
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])  # type: ignore[attr-defined]
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])  # type: ignore[attr-defined]
    labels = a.train.tensors[1]  # type: ignore[attr-defined]
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < 5
    assert len(labels.unique()) > 1

    sub = DataConfig(name=DatasetName.synthetic, train_subset=10, test_subset=1000)
    bundle = build_datasets(sub, seed=0)
    full = build_datasets(DataConfig(name=DatasetName.synthetic), seed=0)
    assert (len(bundle.train), len(bundle.test)) == (10, 128)
    assert torch.equal(bundle.train[9][0], full.train[9][0])


# ------------------------------------------------------------------------------------- loaders


def test_partition_disjoint_equal_reshuffled_and_reproducible() -> None:
    n, bs, ws = 103, 5, 2
    epoch0 = rank_orders(n, bs, ws, seed=7, epoch=0)
    assert len(epoch0[0]) == len(epoch0[1]) == steps_per_epoch(n, bs, ws) * bs
    assert not set(epoch0[0]) & set(epoch0[1])
    epoch1 = rank_orders(n, bs, ws, seed=7, epoch=1)
    assert epoch1[0] != epoch0[0] and set(epoch1[0]) != set(epoch0[0])
    assert rank_orders(n, bs, ws, seed=7, epoch=0) == epoch0
    assert rank_orders(n, bs, ws, seed=8, epoch=0) != epoch0


@pytest.mark.parametrize("n, bs, ws", [(103, 5, 2), (100, 10, 4), (50000, 128, 3), (17, 4, 1)])
def test_steps_per_epoch_matches_loader(n: int, bs: int, ws: int) -> None:
    for rank in range(ws):
        loader, _ = build_train_loader(IndexDataset(n), bs, rank, ws, seed=0, num_workers=0)
        assert len(loader) == steps_per_epoch(n, bs, ws)
    if n < 1000:
        assert sum(1 for _ in loader) == steps_per_epoch(n, bs, ws)


def test_too_small_training_set_is_a_data_error() -> None:
    with pytest.raises(DataError, match="data.batch_size"):
        build_train_loader(IndexDataset(15), 8, 0, 2, seed=0, num_workers=0)


@pytest.mark.parametrize("ws", [1, 3, 4])
def test_eval_shards_cover_each_index_once(ws: int) -> None:
    n = 103
    seen: list[int] = []
    for rank in range(ws):
        seen += epoch_indices(build_eval_loader(IndexDataset(n), 8, rank, ws, True, 0))
    assert sorted(seen) == list(range(n))
    full = epoch_indices(build_eval_loader(IndexDataset(n), 8, ws - 1, ws, False, 0))
    assert full == list(range(n))


def test_skip_batches_resumes_exact_tail() -> None:
    n, bs, ws, seed, skip = 200, 6, 2, 5, 4
    for rank in range(ws):
        loader, sampler = build_train_loader(IndexDataset(n), bs, rank, ws, seed, 0)
        uninterrupted = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            uninterrupted.append(epoch_indices(loader))

        loader, sampler = build_train_loader(
            IndexDataset(n), bs, rank, ws, seed, 0, start_epoch=1, skip_batches=skip
        )
        assert len(loader) == steps_per_epoch(n, bs, ws) - skip
        sampler.set_epoch(1)
        assert epoch_indices(loader) == uninterrupted[1][skip * bs :]
        sampler.set_epoch(2)
        assert len(loader) == steps_per_epoch(n, bs, ws)
        assert epoch_indices(loader) == uninterrupted[2]

        # Resume point set after the loader exists (e.g. once a checkpoint is read).
        loader, sampler = build_train_loader(IndexDataset(n), bs, rank, ws, seed, 0)
        sampler.set_resume(2, steps_per_epoch(n, bs, ws))
        sampler.set_epoch(2)
        assert epoch_indices(loader) == []


def test_augmentation_seeded_per_sample_independent_of_workers_and_resume() -> None:
    n, bs, ws, seed = 48, 4, 2, 11

    def run(num_workers: int, skip: int = 0) -> dict[int, float]:
        loader, sampler = build_train_loader(
            RandomAugDataset(n), bs, 1, ws, seed, num_workers, start_epoch=1, skip_batches=skip
        )
        sampler.set_epoch(1)
        return {int(i): float(v) for idx, val in loader for i, v in zip(idx, val, strict=True)}

    rng_before = torch.get_rng_state()
    plain = run(0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert run(2) == plain
    resumed = run(0, skip=2)
    assert len(resumed) == len(plain) - 2 * bs
    assert all(plain[i] == v for i, v in resumed.items())
    assert len(set(plain.values())) == len(plain)


@pytest.mark.parametrize(("key", "least"), [("synthetic_samples", 4), ("synthetic_classes", 2),
                                            ("image_size", 8)])
def test_recipe_rules_and_the_synthetic_builder_agree_on_minimums(key: str,
                                                                  least: int) -> None:
    from localsgd.config import ConfigError
    from localsgd.recipe import load_config

    small = {"synthetic_samples": 8, "image_size": 8}
    base = [f"data.{k}={v}" for k, v in small.items() if k != key]
    cfg = load_config(None, ["data.name=synthetic", *base, f"data.{key}={least}"])
    build_datasets(cfg.data, seed=0)  # the smallest accepted value builds
    with pytest.raises(ConfigError, match=f"data.{key}: must be >= {least}"):
        load_config(None, ["data.name=synthetic", *base, f"data.{key}={least - 1}"])
    with pytest.raises(DataError, match=f"data.{key}={least - 1} must be at least {least}"):
        build_datasets(DataConfig(**{"name": DatasetName.synthetic, **small,
                                     key: least - 1}), seed=0)
