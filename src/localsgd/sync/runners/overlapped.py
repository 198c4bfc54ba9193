"""Overlapped syncs: start the average, keep taking local steps, apply it ``overlap_steps``
later as a correction that keeps the local progress.

At a sync the tensors that travel are snapshotted and their collectives launched in the
background (gloo's worker threads on CPU; NCCL's own stream on CUDA). ``overlap_steps`` (tau)
steps later the runner waits for whatever is still running and applies
theta <- theta + (update(snapshot, average) - snapshot): with plain averaging, the average
the workers had tau steps ago plus each worker's own progress since. Momentum (policy
``average``) gets the same correction; policy ``reset`` zeroes momentum when the correction
lands. BatchNorm statistics (with ``sync.average_buffers``) take the snapshots' average, as a
correction could push a running variance below zero. Workers therefore never hold identical
models between syncs, so evaluation averages the models aside and the run ends with a
blocking average (the exact consensus) after the last correction has landed.

A sync is logged when it lands, under the step it started at, so an epoch's ``sync/count``
counts the averages that landed in it. A resumed run with another world size starts from
the average of the saved models and drops the averages in flight (with policy ``reset`` the
momentum reset they would have made is dropped with them).

A checkpoint taken while a sync is in flight waits for its collectives and saves the
snapshot and the reduced values; the resumed run applies them at the same step, so it is
bitwise identical to an uninterrupted one. Extra memory: two copies of what travels (the
snapshot and the buffer being reduced).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localsgd.registry import Facts, Part
from localsgd.sync.averager import Averager, InFlight
from localsgd.sync.parts import RUNNERS
from localsgd.sync.schedules.base import MINIBATCH, Schedule


@dataclass
class OverlapKeys:
    overlap_steps: int = 0
    """tau: local steps an average runs in the background before it is applied (0: blocking,
    the default). At most ``sync.period``, so one average is in flight at a time."""


@RUNNERS.register
class Overlapped(Part):
    name = "overlapped"
    Config = OverlapKeys

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        tau = cfg.overlap_steps
        if tau < 0:
            return [f"sync.overlap_steps: must be >= 0 (0: blocking), got {tau}"]
        if tau == 0:
            return ["sync.overlap_steps: must be >= 1 with sync.runner=overlapped, got 0"]
        period = getattr(cfg, "period", None)
        if facts.local_steps and period is not None and tau > period:
            return [f"sync.overlap_steps: {tau} exceeds sync.period={period}; an average must "
                    "land before the next one starts, so use at most the period"]
        return []

    def __init__(self, cfg: Any, averager: Averager) -> None:
        self.tau = cfg.overlap_steps
        self.averager = averager
        self.pending: list[tuple[int, int, str, InFlight]] = []
        """(step started, step due, action, the sync in flight)."""

    def submit(self, step: int, action: str, job: Any) -> list[tuple[int, str, float]]:
        self.pending.append((step, step + self.tau, action, job.start()))
        return []

    def poll(self, step: int, job_for: Callable[[str], Any]) -> list[tuple[int, str, float]]:
        due = [p for p in self.pending if p[1] <= step]
        self.pending = [p for p in self.pending if p[1] > step]
        return [(start, action, job_for(action).apply(flight))
                for start, _, action, flight in due]

    def drain(self, job_for: Callable[[str], Any]) -> list[tuple[int, str, float]]:
        return self.poll(max((p[1] for p in self.pending), default=0), job_for)

    def in_consensus(self, schedule: Schedule, step: int) -> bool:
        # Corrections keep local progress: after the first local step models always differ.
        return step == 0 or schedule.phase(step - 1) == MINIBATCH

    def state_dict(self) -> dict[str, Any]:
        for *_, flight in self.pending:
            self.averager.complete(flight)
        return {"pending": [[s, d, a, f.state_dict()] for s, d, a, f in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = [(int(s), int(d), str(a), InFlight.from_state(f))
                        for s, d, a, f in state.get("pending", [])]

    @classmethod
    def merge_states(cls, states: list[dict[str, Any]]) -> dict[str, Any]:
        # Another world size restarts from the average of the saved models, into which the
        # workers' pending corrections are already folded as well as they can be: drop them.
        return {"pending": []}
