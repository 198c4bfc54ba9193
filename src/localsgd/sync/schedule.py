"""When to communicate: pure functions of the one optimizer-step counter.

``step`` is the number of optimizer steps completed so far; it is also the index of the step
about to run. Nothing here touches processes, so the schedule is unit-tested directly and the
accounting tests predict collective counts from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from localsgd.config.schema import Algorithm, SyncConfig


class Action(str, Enum):
    none = "none"
    intra = "intra"
    global_ = "global"


class Phase(str, Enum):
    minibatch = "minibatch"
    local = "local"


@dataclass(frozen=True)
class SyncSchedule:
    algorithm: Algorithm
    period: int
    block_period: int
    switch_step: int | None
    """First step index that runs locally; None means never (mini-batch SGD)."""

    @classmethod
    def from_config(cls, cfg: SyncConfig, steps_per_epoch: int) -> SyncSchedule:
        if cfg.algorithm == Algorithm.minibatch:
            switch: int | None = None
        elif cfg.switch_step is not None:
            switch = cfg.switch_step
        elif cfg.switch_epoch is not None:
            switch = round(cfg.switch_epoch * steps_per_epoch)
        else:
            switch = 0
        return cls(cfg.algorithm, cfg.period, cfg.block_period, switch)

    def phase(self, step: int) -> Phase:
        if self.switch_step is None or step < self.switch_step:
            return Phase.minibatch
        return Phase.local

    def grad_sync(self, step: int) -> bool:
        """Whether the gradients of step ``step`` are all-reduced."""
        return self.phase(step) == Phase.minibatch

    def action_after(self, steps_done: int) -> Action:
        """The model average due once ``steps_done`` optimizer steps have completed."""
        if self.switch_step is None or steps_done <= self.switch_step:
            return Action.none
        k = steps_done - self.switch_step
        if self.algorithm == Algorithm.hierarchical:
            if k % (self.period * self.block_period) == 0:
                return Action.global_
            return Action.intra if k % self.period == 0 else Action.none
        return Action.global_ if k % self.period == 0 else Action.none

    def in_consensus(self, steps_done: int) -> bool:
        """Whether all workers hold identical parameters after ``steps_done`` steps."""
        if steps_done == 0 or self.phase(steps_done - 1) == Phase.minibatch:
            return True
        return self.action_after(steps_done) == Action.global_

    def effective_period(self, step: int) -> int:
        """Steps between global averages at ``step`` (1 while gradients are all-reduced)."""
        if self.phase(step) == Phase.minibatch:
            return 1
        if self.algorithm == Algorithm.hierarchical:
            return self.period * self.block_period
        return self.period
