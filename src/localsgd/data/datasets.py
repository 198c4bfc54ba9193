"""Dataset construction: CIFAR-10/100, an ImageFolder tree, or a learnable synthetic task.

``build_datasets`` is rank-agnostic: the caller decides who may download (rank 0, with
``allow_download=True``) and lets the other ranks load afterwards with ``allow_download=False``,
so that several processes never write the same archive at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets as tvd
from torchvision import transforms as T
from torchvision.datasets.utils import check_integrity

from localsgd.config.schema import (
    MIN_IMAGE_SIZE,
    MIN_SYNTHETIC_CLASSES,
    MIN_SYNTHETIC_SAMPLES,
    DataConfig,
    DatasetName,
)
from localsgd.data.errors import DataError

# Per-channel statistics of the training images (true pixel std, so normalised data has
# std ~1, unlike the widespread (0.2023, 0.1994, 0.2010) figures).
CIFAR_STATS: dict[DatasetName, tuple[tuple[float, ...], tuple[float, ...]]] = {
    DatasetName.cifar10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    DatasetName.cifar100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS: tuple[tuple[float, ...], tuple[float, ...]] = (
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
)

_CIFAR_CLASSES: dict[DatasetName, tuple[type[tvd.CIFAR10], str, str, int]] = {
    # name -> (torchvision class, folder torchvision expects under root, display name, classes)
    DatasetName.cifar10: (tvd.CIFAR10, "cifar-10-batches-py", "CIFAR-10", 10),
    DatasetName.cifar100: (tvd.CIFAR100, "cifar-100-python", "CIFAR-100", 100),
}
_CIFAR_EXAMPLE_ROOT = "../shared/data/cifar10"


@dataclass(frozen=True)
class DatasetBundle:
    """The train and test sets of one recipe plus what the model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    image_size: int


def build_datasets(cfg: DataConfig, seed: int, allow_download: bool = True) -> DatasetBundle:
    """Build the train/test datasets described by ``cfg`` (subsets applied).

    ``seed`` only matters for the synthetic dataset. With ``allow_download=False`` a missing
    dataset raises :class:`DataError` even if ``cfg.download`` is set.
    """
    name = DatasetName(cfg.name)
    if name in _CIFAR_CLASSES:
        bundle = _build_cifar(cfg, name, allow_download)
    elif name is DatasetName.imagefolder:
        bundle = _build_imagefolder(cfg)
    elif name is DatasetName.synthetic:
        bundle = _build_synthetic(cfg, seed)
    else:  # pragma: no cover - the enum is exhaustive
        raise DataError(f"unknown dataset data.name={name!r}")
    return DatasetBundle(
        train=_take_first(bundle.train, cfg.train_subset, "data.train_subset"),
        test=_take_first(bundle.test, cfg.test_subset, "data.test_subset"),
        num_classes=bundle.num_classes,
        image_size=bundle.image_size,
    )


def _take_first(dataset: Dataset, n: int | None, key: str) -> Dataset:
    if n is None:
        return dataset
    if n <= 0:
        raise DataError(f"{key}={n} must be a positive number of samples (or null for all)")
    # Asking for more than exists is harmless for a smoke-test knob: use everything.
    return Subset(dataset, range(min(n, len(dataset))))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- CIFAR


def cifar_transforms(name: DatasetName, augment: bool) -> tuple[Callable, Callable]:
    """(train, test) transforms: pad-4 crop + flip when ``augment``, always normalised."""
    mean, std = CIFAR_STATS[name]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose(aug + tail), T.Compose(list(tail))


def _build_cifar(cfg: DataConfig, name: DatasetName, allow_download: bool) -> DatasetBundle:
    cls, folder, title, num_classes = _CIFAR_CLASSES[name]
    root = Path(cfg.root).expanduser()
    base = root / folder
    if not base.is_dir():
        if cfg.download and allow_download:
            _download_cifar(cls, root, cfg, folder, title)
        else:
            reason = (
                "data.download=false"
                if not cfg.download
                else "this process may not download (only rank 0 does)"
            )
            raise DataError(_missing_cifar_message(cfg, root, folder, title, reason))
    train_tf, test_tf = cifar_transforms(name, cfg.augment)
    train = _load_cifar_split(cls, root, folder, title, train=True, transform=train_tf)
    test = _load_cifar_split(cls, root, folder, title, train=False, transform=test_tf)
    return DatasetBundle(train=train, test=test, num_classes=num_classes, image_size=32)


def _missing_cifar_message(
    cfg: DataConfig, root: Path, folder: str, title: str, reason: str
) -> str:
    hint = ""
    if root.name == folder:
        # A common slip: pointing at the extracted folder itself instead of its parent.
        hint = f" (data.root points at {folder} itself; use its parent directory {root.parent})"
    example = f", e.g. data.root={_CIFAR_EXAMPLE_ROOT}" if folder == "cifar-10-batches-py" else ""
    return (
        f"{title} not found: expected the directory {_show(root / folder)} "
        f"(searched data.root={cfg.root!r}); {reason}{hint}. "
        f"Fix: set data.root= to the directory containing {folder}{example}; or let rank 0 "
        f"download it (data.download=true) on a machine with internet access."
    )


def _download_cifar(
    cls: type[tvd.CIFAR10], root: Path, cfg: DataConfig, folder: str, title: str
) -> None:
    try:
        cls(root=str(root), train=True, download=True)
    except Exception as exc:  # network errors come in many types (URLError, OSError, ...)
        reason = f"the download failed ({type(exc).__name__}: {exc})"
        raise DataError(_missing_cifar_message(cfg, root, folder, title, reason)) from exc


