"""Every local period is ``sync.period`` steps (the paper's rule)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from localsgd.registry import Facts, Part
from localsgd.sync.capabilities import FIXED_PERIOD
from localsgd.sync.parts import PERIOD_RULES


@PERIOD_RULES.register
class Fixed(Part):
    name = "fixed"
    shards = True
    """Runs across replica groups on each rank's own shard (``sync/sharding.py``)."""

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({FIXED_PERIOD})

    def __init__(self, cfg: Any, lr_at: Callable[[int], float] | None = None) -> None:
        self.start = 0
        self.base = 1

    def bind(self, start: int, base: int) -> None:
        """Periods begin at step ``start`` (the first local step); ``base`` is sync.period."""
        self.start, self.base = start, base

    def is_sync(self, steps_done: int) -> bool:
        """Whether a period ends once ``steps_done`` steps have completed."""
        return steps_done > self.start and (steps_done - self.start) % self.base == 0

    def last_end(self, steps_done: int) -> int:
        """The end of the last period before ``steps_done`` (the start of the current one)."""
        return self.start + max(0, (steps_done - 1 - self.start) // self.base) * self.base

    def period_of(self, step: int) -> int:
        """Length of the period that step index ``step`` belongs to."""
        return self.base
