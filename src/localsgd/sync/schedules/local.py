"""Local SGD: no gradient communication; the models are averaged every ``period`` steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localsgd.config.domains import AT_LEAST_ONE, domain
from localsgd.registry import Facts
from localsgd.sync.capabilities import RULED_PERIOD
from localsgd.sync.parts import SCHEDULES
from localsgd.sync.schedules.base import Schedule


@dataclass
class PeriodKeys:
    period: int = domain(AT_LEAST_ONE, 1)
    """H: local steps between two model averages (intra-node ones for hierarchical)."""


@SCHEDULES.register
@dataclass(frozen=True)
class Local(Schedule):
    name = "local"
    shards = True
    """Runs across replica groups on each rank's own shard (``sync/sharding.py``)."""
    Config = PeriodKeys

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return super().provides(cfg, facts) | {RULED_PERIOD}

    @classmethod
    def from_config(cls, cfg: Any, steps_per_epoch: int) -> Schedule:
        return cls(switch_step=0, period=cfg.period)
