"""Rules between keys of the general sections, each problem with its full key.

Each key's own range is its domain (``localsgd.config.domains``), declared in the schema
and checked for every section by ``localsgd.config.domain_check``. The ``sync`` and
``engine`` sections' rules are their chosen parts' checks.
"""

from __future__ import annotations

from typing import Any

from localsgd.config.schema import (
    Backend,
    DataPipeline,
    DatasetName,
    Device,
    DType,
    LRDecay,
    Precision,
)
from localsgd.registry import need as needs


def compile_backends() -> list[str]:
    """The backends torch.compile knows here (importing them costs a second or two, so only
    recipes with train.compile ask)."""
    import torch

    return list(torch.compiler.list_backends(exclude_tags=()))


def general_rules(cfg: Any) -> list[str]:
    """Every violated rule between keys of the model, data, optim, lr_schedule, train, dist
    and run sections (each key's own range is its domain, declared in the schema)."""
    p: list[str] = []
    d, o, s, t = cfg.data, cfg.optim, cfg.lr_schedule, cfg.train
    need = needs(p)

    need(d.pipeline == DataPipeline.torchvision or d.name in (DatasetName.cifar10,
                                                              DatasetName.cifar100),
         f"data.pipeline: device holds CIFAR-10/100 on the device, not data.name="
         f"{d.name.value}; use data.pipeline=torchvision")
    need(cfg.model.precision == Precision.fp32 or cfg.model.dtype == DType.float32,
         f"model.precision: {cfg.model.precision.value} mixed precision keeps float32 weights "
         f"(its masters), not {cfg.model.dtype.value}; set model.dtype=float32 or "
         "model.precision=fp32")
    need(not o.nesterov or o.momentum > 0,
         "optim.nesterov: Nesterov needs optim.momentum > 0; set optim.nesterov=false")
    if t.compile:
        need(t.compile_backend in compile_backends(),
             f"train.compile_backend: torch.compile has no backend '{t.compile_backend}'; "
             "use inductor, aot_eager or eager (torch.compiler.list_backends(exclude_tags=()) "
             "lists every one)")

    need(s.warmup_epochs < t.epochs or s.warmup_epochs == 0,
         f"lr_schedule.warmup_epochs: must be in [0, train.epochs={t.epochs}), "
         f"got {s.warmup_epochs}")
    if s.milestones:
        need(s.decay == LRDecay.multistep,
             f"lr_schedule.milestones: only used by decay=multistep (decay is {s.decay.value}); "
             "remove them or set lr_schedule.decay=multistep")
        need(all(m <= t.epochs for m in s.milestones),
             f"lr_schedule.milestones: each must be in (0, train.epochs={t.epochs}], "
             f"got {list(s.milestones)}")

    need(not (cfg.dist.backend == Backend.nccl and cfg.dist.device == Device.cpu),
         "dist.backend: nccl needs CUDA devices; use dist.backend=gloo with dist.device=cpu")
    need(s.total_steps is None or s.warmup_steps < s.total_steps,
         f"lr_schedule.warmup_steps: must be below lr_schedule.total_steps={s.total_steps}, "
         f"got {s.warmup_steps}")
    return p
