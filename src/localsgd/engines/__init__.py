"""Engines carry out forward/backward/step and expose tensors to the sync controller."""

from __future__ import annotations

import torch
from torch import nn

from localsgd.config.schema import EngineConfig, EngineName, SyncConfig
from localsgd.dist.env import DistInfo
from localsgd.engines.base import Engine
from localsgd.sync.accounting import CommMeter


def build_engine(cfg: EngineConfig, sync: SyncConfig, module: nn.Module,
                 optimizer: torch.optim.Optimizer, info: DistInfo, meter: CommMeter,
                 micro_batch: int, grad_accum: int) -> Engine:
    if cfg.name == EngineName.deepspeed:
        from localsgd.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, sync, module, optimizer, info, meter, micro_batch,
                               grad_accum)
    from localsgd.engines.ddp import DDPEngine

    return DDPEngine(module, optimizer, info, meter)


__all__ = ["Engine", "build_engine"]
