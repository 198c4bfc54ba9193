"""Range and cross-field rules of the general sections, each problem with its full key.

The ``sync`` and ``engine`` sections are checked by their chosen parts instead.
"""

from __future__ import annotations

from typing import Any

from localsgd.config.schema import (
    MIN_IMAGE_SIZE,
    MIN_SYNTHETIC_CLASSES,
    MIN_SYNTHETIC_SAMPLES,
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
    """Every violated rule of the model, data, optim, lr_schedule, train, dist and run keys."""
    p: list[str] = []
    d, o, s, t = cfg.data, cfg.optim, cfg.lr_schedule, cfg.train
    need = needs(p)

    need(d.batch_size >= 1, f"data.batch_size: must be >= 1, got {d.batch_size}")
    need(d.pipeline == DataPipeline.torchvision or d.name in (DatasetName.cifar10,
                                                              DatasetName.cifar100),
         f"data.pipeline: device holds CIFAR-10/100 on the device, not data.name="
         f"{d.name.value}; use data.pipeline=torchvision")
    need(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")
    for key in ("train_subset", "test_subset"):
        value = getattr(d, key)
        need(value is None or value >= 1, f"data.{key}: must be >= 1 or null, got {value}")
    for key, least in (("image_size", MIN_IMAGE_SIZE),
                       ("synthetic_samples", MIN_SYNTHETIC_SAMPLES),
                       ("synthetic_classes", MIN_SYNTHETIC_CLASSES)):
        value = getattr(d, key)
        need(value >= least, f"data.{key}: must be >= {least}, got {value}")

    need(cfg.model.precision == Precision.fp32 or cfg.model.dtype == DType.float32,
         f"model.precision: {cfg.model.precision.value} mixed precision keeps float32 weights "
         f"(its masters), not {cfg.model.dtype.value}; set model.dtype=float32 or "
         "model.precision=fp32")
    need(o.base_lr > 0, f"optim.base_lr: must be > 0, got {o.base_lr}")
    need(o.base_batch_size >= 1, f"optim.base_batch_size: must be >= 1, got {o.base_batch_size}")
    need(0 <= o.momentum < 1, f"optim.momentum: must be in [0, 1), got {o.momentum}")
    need(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    need(not o.nesterov or o.momentum > 0,
         "optim.nesterov: Nesterov needs optim.momentum > 0; set optim.nesterov=false")

    need(t.epochs >= 1, f"train.epochs: must be >= 1, got {t.epochs}")
    need(t.grad_accum >= 1, f"train.grad_accum: must be >= 1, got {t.grad_accum}")
    need(t.max_steps is None or t.max_steps >= 1,
         f"train.max_steps: must be >= 1 or null, got {t.max_steps}")
    need(t.log_every_steps >= 1, f"train.log_every_steps: must be >= 1, got {t.log_every_steps}")
    need(t.eval_every_epochs >= 1,
         f"train.eval_every_epochs: must be >= 1, got {t.eval_every_epochs}")
    need(t.target_acc is None or 0 < t.target_acc <= 1,
         f"train.target_acc: must be in (0, 1] (a fraction, not a percentage), got {t.target_acc}")
    if t.compile:
        need(t.compile_backend in compile_backends(),
             f"train.compile_backend: torch.compile has no backend '{t.compile_backend}'; "
             "use inductor, aot_eager or eager (torch.compiler.list_backends(exclude_tags=()) "
             "lists every one)")

    need(0 <= s.warmup_epochs < t.epochs or s.warmup_epochs == 0,
         f"lr_schedule.warmup_epochs: must be in [0, train.epochs={t.epochs}), "
         f"got {s.warmup_epochs}")
    need(0 < s.gamma <= 1, f"lr_schedule.gamma: must be in (0, 1], got {s.gamma}")
    if s.milestones:
        need(s.decay == LRDecay.multistep,
             f"lr_schedule.milestones: only used by decay=multistep (decay is {s.decay.value}); "
             "remove them or set lr_schedule.decay=multistep")
        need(list(s.milestones) == sorted(set(s.milestones)),
             f"lr_schedule.milestones: must be strictly increasing, got {list(s.milestones)}")
        need(all(0 < m <= t.epochs for m in s.milestones),
             f"lr_schedule.milestones: each must be in (0, train.epochs={t.epochs}], "
             f"got {list(s.milestones)}")

    need(not (cfg.dist.backend == Backend.nccl and cfg.dist.device == Device.cpu),
         "dist.backend: nccl needs CUDA devices; use dist.backend=gloo with dist.device=cpu")
    need(cfg.dist.timeout_s > 0, f"dist.timeout_s: must be > 0, got {cfg.dist.timeout_s}")
    need(cfg.run.checkpoint_every_epochs >= 0,
         f"run.checkpoint_every_epochs: must be >= 0, got {cfg.run.checkpoint_every_epochs}")
    need(cfg.run.checkpoint_every_steps >= 0,
         f"run.checkpoint_every_steps: must be >= 0, got {cfg.run.checkpoint_every_steps}")
    need(cfg.run.keep_checkpoints >= 1,
         f"run.keep_checkpoints: must be >= 1, got {cfg.run.keep_checkpoints}")
    # The language-model and optimization fields (task-specific ones: localsgd.tasks.*).
    need(o.grad_clip >= 0, f"optim.grad_clip: must be >= 0 (0: off), got {o.grad_clip}")
    need(s.warmup_steps >= 0, f"lr_schedule.warmup_steps: must be >= 0, got {s.warmup_steps}")
    need(s.warmup_start is None or 0 < s.warmup_start <= 1,
         f"lr_schedule.warmup_start: must be in (0, 1] or null, got {s.warmup_start}")
    need(0 <= s.min_lr_ratio <= 1,
         f"lr_schedule.min_lr_ratio: must be in [0, 1], got {s.min_lr_ratio}")
    need(s.total_steps is None or s.total_steps >= 1,
         f"lr_schedule.total_steps: must be >= 1 or null, got {s.total_steps}")
    need(s.total_steps is None or s.warmup_steps < s.total_steps,
         f"lr_schedule.warmup_steps: must be below lr_schedule.total_steps={s.total_steps}, "
         f"got {s.warmup_steps}")
    need(t.eval_every_steps >= 0,
         f"train.eval_every_steps: must be >= 0 (0: epoch ends only), got {t.eval_every_steps}")
    return p
