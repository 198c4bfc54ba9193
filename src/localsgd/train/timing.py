"""Wall time per training phase (data, forward, backward, comm+optimizer), summed per epoch."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PHASES = ("data", "forward", "backward", "comm_opt")


class PhaseTimer:
    def __init__(self, device: torch.device) -> None:
        # CUDA kernels run asynchronously; without a sync a phase would only time the launch.
        self._sync = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self._sync:
            torch.cuda.synchronize()
        self.totals[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": self.totals.get(k, 0.0) for k in PHASES}
        self.totals = defaultdict(float)
        return out
