"""Blocking syncs: the average runs to completion before the next step starts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from localsgd.config.errors import ConfigError
from localsgd.registry import Facts, Part
from localsgd.sync.capabilities import LANDS_NOW, REPLACES_STATE, WHOLE_SYNCS
from localsgd.sync.parts import RUNNERS
from localsgd.sync.schedules.base import Schedule


@RUNNERS.register
class Blocking(Part):
    name = "blocking"
    shards = True
    """Runs across replica groups on each rank's own shard (``sync/sharding.py``)."""

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({LANDS_NOW, WHOLE_SYNCS, REPLACES_STATE})

    def __init__(self, cfg: Any, averager: Any) -> None:
        self.peak_bytes = 0
        """Beyond the averaging bucket, nothing: the average is taken in place."""

    def submit(self, step: int, action: str, job: Any) -> list[tuple[int, str, float]]:
        """Start the sync ``job`` due after ``step``; returns the syncs that finished, as
        (step started, action, consensus distance)."""
        return [(step, action, job.run())]

    def poll(self, step: int, job_for: Callable[[str], Any]) -> list[tuple[int, str, float]]:
        """Finish the syncs due by ``step`` (``job_for(action)`` applies one)."""
        return []

    def drain(self, job_for: Callable[[str], Any]) -> list[tuple[int, str, float]]:
        """Finish every sync still in flight (before the final average)."""
        return []

    def resume_problem(self, state: dict[str, Any], check: Any) -> str | None:
        """An average in flight in the checkpoint lands only through an overlapped runner."""
        started = sorted({int(e[0]) for e in [*state.get("pending", []),
                                               *state.get("waiting", [])]})
        if started:
            return (f"it holds the average of step {started[0]} still in flight, which only "
                    "an overlapped runner lands")
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("pending") or state.get("waiting"):
            raise ConfigError([
                "sync.overlap_steps: the checkpoint holds an average still in flight, written "
                "by a run with sync.overlap_steps > 0; resume with that setting (the average "
                "lands at its step), or set run.resume=false"])

    @classmethod
    def merge_states(cls, states: list[dict[str, Any]]) -> dict[str, Any]:
        # Another world size drops the averages in flight (see the overlapped runner).
        return {}

    def in_consensus(self, schedule: Schedule, step: int) -> bool:
        """Whether all workers hold identical parameters after ``step`` steps."""
        return schedule.in_consensus(step)
