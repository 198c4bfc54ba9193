"""What every schedule answers: pure functions of the one optimizer-step counter.

``step`` is the number of optimizer steps completed so far; it is also the index of the step
about to run. Nothing here touches processes, so schedules are unit-tested directly and the
accounting tests predict collective counts from them. A sync's scope names the workers that
take part: ``GLOBAL`` (all of them) or ``NODE`` (those of one node); the topology turns a
scope into a process group (or a graph neighbourhood, ``MIX``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from localsgd.config.domains import NON_NEGATIVE, domain
from localsgd.registry import Facts, Part
from localsgd.sync.capabilities import MODEL_AVERAGES

GLOBAL = "global"
NODE = "intra"
MIX = "gossip"
"""A global sync that a gossip topology with exact rounds (``sync.exact_every``) turns into
a neighbour mix: the schedules never return it."""
MINIBATCH = "minibatch"
LOCAL = "local"


@dataclass
class SwitchKeys:
    """Keys of schedules that may start with a mini-batch phase."""

    switch_epoch: float | None = domain(NON_NEGATIVE, None)
    """Switch point in epochs: mini-batch SGD before it, local steps after (the paper uses
    the first LR decay)."""
    switch_step: int | None = domain(NON_NEGATIVE, None)
    """Switch point in optimizer steps (alternative to switch_epoch)."""


@dataclass(frozen=True)
class Schedule(Part):
    """Mini-batch SGD before ``switch_step``, then a sync of ``scope_after`` every period."""

    scopes: ClassVar[tuple[str, ...]] = (GLOBAL,)
    """Scopes this schedule may sync over (their process groups are built at start-up)."""
    switch_step: int | None
    """First step index that runs locally; None means never (mini-batch SGD)."""
    period: int = 1
    rule: Any = field(default=None, compare=False)
    """The period rule (``sync.period_rule``, bound to ``switch_step`` and ``period``); None
    means every period is ``period`` steps."""

    @classmethod
    def from_config(cls, cfg: Any, steps_per_epoch: int) -> Schedule:
        raise NotImplementedError

    @classmethod
    def has_local_steps(cls, cfg: Any) -> bool:
        return True

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({MODEL_AVERAGES} if cls.has_local_steps(cfg) else ())

    def phase(self, step: int) -> str:
        if self.switch_step is None or step < self.switch_step:
            return MINIBATCH
        return LOCAL

    def grad_sync(self, step: int) -> bool:
        """Whether the gradients of step ``step`` are all-reduced."""
        return self.phase(step) == MINIBATCH

    def action_after(self, steps_done: int) -> str | None:
        """The scope of the model average due once ``steps_done`` steps have completed."""
        if self.switch_step is None or steps_done <= self.switch_step:
            return None
        if self.rule is not None:
            return GLOBAL if self.rule.is_sync(steps_done) else None
        return GLOBAL if (steps_done - self.switch_step) % self.period == 0 else None

    def in_consensus(self, steps_done: int) -> bool:
        """Whether all workers hold identical parameters after ``steps_done`` steps."""
        if steps_done == 0 or self.phase(steps_done - 1) == MINIBATCH:
            return True
        return self.action_after(steps_done) == GLOBAL

    def effective_period(self, step: int) -> int:
        """Steps between global averages at ``step`` (1 while gradients are all-reduced)."""
        if self.phase(step) == MINIBATCH:
            return 1
        return self.rule.period_of(step) if self.rule is not None else self.period

    def with_rule(self, rule: Any) -> Schedule:
        """This schedule with its periods set by ``rule`` (a ``sync.period_rule`` part)."""
        if self.switch_step is not None:
            rule.bind(self.switch_step, self.period)
        return dataclasses.replace(self, rule=rule)


def switch_step(cfg: Any, steps_per_epoch: int) -> int:
    """The first local step index from ``sync.switch_step`` or ``sync.switch_epoch`` (else 0)."""
    if cfg.switch_step is not None:
        return int(cfg.switch_step)
    if cfg.switch_epoch is not None:
        return round(cfg.switch_epoch * steps_per_epoch)
    return 0


def check_switch(cfg: Any, facts: Facts, required: bool, algorithm: str) -> list[str]:
    p: list[str] = []
    if cfg.switch_epoch is not None and cfg.switch_step is not None:
        p.append("sync.switch_step: give either sync.switch_epoch or sync.switch_step, not both")
    elif required and cfg.switch_epoch is None and cfg.switch_step is None:
        p.append(f"sync.switch_epoch: {algorithm} needs a switch point; set sync.switch_epoch "
                 "(e.g. the first LR decay) or sync.switch_step")
    if cfg.switch_epoch is not None and not cfg.switch_epoch < facts.epochs:
        p.append(f"sync.switch_epoch: must be in [0, train.epochs={facts.epochs}), got "
                 f"{cfg.switch_epoch}; a switch after the last epoch never happens")
    return p

