"""Exact communication accounting: every collective the job issues, by kind.

Bytes are the payload one rank hands to a collective (numel * element size); what a ring
all-reduce puts on the wire is 2 (K-1)/K times that, which the multi-node benchmark compares
with interface counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

KINDS = ("grad", "average", "eval", "other")
"""Kinds every run reports, even at zero: grad: gradient all-reduce of mini-batch steps;
average: model averaging at syncs; eval: forming the averaged model for evaluation; other:
set-up broadcasts, metric reductions. Parts may record kinds of their own (for example
``average_compressed``); those appear once first recorded."""


@dataclass
class KindTotals:
    bytes: int = 0
    calls: int = 0
    seconds: float = 0.0
    """From the start of each collective until its result was taken."""
    wait_s: float = 0.0
    """Of that, the time training stood still waiting for it: all of it for a blocking
    collective, only the tail for an average that ran behind local steps, and 0 for DDP's
    gradient all-reduce, which overlaps with backward (its wait is inside the backward
    time). On CUDA a wait only blocks the host until NCCL has queued the work."""


@dataclass
class CommMeter:
    totals: dict[str, KindTotals] = field(
        default_factory=lambda: {k: KindTotals() for k in KINDS})

    def record(self, kind: str, nbytes: int, seconds: float = 0.0, calls: int = 1,
               wait_s: float = 0.0) -> None:
        t = self.totals.setdefault(kind, KindTotals())
        t.bytes += nbytes
        t.calls += calls
        t.seconds += seconds
        t.wait_s += wait_s

    @contextmanager
    def timed(self, kind: str, nbytes: int) -> Iterator[None]:
        """Count a blocking collective: all of its time is waiting time."""
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.record(kind, nbytes, elapsed, wait_s=elapsed)

    def flat(self, prefix: str = "comm") -> dict[str, float]:
        """Totals as metric keys: comm/bytes, comm/calls, comm/seconds and comm/<kind>/..."""
        out: dict[str, float] = {
            f"{prefix}/bytes": sum(t.bytes for t in self.totals.values()),
            f"{prefix}/calls": sum(t.calls for t in self.totals.values()),
            f"{prefix}/seconds": sum(t.seconds for t in self.totals.values()),
            f"{prefix}/wait_s": sum(t.wait_s for t in self.totals.values()),
        }
        for kind, t in self.totals.items():
            out[f"{prefix}/{kind}/bytes"] = t.bytes
            out[f"{prefix}/{kind}/calls"] = t.calls
            out[f"{prefix}/{kind}/seconds"] = t.seconds
            out[f"{prefix}/{kind}/wait_s"] = t.wait_s
        return out

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"bytes": t.bytes, "calls": t.calls, "seconds": t.seconds,
                    "wait_s": t.wait_s} for k, t in self.totals.items()}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        for kind, t in state.items():
            self.totals[kind] = KindTotals(int(t["bytes"]), int(t["calls"]), float(t["seconds"]),
                                           float(t.get("wait_s", 0.0)))

    def summary_line(self) -> str:
        parts = [f"{k} {t.bytes / 2**20:.1f} MiB/{t.calls} calls/{t.seconds:.2f}s"
                 for k, t in self.totals.items() if t.calls]
        total = sum(t.bytes for t in self.totals.values()) / 2**20
        return f"communication: {total:.1f} MiB per rank in total; " + ", ".join(parts)
