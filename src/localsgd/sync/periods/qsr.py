"""The Quadratic Synchronization Rule (Gu, Lyu, Arora, Zhang, Huang, ICLR 2024).

A period that starts at step s lasts H(s) = max(H_base, floor((alpha / lr(s))^2)) steps,
where lr(s) is the learning rate of step s and H_base is ``sync.period``: few local steps
while the learning rate is large, many once it has decayed (the post-local intuition as a
schedule). The period ends are a pure function of the LR schedule, computed forward from
the first local step and cached; a checkpoint stores the ends reached so far, and a resume
whose LR schedule or alpha would give different ones is refused.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localsgd.config.domains import POSITIVE, domain
from localsgd.config.errors import ConfigError
from localsgd.registry import Facts, need
from localsgd.sync.capabilities import RULED_PERIOD
from localsgd.sync.parts import PERIOD_RULES
from localsgd.sync.periods.fixed import Fixed

UNBOUNDED = 2**62
"""Period once the learning rate reaches 0: no more syncs but the final one."""


@dataclass
class QSRKeys:
    qsr_alpha: float | None = domain(POSITIVE, None)
    """alpha of the Quadratic Synchronization Rule (sync.period_rule=qsr): a period starting
    at learning rate lr lasts max(sync.period, floor((qsr_alpha / lr)^2)) steps. The paper
    picks it so that H stays near sync.period at the peak learning rate."""


def qsr_period(alpha: float, lr: float, base: int) -> int:
    if lr <= 0:
        return UNBOUNDED
    return max(base, min(UNBOUNDED, math.floor((alpha / lr) ** 2)))


@PERIOD_RULES.register
class QSR(Fixed):
    name = "qsr"
    shards = True
    """Runs across replica groups on each rank's own shard (``sync/sharding.py``)."""
    Config = QSRKeys

    def __init__(self, cfg: Any, lr_at: Callable[[int], float] | None = None) -> None:
        super().__init__(cfg)
        if lr_at is None:
            raise ValueError("sync.period_rule=qsr needs the learning rate schedule (lr_at)")
        self.alpha = float(cfg.qsr_alpha)
        self.lr_at = lr_at
        self.ends: list[int] = []
        self._saved: list[int] = []

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        problems: list[str] = []
        check = need(problems)
        check(cfg.qsr_alpha is not None,
              f"sync.qsr_alpha: sync.period_rule=qsr needs a positive alpha, got "
              f"{cfg.qsr_alpha}")
        return problems

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset()

    @classmethod
    def needs(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({RULED_PERIOD})

    def bind(self, start: int, base: int) -> None:
        super().bind(start, base)
        self.ends = [start]

    def _cover(self, step: int) -> None:
        while self.ends[-1] <= step:
            last = self.ends[-1]
            self.ends.append(last + qsr_period(self.alpha, self.lr_at(last), self.base))
        if self._saved:
            n = min(len(self._saved), len(self.ends))
            if self.ends[:n] != self._saved[:n]:
                raise ConfigError([
                    f"sync.qsr_alpha: the checkpoint's sync periods end at {self._saved[:n]}, "
                    f"this recipe's at {self.ends[:n]}; the LR schedule, sync.period or "
                    "sync.qsr_alpha changed since it was written. Restore them, or start a "
                    "new run (run.resume=false or another run.dir)"])
            if n == len(self._saved):
                self._saved = []

    def is_sync(self, steps_done: int) -> bool:
        if steps_done <= self.start:
            return False
        self._cover(steps_done)
        i = bisect.bisect_left(self.ends, steps_done)
        return self.ends[i] == steps_done

    def last_end(self, steps_done: int) -> int:
        self._cover(steps_done)
        return self.ends[max(0, bisect.bisect_left(self.ends, steps_done) - 1)]

    def period_of(self, step: int) -> int:
        self._cover(step)
        i = bisect.bisect_right(self.ends, step)
        return self.ends[i] - self.ends[i - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"ends": list(self.ends)}

    def resume_problem(self, state: dict[str, Any], check: Any) -> str | None:
        """The periods a checkpoint of this rule reached must be this recipe's too (a
        checkpoint of another rule carries none: the periods start anew from the recipe)."""
        saved = [int(e) for e in state.get("ends", [])]
        if not saved:
            return None
        keep, self._saved = self._saved, []
        self._cover(saved[-1])
        self._saved = keep
        mine = self.ends[:len(saved)]
        if mine != saved:
            return (f"its sync periods end at {saved}, this recipe's at {mine} (the LR "
                    "schedule, sync.period or sync.qsr_alpha changed)")
        return None

    @classmethod
    def merge_states(cls, states: list[dict[str, Any]]) -> dict[str, Any]:
        # Another world size scales the learning rate, so the periods legitimately change:
        # they are recomputed from the new schedule rather than checked against the old.
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved = [int(e) for e in state.get("ends", [])]
        if self._saved:
            self._cover(self._saved[-1])
