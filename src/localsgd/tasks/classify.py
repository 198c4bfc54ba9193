"""Image classification: the datasets of ``localsgd.data``, the CIFAR model zoo, accuracy."""

from __future__ import annotations

from typing import Any

from torch import nn

from localsgd.config.schema import DatasetName
from localsgd.data import build_datasets
from localsgd.data.datasets import DatasetBundle
from localsgd.models import LM_MODELS, build_model
from localsgd.tasks.base import TASKS, Task


@TASKS.register
class Classify(Task):
    name = "classify"

    @classmethod
    def check(cls, cfg: Any) -> list[str]:
        p: list[str] = []
        if cfg.data.name == DatasetName.text:
            p.append("data.name: text is read by task.name=lm (next-byte language modelling); "
                     "set task.name=lm or choose an image dataset")
        if cfg.model.name in LM_MODELS:
            p.append(f"model.name: {cfg.model.name.value} is a language model; set task.name=lm "
                     "or choose an image classifier (resnet20, ...)")
        return p

    def datasets(self, allow_download: bool) -> DatasetBundle:
        return build_datasets(self.data_cfg, self.seed, allow_download=allow_download)

    def model(self, data: DatasetBundle) -> nn.Module:
        return build_model(self.model_cfg, data.num_classes, data.image_size)
