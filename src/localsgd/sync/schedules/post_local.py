"""Post-local SGD: mini-batch SGD until the switch point, then local SGD with period H."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localsgd.registry import Facts
from localsgd.sync.capabilities import RULED_PERIOD
from localsgd.sync.parts import SCHEDULES
from localsgd.sync.schedules.base import (
    Schedule,
    SwitchKeys,
    check_switch,
    switch_step,
)
from localsgd.sync.schedules.local import PeriodKeys


@dataclass
class PostLocalKeys(SwitchKeys, PeriodKeys):
    pass


@SCHEDULES.register
@dataclass(frozen=True)
class PostLocal(Schedule):
    name = "post_local"
    shards = True
    """Runs across replica groups on each rank's own shard (``sync/sharding.py``)."""
    Config = PostLocalKeys

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return super().provides(cfg, facts) | {RULED_PERIOD}

    @classmethod
    def from_config(cls, cfg: Any, steps_per_epoch: int) -> Schedule:
        return cls(switch_step=switch_step(cfg, steps_per_epoch), period=cfg.period)

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        return check_switch(cfg, facts, True, cls.name)
