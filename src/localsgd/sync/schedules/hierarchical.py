"""Hierarchical local SGD: average inside a node every H steps, across nodes every H * H_b.

Nodes are runs of LOCAL_WORLD_SIZE consecutive ranks (torchrun --nproc-per-node). An
optional switch point starts it after a mini-batch phase, as for post-local SGD.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from localsgd.config.domains import AT_LEAST_ONE, domain
from localsgd.registry import Facts
from localsgd.sync.capabilities import NODE_GROUPS, RULED_PERIOD
from localsgd.sync.parts import SCHEDULES
from localsgd.sync.schedules.base import (
    GLOBAL,
    MINIBATCH,
    NODE,
    Schedule,
    check_switch,
    switch_step,
)
from localsgd.sync.schedules.post_local import PostLocalKeys


@dataclass
class HierarchicalKeys(PostLocalKeys):
    block_period: int = domain(AT_LEAST_ONE, 1)
    """H_b (hierarchical only): a global average every period * block_period steps."""


@SCHEDULES.register
@dataclass(frozen=True)
class Hierarchical(Schedule):
    name = "hierarchical"
    shards = True
    """Runs across replica groups: a node's groups average each shard over the node's
    ranks that hold it (``GroupInfo.node_group``; ``sync/sharding.py``)."""
    Config = HierarchicalKeys
    scopes = (NODE, GLOBAL)
    block_period: int = 1

    @classmethod
    def needs(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({NODE_GROUPS})

    @classmethod
    def from_config(cls, cfg: Any, steps_per_epoch: int) -> Schedule:
        return cls(switch_step=switch_step(cfg, steps_per_epoch), period=cfg.period,
                   block_period=cfg.block_period)

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        p = check_switch(cfg, facts, False, cls.name)
        world, local = facts.world_size, facts.local_world_size
        if world is not None and local is not None:
            if world % local != 0:
                p.append(f"sync.algorithm: hierarchical needs every node to run the same "
                         f"number of workers; world size {world} is not a multiple of "
                         f"LOCAL_WORLD_SIZE {local} (torchrun --nproc-per-node)")
            elif world // local < 2:
                p.append("sync.algorithm: hierarchical needs at least 2 nodes (torchrun "
                         "--nnodes>=2); on one node use sync.algorithm=local")
        return p

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        # The rule sets the global period; node averages every sync.period steps within it.
        return super().provides(cfg, facts) | {RULED_PERIOD}

    def with_rule(self, rule: Any) -> Schedule:
        """The rule sets the period between global averages (at least period *
        block_period); node averages fall every ``period`` steps after each global one."""
        if self.switch_step is not None:
            rule.bind(self.switch_step, self.period * self.block_period)
        return dataclasses.replace(self, rule=rule)

    def action_after(self, steps_done: int) -> str | None:
        if self.switch_step is None or steps_done <= self.switch_step:
            return None
        if self.rule is not None:
            if self.rule.is_sync(steps_done):
                return GLOBAL
            since = steps_done - self.rule.last_end(steps_done)
            return NODE if since % self.period == 0 else None
        k = steps_done - self.switch_step
        if k % (self.period * self.block_period) == 0:
            return GLOBAL
        return NODE if k % self.period == 0 else None

    def effective_period(self, step: int) -> int:
        if self.phase(step) == MINIBATCH:
            return 1
        return self.rule.period_of(step) if self.rule is not None else (
            self.period * self.block_period)
