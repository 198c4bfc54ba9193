"""Mini-batch SGD: gradients are all-reduced every step, so models never need averaging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localsgd.sync.parts import SCHEDULES
from localsgd.sync.schedules.base import Schedule


@SCHEDULES.register
@dataclass(frozen=True)
class MiniBatch(Schedule):
    name = "minibatch"
    shards = True
    """Runs across replica groups on each rank's own shard (``sync/sharding.py``)."""

    @classmethod
    def from_config(cls, cfg: Any, steps_per_epoch: int) -> Schedule:
        return cls(switch_step=None)

    @classmethod
    def has_local_steps(cls, cfg: Any) -> bool:
        return False
