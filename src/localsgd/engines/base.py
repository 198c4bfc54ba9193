"""What every engine provides to the trainer and to the sync controller."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from localsgd.registry import Part


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

    def momentum_decays(self) -> list[float | None]: ...

    def after_params_changed(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def merge_sources(self, states: list[dict[str, Any]]) -> list[dict[str, Any]]: ...


class EnginePart(Part):
    """Base of the registered engines."""

    @classmethod
    def merge_states(cls, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The element-wise mean of the old workers' models and optimizer states, for a run
        resumed with another world size (an engine whose state cannot be merged refuses it
        in ``load_state_dict``)."""
        return average_states(states)

    def merge_sources(self, states: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Of the old ranks' checkpoint states (in rank order), the ones this rank merges on
        a resume with another world size: all of them, unless the engine holds shards."""
        return states


MOMENT_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")
"""Optimizer state that ``sync.momentum`` governs: SGD's momentum, Adam(W)'s first and
second moments. Adam's step counts stay local (every worker has taken as many steps)."""


class HeldTensors:
    """The tensor lists an engine hands the sync, listed once instead of at every sync
    (walking the module's generators is most of a small model's host time per sync).

    Parameters and buffers are listed at the first ask: by then the engine has set them up,
    and their storage stays put (the sync and checkpoint loads write into it). Momentum is
    kept once every updated tensor has its optimizer state (it appears at the first step and
    is then updated in place). ``forget_tensors`` drops all three: an engine calls it wherever
    the tensors themselves can be replaced (a checkpoint's optimizer state is new tensors).
    """

    optimizer: torch.optim.Optimizer
    _held_params: list[torch.Tensor] | None = None
    _held_buffers: list[torch.Tensor] | None = None
    _held_moments: list[torch.Tensor] | None = None

    def list_params(self) -> list[torch.Tensor]:
        """What ``sync_params`` hands over, listed afresh."""
        raise NotImplementedError

    def list_buffers(self) -> list[torch.Tensor]:
        """What ``sync_buffers`` hands over, listed afresh."""
        raise NotImplementedError

    def sync_params(self) -> list[torch.Tensor]:
        held = self._held_params
        if held is None:
            held = self._held_params = self.list_params()
        return held

    def sync_buffers(self) -> list[torch.Tensor]:
        held = self._held_buffers
        if held is None:
            held = self._held_buffers = self.list_buffers()
        return held

    def momentum_buffers(self) -> list[torch.Tensor]:
        held = self._held_moments
        if held is not None:
            return held
        moments = momentum_tensors(self.optimizer)
        if len(self.optimizer.state) == sum(len(g["params"])
                                            for g in self.optimizer.param_groups):
            self._held_moments = moments
        return moments

    def forget_tensors(self) -> None:
        """The next sync lists its tensors afresh."""
        self._held_params = self._held_buffers = self._held_moments = None


def momentum_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The momentum tensors (see ``MOMENT_KEYS``), in parameter order, then key order
    (absent before the first step)."""
    out: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            out += [state[k] for k in MOMENT_KEYS if k in state]
    return out


def momentum_decays(optimizer: torch.optim.Optimizer) -> list[float | None]:
    """For each tensor of ``momentum_tensors``: the factor one optimizer step scales it by
    when it is an exponential moving average (Adam's beta1 for ``exp_avg``, beta2 for
    ``exp_avg_sq``), None for SGD's momentum buffer."""
    out: list[float | None] = []
    for group in optimizer.param_groups:
        betas = group.get("betas", (None, None))
        decay = {"momentum_buffer": None, "exp_avg": betas[0], "exp_avg_sq": betas[1]}
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            out += [None if decay[k] is None else float(decay[k]) for k in MOMENT_KEYS
                    if k in state]
    return out


def average_states(states: list[Any]) -> Any:
    """Element-wise mean of floating tensors at matching places in nested checkpoint states;
    everything else is taken from the first (rank 0's) state."""
    first = states[0]
    if isinstance(first, dict):
        return {k: average_states([s[k] for s in states]) for k in first}
    if isinstance(first, list | tuple) and all(len(s) == len(first) for s in states):
        merged = [average_states([s[i] for s in states]) for i in range(len(first))]
        return type(first)(merged) if isinstance(first, tuple) else merged
    if isinstance(first, torch.Tensor) and first.is_floating_point():
        return torch.stack([s.to(torch.float64) for s in states]).mean(0).to(first.dtype)
    return first
