"""What a task supplies to the trainer, and the registry that finds tasks by name.

A task is a file in this package registering a ``Task`` subclass: the datasets, the model
family, the loss, how a batch reaches the device, and the names of its metrics. The trainer,
the engines and the sync parts are the same for every task; they see models, batches of
``(x, y)`` and a loss module. Every task's batches satisfy: logits ``[..., classes]`` and
targets ``[...]`` (one class index per position), so the running sums the trainer keeps
(loss x count, correct, count) and the evaluation's sums mean the same for every task.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from localsgd.data.datasets import DatasetBundle
from localsgd.registry import Registry

TASKS: Registry[type] = Registry("task.name", "localsgd.tasks")


class Task:
    """Base of the registered tasks; built from the recipe's model and data sections."""

    name: ClassVar[str]
    unit: ClassVar[str] = "samples"
    """What the loss averages over and throughput counts: samples, or tokens."""
    headline: ClassVar[str] = "eval/acc"
    """The summary metric a re-launch of a finished run reports."""

    def __init__(self, model_cfg: Any, data_cfg: Any, seed: int) -> None:
        self.model_cfg, self.data_cfg, self.seed = model_cfg, data_cfg, seed

    @classmethod
    def check(cls, cfg: Any) -> list[str]:
        """Every problem of the model/data/train keys under this task, with full keys."""
        return []

    def datasets(self, allow_download: bool) -> DatasetBundle:
        raise NotImplementedError

    def model(self, data: DatasetBundle) -> nn.Module:
        raise NotImplementedError

    def loss_fn(self) -> nn.Module:
        """Mean loss of a micro-batch: ``loss_fn(logits, y)``."""
        return nn.CrossEntropyLoss()

    def units_per_sample(self) -> int:
        """Loss terms per dataset sample (1 for a class label, the context for a window)."""
        return 1

    def progress(self, samples: int) -> dict[str, int]:
        """What ``samples`` samples over all workers amount to, for the x axes of records:
        samples, and the task's own unit beside them where it has one (tokens)."""
        return {"samples": samples}

    def throughput(self, units: float, seconds: float) -> dict[str, float]:
        """Rates of ``units`` loss terms consumed in ``seconds``: samples per second, and the
        task's own unit per second beside it where it has one."""
        return {"throughput/samples_per_s": units / self.units_per_sample() / max(seconds, 1e-9)}

    def to_device(self, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                  dtype: torch.dtype, layout: torch.memory_format
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Floating inputs take the model's dtype and layout; token ids stay integers.
        Tensors already there (the device pipeline's) are not passed through ``to``, which
        would still dispatch an op each."""
        if x.is_floating_point():
            if x.device != device or x.dtype != dtype or not (
                    layout == torch.preserve_format or x.is_contiguous(memory_format=layout)):
                x = x.to(device, dtype, non_blocking=True, memory_format=layout)
        elif x.device != device:
            x = x.to(device, non_blocking=True)
        return x, (y if y.device == device else y.to(device, non_blocking=True))

    def metrics(self, prefix: str, loss_sum: float, correct: float, count: float
                ) -> dict[str, float]:
        """The named metrics of the sums over ``count`` loss terms (prefix train or eval)."""
        n = max(count, 1)
        return {f"{prefix}/loss": loss_sum / n, f"{prefix}/acc": correct / n}


def cross_entropy_metrics(prefix: str, loss_sum: float, correct: float,
                          count: float) -> dict[str, float]:
    """Loss in nats per token, next-token accuracy, perplexity and bits per token (bits per
    byte for byte-level tokens)."""
    loss = loss_sum / max(count, 1)
    return {f"{prefix}/loss": loss, f"{prefix}/acc": correct / max(count, 1),
            f"{prefix}/ppl": math.exp(min(loss, 700.0)), f"{prefix}/bpb": loss / math.log(2)}


def build_task(cfg: Any) -> Task:
    """The task ``cfg.task.name`` names, built from the recipe's model and data sections."""
    task: Task = TASKS.get(cfg.task.name)(cfg.model, cfg.data, cfg.seed)
    return task


def task_rules(cfg: Any) -> list[str]:
    """Problems of the recipe under its task (an unknown task name is one)."""
    cls = TASKS.find(cfg.task.name)
    if cls is None:
        return [TASKS.unknown(cfg.task.name)]
    problems: list[str] = cls.check(cfg)
    return problems
