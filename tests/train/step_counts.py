"""Counts per training step: ``aten::`` ops the step launches (``torch.profiler``, CPU
activities) and Python function calls (``sys.setprofile``), for localsgd's trainer and for
the hand-written loop of ``benchmarks/step_harness.py``, on the same batches.

Two windows of ``STEPS`` steps each, both between syncs and between log steps: the ops are
counted in the first, the calls in the second (the profiler and the call counter would
otherwise count each other).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import step_harness as h  # noqa: E402

STEPS = 4
OPS_FROM = 2
"""The op window is steps OPS_FROM+1 .. OPS_FROM+STEPS, the call window the next STEPS."""
PERIOD = 16
"""H of the 2-worker case between syncs: no sync falls in either window (nor does
train.log_every_steps' step 10). With H=1 every step of both windows is a sync step."""


class Counter:
    """``after_step`` (the harness's window protocol) opens and closes both windows."""

    def __init__(self) -> None:
        self.aten = 0
        self.calls = 0
        self.c_calls = 0
        self._prof: Any = None

    def _count(self, frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            self.calls += 1
        elif event == "c_call":
            self.c_calls += 1

    def after_step(self, step: int) -> None:
        if step == OPS_FROM:
            self._prof = profile(activities=[ProfilerActivity.CPU])
            self._prof.__enter__()
        elif step == OPS_FROM + STEPS:
            self._prof.__exit__(None, None, None)
            self.aten = sum(1 for e in self._prof.events() if e.name.startswith("aten::"))
            sys.setprofile(self._count)
        elif step == OPS_FROM + 2 * STEPS:
            sys.setprofile(None)

    def per_step(self) -> dict[str, float]:
        return {"aten_ops": self.aten / STEPS, "python_calls": self.calls / STEPS,
                "c_calls": self.c_calls / STEPS}


def case(world: int, period: int = PERIOD) -> h.Case:
    """The tiny model (simplecnn at 8x8), batch 8; the windows end before the last step."""
    return h.Case("simplecnn", 8, 8, world, period, OPS_FROM, 2 * STEPS + 2)


CPU = torch.device("cpu")


def count(loop: str, world: int, device: torch.device = CPU,
          period: int = PERIOD) -> dict[str, float]:
    """Counts per step of ``loop`` (``hand`` or ``localsgd``) in this process (rank from
    the environment, process group as the loop needs it)."""
    counter = Counter()
    c = case(world, period)
    if loop == "hand":
        h.hand_loop(c, int(os.environ.get("RANK", "0")), device, counter)  # type: ignore[arg-type]
    else:
        h.localsgd_loop(c, device, counter)  # type: ignore[arg-type]
    return counter.per_step()


def _worker(rank: int, world: int, ports: list[int], out: str, period: int) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[1]}", rank=rank,
                            world_size=world)
    hand = count("hand", world, period=period)
    dist.destroy_process_group()
    ours = count("localsgd", world, period=period)
    if rank == 0:
        Path(out).write_text(json.dumps({"hand": hand, "localsgd": ours}))


def count_two_workers(tmp: Path, ports: list[int],
                      period: int = PERIOD) -> dict[str, dict[str, float]]:
    """Both loops in 2 gloo processes, averaging every ``period`` steps; rank 0's counts."""
    out = tmp / "counts.json"
    mp.start_processes(_worker, args=(2, ports, str(out), period), nprocs=2,
                       start_method="spawn")
    return json.loads(out.read_text())
