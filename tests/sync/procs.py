"""Real gloo workers in processes for sync tests that need real collectives (all-gather).

``run_processes(world, scenarios, tmp)`` starts ``world`` processes joined by gloo (a file
rendezvous), and in each runs every scenario: a ``SyncController`` over the real
``complete`` topology driving a ``FakeTarget`` (tests/sync/threads.py) for a number of
steps, recording the flat parameters before and after each step's sync and the meter. One
start-up serves all scenarios, so a test file pays the process start once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass
class Scenario:
    name: str
    sync: dict[str, Any]
    """Keyword arguments of ``SyncConfig`` (nested sections as dataclass instances)."""
    steps: int
    local_world: int = 1
    resume_at: int | None = None
    """Also run again from the controller and target state saved after this many steps."""
    resume_with: dict[str, Any] | None = None
    """The ``sync`` keyword arguments of that second run, when they differ (a changed part)."""
    finish: bool = False


@dataclass
class Record:
    before: list[torch.Tensor] = field(default_factory=list)
    after: list[torch.Tensor] = field(default_factory=list)
    comm: dict[str, float] = field(default_factory=dict)
    events: list[tuple[int, str, float]] = field(default_factory=list)
    resumed_after: list[torch.Tensor] = field(default_factory=list)
    resumed_before: list[torch.Tensor] = field(default_factory=list)
    final: torch.Tensor | None = None


def _drive(scenario: Scenario, rank: int, world: int, start: int = 0,
           state: tuple[dict[str, Any], list[torch.Tensor]] | None = None,
           keep: dict[str, Any] | None = None) -> Record:
    from threads import FakeTarget

    from localsgd.launch.env import DistInfo
    from localsgd.sync.accounting import CommMeter
    from localsgd.sync.config import SyncConfig
    from localsgd.sync.controller import SyncController

    lw = scenario.local_world
    info = DistInfo(rank, world, rank % lw, lw, torch.device("cpu"), "gloo")
    meter = CommMeter()
    keys = scenario.resume_with if state is not None and scenario.resume_with else scenario.sync
    ctl = SyncController.build(SyncConfig(**keys), info, meter, steps_per_epoch=10)
    target = FakeTarget(rank)
    if state is not None:
        ctl.load_state_dict(state[0])
        for mine, saved in zip(target.tensors(), state[1], strict=True):
            mine.copy_(saved)
    ctl.begin(target)
    rec = Record()
    for t in range(start, scenario.steps):
        target.local_step(t)
        rec.before.append(target.flat().clone())
        ctl.after_step(target)
        rec.after.append(target.flat().clone())
        if keep is not None and t + 1 == scenario.resume_at:
            keep["state"] = (ctl.state_dict(), [x.clone() for x in target.tensors()])
    if scenario.finish:
        ctl.finish(target)
        rec.final = target.flat().clone()
    rec.comm = meter.flat()
    rec.events = [(e.step, e.action, e.distance) for e in ctl.events]
    return rec


def _worker(rank: int, world: int, init: str, out: str, scenarios: list[Scenario]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank,
                            world_size=world)
    try:
        results: dict[str, Record] = {}
        for sc in scenarios:
            keep: dict[str, Any] = {}
            rec = _drive(sc, rank, world, keep=keep)
            if sc.resume_at is not None:
                again = _drive(sc, rank, world, start=sc.resume_at, state=keep["state"])
                rec.resumed_after, rec.resumed_before = again.after, again.before
            results[sc.name] = rec
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_processes(world: int, scenarios: list[Scenario], tmp: Path) -> list[dict[str, Record]]:
    """Every rank's records, by scenario name."""
    mp.spawn(_worker, args=(world, str(tmp / "rendezvous"), str(tmp), scenarios),
             nprocs=world, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
