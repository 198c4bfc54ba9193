"""What the engines share inside a replica group (``sync.replica_group`` > 1).

Each rank of a group computes BatchNorm statistics on its own batch, as DDP ranks do, and
the sync averages them across groups rank by rank. What is evaluated and saved takes the
mean over the group's ranks too, so that it holds the mean of every rank's statistics, as
an unsharded run's consensus does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from localsgd.sync.accounting import CommMeter


def group_mean(tensors: list[torch.Tensor], replicas: Any, meter: CommMeter,
               kind: str, inplace: bool) -> list[torch.Tensor]:
    """The floating ``tensors`` averaged over the group's ranks (in place, or copies)."""
    out = []
    for t in tensors:
        t = t.detach() if inplace else t.detach().clone()
        if t.is_floating_point() and replicas.size > 1:
            with meter.timed(kind, t.numel() * t.element_size()):
                dist.all_reduce(t, group=replicas.within)
            t.div_(replicas.size)
        out.append(t)
    return out


class EvalTarget:
    """The averaged evaluation copy's source on a rank of a replica group: ``params`` (what
    lines up with the copy's parameters) and the module's buffers averaged over the group."""

    def __init__(self, params: list[torch.Tensor], buffers: list[torch.Tensor],
                 replicas: Any, meter: CommMeter) -> None:
        self.params, self.buffers = params, buffers
        self.replicas, self.meter = replicas, meter

    def sync_params(self) -> list[torch.Tensor]:
        return self.params

    def sync_buffers(self) -> list[torch.Tensor]:
        return group_mean(self.buffers, self.replicas, self.meter, "eval", inplace=False)


def saved_buffers(module: torch.nn.Module, replicas: Any, meter: CommMeter) -> None:
    """Average the module's buffers over the group in place, before the model is saved
    (the end of training: nothing reads the rank's own statistics afterwards)."""
    group_mean(list(module.buffers()), replicas, meter, "other", inplace=True)