def _load_cifar_split(
    cls: type[tvd.CIFAR10],
    root: Path,
    folder: str,
    title: str,
    train: bool,
    transform: Callable,
) -> Dataset:
    try:
        return cls(root=str(root), train=train, download=False, transform=transform)
    except Exception as exc:
        bad = _first_bad_cifar_file(cls, root / folder)
        what = f"the file {_show(bad)} is missing or corrupt" if bad else f"loading failed: {exc}"
        raise DataError(
            f"{title} under {_show(root / folder)} cannot be loaded: {what}. "
            f"Fix: restore the original file (delete {folder} and download it again), or set "
            f"data.root= to a directory with an intact {folder}."
        ) from exc


def _first_bad_cifar_file(cls: type[tvd.CIFAR10], base: Path) -> Path | None:
    files = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
    for filename, md5 in files:
        if not check_integrity(str(base / filename), md5):
            return base / filename
    return None


def _show(path: Path) -> str:
    """Absolute path for messages: a relative one is ambiguous under torchrun's cwd."""
    return str(Path(os.path.abspath(path)))


# --------------------------------------------------------------------------------- ImageFolder


def imagefolder_transforms(image_size: int, augment: bool) -> tuple[Callable, Callable]:
    """(train, test) transforms: random-resized-crop + flip for training, resize + centre
    crop (the usual 0.875 crop ratio) for testing; ImageNet normalisation."""
    mean, std = IMAGENET_STATS
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    resize = [T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size)]
    if augment:
        train_aug = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        train_aug = list(resize)
    return T.Compose(train_aug + tail), T.Compose(resize + tail)


def load_rgb_image(path: str) -> Image.Image:
    """ImageFolder loader that names the broken file instead of failing deep inside PIL."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as exc:  # PIL's UnidentifiedImageError is an OSError too
        raise DataError(f"cannot read image file {_show(Path(path))}: {exc}") from exc


def _build_imagefolder(cfg: DataConfig) -> DatasetBundle:
    root = Path(cfg.root).expanduser()
    train_dir, val_dir = root / "train", root / "val"
    missing = [d for d in (train_dir, val_dir) if not d.is_dir()]
    if missing:
        raise DataError(
            f"ImageFolder dataset not found: missing {', '.join(_show(d) for d in missing)} "
            f"(searched data.root={cfg.root!r}). Fix: set data.root= to a directory holding "
            f"train/ and val/, each with one sub-directory of images per class."
        )
    train_tf, test_tf = imagefolder_transforms(cfg.image_size, cfg.augment)
    train = _load_imagefolder(train_dir, train_tf)
    test = _load_imagefolder(val_dir, test_tf)
    if train.classes != test.classes:
        raise DataError(
            f"ImageFolder class folders differ between {_show(train_dir)} "
            f"({len(train.classes)} classes) and {_show(val_dir)} ({len(test.classes)}); "
            f"Fix: give val/ exactly the class sub-directories of train/."
        )
    return DatasetBundle(
        train=train, test=test, num_classes=len(train.classes), image_size=cfg.image_size
    )


def _load_imagefolder(directory: Path, transform: Callable) -> tvd.ImageFolder:
    try:
        return tvd.ImageFolder(str(directory), transform=transform, loader=load_rgb_image)
    except Exception as exc:  # e.g. no class folders, or no images with a known extension
        raise DataError(
            f"cannot index the ImageFolder directory {_show(directory)}: {exc}. "
            f"Fix: it needs one sub-directory per class containing image files."
        ) from exc


# ----------------------------------------------------------------------------------- synthetic


def _build_synthetic(cfg: DataConfig, seed: int) -> DatasetBundle:
    """Gaussian images labelled by a fixed random linear teacher, all derived from ``seed``.

    The teacher reads a coarse (image_size/4) latent that is upsampled into the image, so the
    label is carried by smooth, spatially extended structure a small CNN can pick up, rather
    than by single-pixel noise that could only be memorised.
    """
    n_train, n_classes, size = cfg.synthetic_samples, cfg.synthetic_classes, cfg.image_size
    # The recipe's rules (config.validate) already enforce these minimums; this guards
    # direct callers.
    for key, value, least in (("synthetic_samples", n_train, MIN_SYNTHETIC_SAMPLES),
                              ("synthetic_classes", n_classes, MIN_SYNTHETIC_CLASSES),
                              ("image_size", size, MIN_IMAGE_SIZE)):
        if value < least:
            raise DataError(f"data.{key}={value} must be at least {least}")
    gen = torch.Generator().manual_seed(seed)
    latent = size // 4
    teacher = torch.randn(n_classes, 3 * latent * latent, generator=gen)

    def draw(n: int) -> TensorDataset:
        z = torch.randn(n, 3, latent, latent, generator=gen)
        smooth = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)
        noise = torch.randn(n, 3, size, size, generator=gen)
        # Scaled so pixels have std ~1, like normalised real images.
        images = 1.24 * smooth + 0.5 * noise
        labels = (z.flatten(1) @ teacher.T).argmax(dim=1)
        return TensorDataset(images, labels)

    train = draw(n_train)
    test = draw(n_train // 4)
    return DatasetBundle(train=train, test=test, num_classes=n_classes, image_size=size)
