"""Wall time per training phase (data, forward, backward, comm+optimizer), summed per epoch,
when ``train.track_time`` asks for it; otherwise a timer that records nothing."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PHASES = ("data", "forward", "backward", "comm_opt")


class PhaseTimer:
    """Sums the time of each phase; on CUDA, on the device's own timeline.

    A host clock around asynchronous CUDA work would only time the launches, and
    synchronizing around every phase (8 times a step) would stop the host from queueing the
    next kernels while the device works. CUDA events are recorded on the stream instead and
    read once per epoch: a phase then counts the device time between its two events, so the
    data phase shows how long the device waited for the next batch.
    """

    # Events that have completed are folded into the totals once this many are pending, so
    # the list stays short without ever waiting on the device.
    _FOLD_AT = 256

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self._cuda:
            start = time.perf_counter()
            yield
            self.totals[name] += time.perf_counter() - start
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        yield
        end.record()
        self._pending.append((name, begin, end))
        if len(self._pending) >= self._FOLD_AT:
            self._fold(wait=False)

    def _fold(self, wait: bool) -> None:
        keep: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        for name, begin, end in self._pending:
            if wait:
                end.synchronize()
            if end.query():
                self.totals[name] += begin.elapsed_time(end) / 1000.0
            else:
                keep.append((name, begin, end))
        self._pending = keep

    def pop(self) -> dict[str, float]:
        self._fold(wait=True)
        out = {f"time/{k}": self.totals.get(k, 0.0) for k in PHASES}
        self.totals = defaultdict(float)
        return out


class _Untimed:
    """The phase of a timer that is off: entering and leaving it does nothing."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_UNTIMED = _Untimed()


class NoPhaseTimer:
    """``train.track_time=false``: no events, no clock reads; epoch records get no time/*
    phase keys."""

    def phase(self, name: str) -> _Untimed:
        return _UNTIMED

    def pop(self) -> dict[str, float]:
        return {}


def build_timer(device: torch.device, track: bool) -> PhaseTimer | NoPhaseTimer:
    """The per-phase timer when ``track`` (``train.track_time``), else one that costs nothing."""
    return PhaseTimer(device) if track else NoPhaseTimer()
