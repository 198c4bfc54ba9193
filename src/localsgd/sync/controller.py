"""Carries out the schedule's decisions on whatever engine holds the model.

The controller owns the one step counter. Engines expose the tensors to average through
``SyncTarget``; the controller decides when, over which group, and what happens to momentum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from localsgd.config.schema import MomentumPolicy, SyncConfig
from localsgd.dist.env import DistInfo, node_groups
from localsgd.sync.accounting import CommMeter
from localsgd.sync.averager import BucketAverager
from localsgd.sync.schedule import Action, SyncSchedule


class SyncTarget(Protocol):
    """What an engine shows the controller."""

    def sync_params(self) -> list[torch.Tensor]:
        """Tensors that define the model: for mixed precision, the fp32 master copy."""
        ...

    def sync_buffers(self) -> list[torch.Tensor]:
        """Module buffers (BatchNorm running statistics)."""
        ...

    def momentum_buffers(self) -> list[torch.Tensor]:
        """Optimizer momentum tensors."""
        ...

    def after_params_changed(self) -> None:
        """Called after params were overwritten (engines with low-precision copies refresh)."""
        ...


@dataclass
class SyncEvent:
    step: int
    action: str
    distance: float
    """This worker's ||theta_i - theta_avg|| just before the average."""


@dataclass
class SyncController:
    cfg: SyncConfig
    schedule: SyncSchedule
    info: DistInfo
    meter: CommMeter
    step: int = 0
    """Optimizer steps completed: the only counter; saved in checkpoints."""
    events: list[SyncEvent] = field(default_factory=list)
    averager: BucketAverager = field(init=False)
    node_group: dist.ProcessGroup | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.averager = BucketAverager(self.meter, self.cfg.bucket_mb)
        if self.schedule.algorithm.value == "hierarchical":
            self.node_group, _ = node_groups(self.info)

    def grad_sync(self) -> bool:
        return self.schedule.grad_sync(self.step)

    def _group(self, action: Action) -> tuple[dist.ProcessGroup | None, int]:
        if action == Action.intra:
            return self.node_group, self.info.local_world_size
        return None, self.info.world_size

    def _average(self, target: SyncTarget, action: Action, final: bool = False) -> float:
        params = target.sync_params()
        tensors = list(params)
        if self.cfg.average_buffers or final:
            tensors += target.sync_buffers()
        if self.cfg.momentum == MomentumPolicy.average:
            tensors += target.momentum_buffers()
        group, size = self._group(action)
        distance = self.averager.average(tensors, group, size, measured=len(params))
        if self.cfg.momentum == MomentumPolicy.reset:
            for m in target.momentum_buffers():
                m.zero_()
        target.after_params_changed()
        return distance

    def after_step(self, target: SyncTarget) -> Action:
        """Count the optimizer step just taken and average if the schedule says so."""
        self.step += 1
        action = self.schedule.action_after(self.step)
        if action != Action.none and self.info.world_size > 1:
            distance = self._average(target, action)
            self.events.append(SyncEvent(self.step, action.value, distance))
        return action

    def finish(self, target: SyncTarget) -> None:
        """Final global average, buffers included, so the saved model is the consensus."""
        if self.info.world_size == 1:
            return
        if self.schedule.in_consensus(self.step):
            # Parameters already agree; BatchNorm statistics never do under mini-batch SGD.
            self.averager.average(target.sync_buffers(), None, self.info.world_size)
            return
        distance = self._average(target, Action.global_, final=True)
        self.events.append(SyncEvent(self.step, "final", distance))

    def averaged_copy(self, target: SyncTarget, out: nn.Module) -> None:
        """Write the average of all workers' models into ``out``; the workers are untouched."""
        src_params = target.sync_params()
        dst_params = [p for p in out.parameters()]
        src_buffers = target.sync_buffers()
        dst_buffers = [b for b in out.buffers()]
        with torch.no_grad():
            if self.schedule.in_consensus(self.step):
                for s, d in zip(src_params, dst_params, strict=True):
                    d.copy_(s)
                src, dst = src_buffers, dst_buffers
            else:
                src, dst = src_params + src_buffers, dst_params + dst_buffers
            if self.info.world_size > 1:
                self.averager.average(src, None, self.info.world_size, kind="eval", out=dst)
            else:
                for s, d in zip(src, dst, strict=True):
                    d.copy_(s)

    def pop_events(self) -> list[SyncEvent]:
        events, self.events = self.events, []
        return events

    def state_dict(self) -> dict[str, Any]:
        # Pending events belong to the epoch in progress; a mid-epoch resume must log them.
        return {"step": self.step,
                "events": [[e.step, e.action, e.distance] for e in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.events = [SyncEvent(int(s), str(a), float(d)) for s, a, d in state["events"]]
