"""An outer optimizer on the averaged pseudo-gradient: SlowMo, DiLoCo and plain averaging.

Every worker keeps the anchor theta_a, the model all workers agreed on when the current
local period began. At a global sync the pseudo-gradient is Delta = theta_a - avg(theta_i),
and with gamma the inner learning rate of the last local step (SlowMo's convention,
``sync.outer.scale_by_inner_lr``):

    u       <- beta * u + Delta / gamma
    d       =  Delta / gamma + beta * u        (Nesterov)   or   u
    theta_a <- theta_a - alpha * gamma * d     and every worker takes theta_a

alpha = ``sync.outer.lr``, beta = ``sync.outer.momentum``. alpha=1, beta=0 is plain
averaging (to round-off). With a constant inner learning rate the convention does not
matter; with ``scale_by_inner_lr=false`` gamma is 1, which is DiLoCo's (and torchft's) outer
SGD on Delta. The step happens at global syncs only: intra-node averages of hierarchical
SGD stay plain, and the evaluation copy is the plain average of the workers.

Memory: the anchor is one copy of the parameters and the momentum another (none when
beta=0), on the model's device or, with ``state_device=cpu``, in host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from localsgd.config.domains import FRACTION, POSITIVE, domain
from localsgd.registry import Facts, need
from localsgd.sync.anchor import Anchor, on_host
from localsgd.sync.capabilities import CONSENSUS, MODEL_AVERAGES
from localsgd.sync.parts import UPDATES, StateDevice, state_on_cpu
from localsgd.sync.updates.base import Update


@dataclass
class OuterOptimizerKeys:
    lr: float = domain(POSITIVE, 1.0)
    """alpha: outer learning rate (1 with momentum 0 is plain averaging)."""
    momentum: float = domain(FRACTION, 0.0)
    """beta: outer momentum (SlowMo uses 0.5 or more, DiLoCo 0.9 with Nesterov)."""
    nesterov: bool = False
    """Nesterov outer momentum (DiLoCo)."""
    scale_by_inner_lr: bool = True
    """Divide the pseudo-gradient by the inner learning rate gamma and step by alpha * gamma
    (SlowMo); false steps by alpha on the pseudo-gradient itself (DiLoCo, torchft)."""
    state_device: StateDevice = StateDevice.model
    """Where the anchor and outer momentum live: model (the parameters' device) or cpu
    (sync.state_device=cpu does the same for all of the sync's state)."""


@dataclass
class OuterKeys:
    outer: OuterOptimizerKeys = field(default_factory=OuterOptimizerKeys)
    """The outer optimizer of sync.update=outer."""


@UPDATES.register
class Outer(Update):
    name = "outer"
    shards = True
    """Runs across replica groups on each rank's own shard (``sync/sharding.py``)."""
    Config = OuterKeys

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        o, problems = cfg.outer, []
        check = need(problems)
        check(not o.nesterov or o.momentum > 0,
              "sync.outer.nesterov: Nesterov needs sync.outer.momentum > 0")
        return problems

    @classmethod
    def needs(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({MODEL_AVERAGES, CONSENSUS})

    uses_anchor = True

    def __init__(self, cfg: Any) -> None:
        o = cfg.outer
        self.lr, self.beta, self.nesterov = float(o.lr), float(o.momentum), bool(o.nesterov)
        self.scaled = bool(o.scale_by_inner_lr)
        self.on_cpu = state_on_cpu(o.state_device, cfg.state_device)
        self.anchor_on_cpu = self.on_cpu
        self.anchor: Anchor = Anchor(self.on_cpu)
        """The sync's anchor, bound by the controller; saved with this part's state."""
        self.velocity: list[torch.Tensor] = []
        self.gamma = 1.0

    @property
    def anchor_step(self) -> int:
        return self.anchor.step

    def at_consensus(self, step: int, params: list[torch.Tensor]) -> None:
        if self.beta > 0 and not self.velocity:
            self.velocity = [self._zeros(a) for a in self.anchor.tensors]

    def _zeros(self, like: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(like)
        return on_host(zeros) if self.on_cpu else zeros

    def begin(self, step: int, inner_lr: float) -> None:
        if not self.anchor:
            raise RuntimeError("sync.update=outer has no anchor: SyncController.begin() must "
                               "run before the first step")
        if self.scaled and not inner_lr > 0:
            raise RuntimeError(f"sync.outer.scale_by_inner_lr needs a positive inner learning "
                               f"rate, got {inner_lr} at step {step}")
        self.gamma = inner_lr if self.scaled else 1.0
        self.anchor.step = step

    def apply(self, index: int, start: int, local: torch.Tensor, reduced: torch.Tensor,
              out: torch.Tensor) -> None:
        anchor = self.anchor.tensors[index][start:start + reduced.numel()]
        self._step(index, start, anchor, anchor.sub(reduced.to(anchor.device)), out)

    def apply_delta(self, index: int, start: int, local: torch.Tensor, delta: torch.Tensor,
                    anchor: torch.Tensor, out: torch.Tensor) -> None:
        self._step(index, start, anchor, delta.to(anchor.device, copy=True), out)

    def held_bytes(self) -> int:
        """Outer momentum (the anchor is the sync's, counted once)."""
        return sum(v.numel() * v.element_size() for v in self.velocity)

    def _step(self, index: int, start: int, anchor: torch.Tensor, delta: torch.Tensor,
              out: torch.Tensor) -> None:
        """One outer step of ``anchor`` (a slice) on the pseudo-gradient ``delta`` (owned)."""
        grad = delta.div_(self.gamma)
        n = grad.numel()
        if self.beta > 0:
            u = self.velocity[index][start:start + n]
            u.mul_(self.beta).add_(grad)
            step = grad.add_(u, alpha=self.beta) if self.nesterov else u
        else:
            step = grad
        anchor.sub_(step, alpha=self.lr * self.gamma)
        out.copy_(anchor)

    def bind(self, anchor: Anchor) -> None:
        self.anchor = anchor

    def state_dict(self) -> dict[str, Any]:
        # Copies: the anchor and momentum move in place at every sync.
        return {"anchor": [a.clone() for a in self.anchor.tensors],
                "velocity": [v.clone() for v in self.velocity], "anchor_step": self.anchor.step}

    def resume_problem(self, state: dict[str, Any], check: Any) -> str | None:
        """A checkpoint without an anchor (written with sync.update=copy) is continued from
        a sync boundary only: the anchor is then the checkpoint's model, the same on every
        worker, and the outer momentum starts at zero, as in a run that starts there.
        Mid-period the model of the last sync is gone."""
        if not state.get("anchor") and not check.consensus:
            return ("resuming mid-period needs the anchor (the model of the last sync) it "
                    "never kept")
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state["anchor"]:
            self.anchor.load(list(state["anchor"]), int(state["anchor_step"]))
        self.velocity = [on_host(t) if self.on_cpu else t for t in state["velocity"]]
        if self.beta > 0 and self.anchor and not self.velocity:
            self.velocity = [self._zeros(a) for a in self.anchor.tensors]
