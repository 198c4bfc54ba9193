"""What every engine provides to the trainer and to the sync controller."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class PhaseTimer(Protocol):
    def phase(self, name: str) -> Any: ...


class Engine(Protocol):
    module: nn.Module
    """The bare model (no wrapper prefixes in its state_dict)."""
    optimizer: torch.optim.Optimizer

    def train(self, mode: bool = True) -> None: ...

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                         scale: float, grad_sync: bool,
                         timer: PhaseTimer) -> tuple[torch.Tensor, torch.Tensor]: ...

    def optimizer_step(self) -> None: ...

    def sync_params(self) -> list[torch.Tensor]: ...

    def sync_buffers(self) -> list[torch.Tensor]: ...

    def momentum_buffers(self) -> list[torch.Tensor]: ...

    def after_params_changed(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def momentum_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """SGD's momentum buffers, in parameter order (absent before the first step)."""
    out: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out.append(buf)
    return out
