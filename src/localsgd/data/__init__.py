"""Datasets and distributed data loaders (see ``datasets`` and ``loaders``)."""

from localsgd.data.datasets import (
    CIFAR_STATS,
    DatasetBundle,
    build_datasets,
    cifar_transforms,
    imagefolder_transforms,
)
from localsgd.data.errors import DataError
from localsgd.data.loaders import (
    ResumableDistributedSampler,
    ShardSampler,
    build_eval_loader,
    build_train_loader,
    mix_seed,
    steps_per_epoch,
)

__all__ = [
    "CIFAR_STATS",
    "DataError",
    "DatasetBundle",
    "ResumableDistributedSampler",
    "ShardSampler",
    "build_datasets",
    "build_eval_loader",
    "build_train_loader",
    "cifar_transforms",
    "imagefolder_transforms",
    "mix_seed",
    "steps_per_epoch",
]
