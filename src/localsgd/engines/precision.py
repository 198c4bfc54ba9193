"""Mixed precision shared by the engines: autocast and loss scaling for DDP, and BatchNorm
kept in float32 when DeepSpeed casts a model's weights to bf16.

What stays float32 in every case: the weights the optimizer updates (DDP's parameters,
DeepSpeed's masters), so model averages and the consensus distance are fp32; BatchNorm's
running statistics, which are averaged as buffers; and evaluation, which runs without
autocast.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _batch_norm_fp32(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``_BatchNorm.forward`` computed in float32 on a low-precision input and weights.

    DeepSpeed casts parameters to bf16 and leaves buffers in fp32; a CPU batch norm refuses
    that mix, and fp32 statistics are what the averages should see anyway.
    """
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    out = F.batch_norm(
        x.float(), bn.running_mean if keep else None, bn.running_var if keep else None,
        None if bn.weight is None else bn.weight.float(),
        None if bn.bias is None else bn.bias.float(), batch_stats, factor, bn.eps)
    return out.to(x.dtype)


def batch_norm_in_fp32(module: nn.Module) -> int:
    """Make every BatchNorm layer of ``module`` compute in float32; returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.forward = functools.partial(_batch_norm_fp32, m)  # type: ignore[method-assign]
            count += 1
    return count


def _grad_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


class Autocast:
    """``torch.autocast`` for forward, and for fp16 a per-worker ``GradScaler``.

    A step the scaler skips (inf or nan in the gradients) is still a step: the trainer
    counts ``optimizer_step`` calls, so every worker's sync counter advances together and the
    averages stay aligned. Under mini-batch SGD the all-reduced gradients are the same on
    every worker, so all of them skip together; under local SGD a worker that skips keeps
    its weights for that step and is pulled back in at the next average.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.dtype = DTYPES.get(precision)
        self.device_type = device.type
        self.scaler = (torch.amp.GradScaler(device.type) if precision == "fp16" else None)

    def forward(self) -> AbstractContextManager[object]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, clip: float = 0.0) -> None:
        """One optimizer step; with ``clip`` > 0 the (unscaled) gradient is first clipped
        to that global L2 norm over the optimizer's parameters."""
        if self.scaler is None:
            if clip > 0:
                nn.utils.clip_grad_norm_(_grad_params(optimizer), clip)
            optimizer.step()
            return
        if clip > 0:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(_grad_params(optimizer), clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, object]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
