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

With ``fragments`` F > 1 the tensors of a sync are cut into F contiguous fragments of about
equal size (streaming, as in streaming DiLoCo): fragment f starts ``f * period / F`` steps
after the sync step and lands ``overlap_steps`` after its own start, so at most one fragment
is in flight. The sync's consensus distance combines its fragments' (each measured when it
started) and is logged when the last one lands; a run that ends between fragments launches
and lands the rest before its final average. Bytes are those of a whole sync; a fragment
boundary can split a bucket, so there may be one more call per fragment.

A checkpoint taken while a sync is in flight waits for its collectives and saves the
snapshot and the reduced values (and the fragments still to start); the resumed run applies
them at the same step, so it is bitwise identical to an uninterrupted one. A resume with
another ``overlap_steps`` still lands it at that step; one with other fragments or other
tensors travelling, or whose next sync would start before it lands, is refused. Extra memory: two
copies of what is in flight (the snapshot and the buffer being reduced): twice the model's
synced tensors, or twice the largest fragment. ``peak_bytes`` records the most it held.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from localsgd.config.domains import AT_LEAST_ONE, NON_NEGATIVE, domain
from localsgd.registry import Facts, Part
from localsgd.sync.averager import Averager, InFlight
from localsgd.sync.capabilities import FIXED_PERIOD, WHOLE_SYNCS
from localsgd.sync.parts import RUNNERS
from localsgd.sync.schedules.base import MINIBATCH, Schedule


@dataclass
class OverlapKeys:
    overlap_steps: int = domain(NON_NEGATIVE, 0)
    """tau: local steps an average runs in the background before it is applied (0: blocking,
    the default). At most ``sync.period / sync.fragments``, so that one average is in flight
    at a time."""
    fragments: int = domain(AT_LEAST_ONE, 1)
    """F: stream each sync in F fragments, started period / F steps apart (F divides
    sync.period); at most 1/F of the synced tensors is in flight and held as a snapshot."""


Done = tuple[int, str, float]
"""(step the sync started, action, consensus distance)."""


def fragment_of(sizes: list[int], parts: int) -> list[list[int]]:
    """Contiguous index ranges of ``sizes`` cut into ``parts`` of about equal total size."""
    total = sum(sizes) or 1
    out: list[list[int]] = [[] for _ in range(parts)]
    seen = 0
    for i, n in enumerate(sizes):
        # A tensor goes to the fragment that holds its middle element.
        out[min(parts - 1, int((seen + n / 2) * parts / total))].append(i)
        seen += n
    return out


