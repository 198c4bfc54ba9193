"""Language modelling: byte-level next-token prediction on a folder of text with a GPT.

A sample is one window of ``data.context`` tokens and its targets (the same window shifted
by one); the loss is the mean cross-entropy per token in nats, so bits per byte is the loss
over ln 2 (one token is one byte). Validation documents are whole files held out of
training (``localsgd.data.text``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from localsgd.config.schema import DataPipeline, DatasetName, ModelName, Positions
from localsgd.data import DataError
from localsgd.data.datasets import DatasetBundle, _take_first
from localsgd.models import LM_MODELS
from localsgd.tasks.base import TASKS, Task, cross_entropy_metrics


class TokenCrossEntropy(nn.Module):
    """Mean cross-entropy over every position of ``[B, T, V]`` logits and ``[B, T]`` targets."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2), y.flatten())


def cache_dir(configured: str | None) -> Path:
    """data.cache_dir, else $LOCALSGD_CACHE, else ~/.cache/localsgd/text."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("LOCALSGD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "localsgd" / "text"


@TASKS.register
class LanguageModel(Task):
    name = "lm"
    unit = "tokens"
    headline = "eval/bpb"

    @classmethod
    def check(cls, cfg: Any) -> list[str]:
        p: list[str] = []
        d, m, t = cfg.data, cfg.model, cfg.train
        if d.name != DatasetName.text:
            p.append(f"data.name: task.name=lm reads text, not {d.name.value}; set data.name=text "
                     "and data.root to a folder or file of UTF-8 text")
        if m.name not in LM_MODELS:
            p.append(f"model.name: task.name=lm needs a language model, not {m.name.value}; "
                     f"choose one of {', '.join(x.value for x in LM_MODELS)}")
        if m.channels_last:
            p.append("model.channels_last: only image models have 4-D weights; set it to false")
        if d.pipeline != DataPipeline.torchvision:
            p.append("data.pipeline: text windows load with the default loader; set "
                     "data.pipeline=torchvision")
        if t.target_acc is not None:
            p.append("train.target_acc: language models report loss, not accuracy; use "
                     "train.target_loss (validation nats per token) instead")
        if d.cache_dir and _inside(Path(d.cache_dir), Path(str(d.root))):
            p.append(f"data.cache_dir: '{d.cache_dir}' lies inside data.root '{d.root}'; the "
                     "data folder stays read-only, choose a cache folder outside it")
        return p

    def datasets(self, allow_download: bool) -> DatasetBundle:
        from localsgd.data.text import TextDataError, TextWindows, load_text

        d = self.data_cfg
        try:
            splits = load_text(d.root, cache_dir(d.cache_dir), d.val_fraction, self.seed)
            train = TextWindows(splits.train, d.context)
            val = TextWindows(splits.val, d.context)
        except TextDataError as exc:
            raise DataError(str(exc)) from exc
        return DatasetBundle(train=_take_first(train, d.train_subset, "data.train_subset"),
                             test=spread(val, d.test_subset),
                             num_classes=splits.vocab_size, image_size=d.context)

    def model(self, data: DatasetBundle) -> nn.Module:
        from localsgd.models.gpt import GPT, GPT_SIZES

        m = self.model_cfg
        shape = GPT_SIZES[ModelName(m.name).value]
        return GPT(vocab_size=data.num_classes, context=self.data_cfg.context,
                   width=shape.width, depth=shape.depth, heads=shape.heads,
                   positions=Positions(m.positions).value, tie_embeddings=m.tie_embeddings,
                   dropout=m.dropout)

    def loss_fn(self) -> nn.Module:
        return TokenCrossEntropy()

    def units_per_sample(self) -> int:
        return int(self.data_cfg.context)

    def progress(self, samples: int) -> dict[str, int]:
        return {"samples": samples, "tokens": samples * self.units_per_sample()}

    def throughput(self, units: float, seconds: float) -> dict[str, float]:
        return {**super().throughput(units, seconds),
                "throughput/tokens_per_s": units / max(seconds, 1e-9)}

    def metrics(self, prefix: str, loss_sum: float, correct: float, count: float
                ) -> dict[str, float]:
        return cross_entropy_metrics(prefix, loss_sum, correct, count)


def spread(dataset: Dataset, n: int | None) -> Dataset:
    """``n`` windows evenly spaced over ``dataset`` (all of it when n is None or larger):
    a validation subset that samples every held-out document, not only the first."""
    total = len(dataset)  # type: ignore[arg-type]
    if n is None or n >= total:
        return dataset
    return Subset(dataset, [i * total // n for i in range(n)])


def _inside(path: Path, root: Path) -> bool:
    try:
        path.expanduser().resolve().relative_to(root.expanduser().resolve())
    except ValueError:
        return False
    return True
