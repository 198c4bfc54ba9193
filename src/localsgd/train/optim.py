"""SGD or AdamW with the paper's parameter groups, and the LR schedule from
torch.optim.lr_scheduler."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)

from localsgd.config.schema import LRDecay, LRScheduleConfig, OptimConfig, OptimName


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule: base_lr per base_batch_size samples."""
    return cfg.base_lr * global_batch / cfg.base_batch_size


def build_optimizer(cfg: OptimConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} \
        if getattr(cfg, "no_decay_embeddings", True) else set()
    for p in model.parameters():
        # BatchNorm/LayerNorm weights and all biases are 1-D; the paper applies no weight
        # decay to them. Embedding rows are looked up, not multiplied: decay only shrinks them.
        exempt = (cfg.no_decay_bn_bias and p.ndim <= 1) or id(p) in embeddings
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if OptimName(cfg.name) == OptimName.adamw:
        beta1, beta2 = cfg.betas
        return torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=cfg.eps)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def build_scheduler(cfg: LRScheduleConfig, optimizer: torch.optim.Optimizer, base_lr: float,
                    peak_lr: float, steps_per_epoch: int, epochs: int) -> LRScheduler:
    """Stepped once per optimizer step; warmup goes linearly from base_lr (or
    ``warmup_start`` x peak_lr) to peak_lr, over warmup_steps or warmup_epochs."""
    warmup_steps = getattr(cfg, "warmup_steps", 0)
    warm = warmup_steps if warmup_steps > 0 else round(cfg.warmup_epochs * steps_per_epoch)
    total = getattr(cfg, "total_steps", None) or epochs * steps_per_epoch
    if cfg.decay == LRDecay.multistep:
        after: LRScheduler = MultiStepLR(
            optimizer, [m * steps_per_epoch - warm for m in cfg.milestones], gamma=cfg.gamma)
    elif cfg.decay == LRDecay.cosine:
        after = CosineAnnealingLR(optimizer, T_max=max(1, total - warm),
                                  eta_min=peak_lr * getattr(cfg, "min_lr_ratio", 0.0))
    else:
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warm == 0:
        return after
    given = getattr(cfg, "warmup_start", None)
    start = min(1.0, base_lr / peak_lr) if given is None else float(given)
    warmup = LinearLR(optimizer, start_factor=start, end_factor=1.0, total_iters=warm)
    return SequentialLR(optimizer, [warmup, after], milestones=[warm])


class LRCurve:
    """The learning rate of every step index, as a pure function: ``curve(step)``.

    The same scheduler classes run on a throwaway one-parameter optimizer, one step per
    index, so the values are the ones the trainer's optimizer sees, bit for bit. Steps are
    computed on first use and kept.
    """

    def __init__(self, cfg: LRScheduleConfig, base_lr: float, peak_lr: float,
                 steps_per_epoch: int, epochs: int) -> None:
        self._opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak_lr)
        self._sched = build_scheduler(cfg, self._opt, base_lr, peak_lr, steps_per_epoch, epochs)
        self._values = [self._opt.param_groups[0]["lr"]]

    def __call__(self, step: int) -> float:
        if step >= len(self._values):  # a step seen before costs no warnings filter
            with warnings.catch_warnings():
                # No optimizer step is taken here; the scheduler's order warning does not
                # apply.
                warnings.simplefilter("ignore", UserWarning)
                while len(self._values) <= step:
                    self._sched.step()
                    self._values.append(self._opt.param_groups[0]["lr"])
        return float(self._values[step])