@RUNNERS.register
class Overlapped(Part):
    name = "overlapped"
    shards = True
    """Snapshots and corrects whatever tensors the engine hands it, so each rank's own
    shards across replica groups (``sync/sharding.py``)."""
    Config = OverlapKeys

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        tau, parts = cfg.overlap_steps, cfg.fragments
        if tau == 0:
            return ["sync.overlap_steps: must be >= 1 with sync.runner=overlapped, got 0"]
        period = getattr(cfg, "period", None)
        if not facts.local_steps or period is None:
            return []
        if period % parts:
            return [f"sync.fragments: {parts} does not divide sync.period={period}; fragments "
                    "start period / fragments steps apart"]
        if tau > period // parts:
            limit = f"sync.period={period}" if parts == 1 else (
                f"sync.period / sync.fragments = {period // parts}")
            return [f"sync.overlap_steps: {tau} exceeds {limit}; an average must land before "
                    "the next one starts"]
        return []

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({WHOLE_SYNCS} if cfg.fragments == 1 else ())

    @classmethod
    def needs(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        # Fragments start sync.period / sync.fragments steps apart.
        return frozenset({FIXED_PERIOD} if cfg.fragments > 1 else ())

    def __init__(self, cfg: Any, averager: Averager) -> None:
        self.tau = cfg.overlap_steps
        self.parts = cfg.fragments
        self.gap = max(1, getattr(cfg, "period", 1) // self.parts)
        self.averager = averager
        self.pending: list[tuple[int, int, str, InFlight]] = []
        """(step the sync started, step due, action, one fragment in flight)."""
        self.waiting: list[tuple[int, int, str, int]] = []
        """(step the sync started, step to launch, action, fragment) not yet started."""
        self.partial: dict[tuple[int, str], tuple[int, float]] = {}
        """(sync step, action) -> (fragments landed, their squared distances summed)."""
        self.peak_bytes = 0

    def _launch(self, sync_step: int, step: int, action: str, fragment: int, job: Any) -> None:
        tensors = job.tensors()[0]
        select = None if self.parts == 1 else set(
            fragment_of([t.numel() for t in tensors], self.parts)[fragment])
        flight = job.start(select)
        self.pending.append((sync_step, step + self.tau, action, flight))
        self.peak_bytes = max(self.peak_bytes, sum(f.nbytes for *_, f in self.pending))

    def _land(self, sync_step: int, action: str, flight: InFlight, job: Any) -> list[Done]:
        distance = job.apply(flight)
        landed, sq = self.partial.pop((sync_step, action), (0, 0.0))
        landed, sq = landed + 1, sq + distance * distance
        if landed < self.parts:
            self.partial[(sync_step, action)] = (landed, sq)
            return []
        return [(sync_step, action, math.sqrt(sq) if self.parts > 1 else distance)]

    def submit(self, step: int, action: str, job: Any) -> list[Done]:
        self.waiting += [(step, step + f * self.gap, action, f) for f in range(1, self.parts)]
        self._launch(step, step, action, 0, job)
        return []

    def poll(self, step: int, job_for: Callable[[str], Any]) -> list[Done]:
        done: list[Done] = []
        for entry in [p for p in self.pending if p[1] <= step]:
            self.pending.remove(entry)
            sync_step, _, action, flight = entry
            done += self._land(sync_step, action, flight, job_for(action))
        # Fragments start after whatever landed at this step, like a whole sync does.
        for entry in [w for w in self.waiting if w[1] <= step]:
            self.waiting.remove(entry)
            sync_step, _, action, fragment = entry
            self._launch(sync_step, step, action, fragment, job_for(action))
        return done

    def drain(self, job_for: Callable[[str], Any]) -> list[Done]:
        done: list[Done] = []
        while self.pending or self.waiting:
            due = min([p[1] for p in self.pending] + [w[1] for w in self.waiting])
            done += self.poll(due, job_for)
        return done

    def in_consensus(self, schedule: Schedule, step: int) -> bool:
        # Corrections keep local progress: after the first local step models always differ.
        return step == 0 or schedule.phase(step - 1) == MINIBATCH

    def state_dict(self) -> dict[str, Any]:
        for *_, flight in self.pending:
            self.averager.complete(flight)
        return {"pending": [[s, d, a, f.state_dict()] for s, d, a, f in self.pending],
                "waiting": [list(w) for w in self.waiting],
                "partial": [[s, a, n, sq] for (s, a), (n, sq) in self.partial.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = [(int(s), int(d), str(a), InFlight.from_state(f))
                        for s, d, a, f in state.get("pending", [])]
        self.waiting = [(int(s), int(t), str(a), int(f)) for s, t, a, f in
                        state.get("waiting", [])]
        self.partial = {(int(s), str(a)): (int(n), float(sq))
                        for s, a, n, sq in state.get("partial", [])}

    def resume_problem(self, state: dict[str, Any], check: Any) -> str | None:
        """An average in flight lands at the step it was due, whatever ``overlap_steps`` is
        now (fragments still to start land ``overlap_steps`` after their start), provided
        the same tensors travel in the same fragments and no sync of the recipe starts
        before it has landed."""
        pending, waiting = state.get("pending", []), state.get("waiting", [])
        if not (pending or waiting or state.get("partial")):
            return None
        for key in ("sync.fragments", "sync.average_buffers", "sync.momentum"):
            if key in check.changed:
                return (f"it holds an average in flight, started with the old {key}, which "
                        "sets what travels and in which fragments")
        lands = max([int(p[1]) for p in pending] + [int(w[1]) + self.tau for w in waiting])
        clash = next((t for t in range(check.step + 1, lands)
                      if check.schedule.action_after(t) is not None), None)
        if clash is not None:
            return (f"the average in flight lands at step {lands}, after this recipe's next "
                    f"sync starts (step {clash})")
        return None

    @classmethod
    def merge_states(cls, states: list[dict[str, Any]]) -> dict[str, Any]:
        # Another world size restarts from the average of the saved models, into which the
        # workers' pending corrections are already folded as well as they can be: drop them.
        return {"pending": [], "waiting": [], "partial": []}
