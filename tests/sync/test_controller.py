"""The sync controller and its parts, in process: K thread workers on fake targets.

Every expectation is computed independently (numpy means and norms of the workers' own
tensors) and compared with what the controller did; collective counts are compared with the
schedule's pure functions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from threads import FakeTarget, Worker, run_workers

from localsgd.registry import Part
from localsgd.sync.config import SyncConfig
from localsgd.sync.controller import SyncController, SyncObserver
from localsgd.sync.parts import UPDATES
from localsgd.sync.schedules.base import GLOBAL, NODE
from localsgd.sync.updates.copy import Copy

SMALL_BUCKET = 16 * 8 / 2**20  # 16 float64 elements
PARAMS = 40 + 21 + 5


def sync(**kw: object) -> SyncConfig:
    return SyncConfig(topology="threads", reducer="threads", **kw)  # type: ignore[arg-type]


def mean_of(workers: list[Worker], step: int, ranks: list[int]) -> np.ndarray:
    return np.mean([workers[r].before[step].numpy() for r in ranks], axis=0)


@pytest.mark.parametrize("world", [4, 8])
def test_local_sgd_averages_exactly_every_h_steps(world: int) -> None:
    workers, _ = run_workers(sync(algorithm="local", period=4), steps=14, world=world)
    for t in range(14):
        step = t + 1
        if step % 4 == 0:
            expected = mean_of(workers, t, list(range(world)))
            for w in workers:
                np.testing.assert_allclose(w.after[t].numpy(), expected, rtol=1e-12,
                                           atol=1e-14)
            assert all(torch.equal(w.after[t], workers[0].after[t]) for w in workers)
        else:
            assert all(torch.equal(w.after[t], w.before[t]) for w in workers)
            assert not torch.equal(workers[0].after[t], workers[1].after[t])


def test_hierarchical_averages_nodes_then_everyone() -> None:
    cfg = sync(algorithm="hierarchical", period=2, block_period=3)
    workers, _ = run_workers(cfg, steps=13, world=4, local_world=2)
    for t in range(13):
        step = t + 1
        for node in ([0, 1], [2, 3]):
            if step % 6 == 0:
                ranks = [0, 1, 2, 3]
            elif step % 2 == 0:
                ranks = node
            else:
                continue
            for r in node:
                np.testing.assert_allclose(workers[r].after[t].numpy(),
                                           mean_of(workers, t, ranks), rtol=1e-12, atol=1e-14)
        across = torch.equal(workers[0].after[t], workers[2].after[t])
        assert across == (step % 6 == 0), step
    actions = [e.action for e in workers[0].controller.pop_events()]
    assert actions == [NODE, NODE, GLOBAL, NODE, NODE, GLOBAL]


def test_consensus_distance_matches_an_independent_norm() -> None:
    workers, _ = run_workers(sync(algorithm="local", period=5), steps=15)
    for w in workers:
        events = w.controller.pop_events()
        assert [e.step for e in events] == [5, 10, 15]
        for e in events:
            t = e.step - 1
            mean = mean_of(workers, t, [0, 1, 2, 3])
            expected = float(np.linalg.norm(w.before[t].numpy() - mean))
            assert expected > 0 and e.distance == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(("algorithm", "extra"), [
    ("minibatch", {}), ("local", {"period": 3}),
    ("post_local", {"period": 3, "switch_step": 5}),
    ("hierarchical", {"period": 2, "block_period": 2, "switch_step": 3}),
])
def test_collectives_and_bytes_follow_the_schedule(algorithm: str, extra: dict) -> None:
    cfg = sync(algorithm=algorithm, bucket_mb=SMALL_BUCKET, **extra)
    steps = 17
    workers, world = run_workers(cfg, steps=steps)
    schedule = SyncController.schedule_for(cfg, 10)
    actions = [schedule.action_after(s) for s in range(1, steps + 1)]
    # With buffers averaged: 66 parameter + 3 buffer elements share 16-element buckets.
    buckets = math.ceil((PARAMS + 3) / 16)
    syncs = sum(a is not None for a in actions)
    for w in workers:
        own = world.everyone.calls[w.rank] + sum(n.calls[w.rank] for n in world.nodes)
        assert own == syncs * buckets
        totals = w.meter.totals["average"]
        assert (totals.calls, totals.bytes) == (syncs * buckets, syncs * (PARAMS + 3) * 8)
        assert world.everyone.calls[w.rank] == sum(a == GLOBAL for a in actions) * buckets


@pytest.mark.parametrize("policy", ["local", "average", "reset"])
def test_momentum_policy_at_a_sync(policy: str) -> None:
    workers, _ = run_workers(sync(algorithm="local", period=4, momentum=policy), steps=4)
    momentum = [torch.cat([m.reshape(-1) for m in w.target.momentum]) for w in workers]
    if policy == "reset":
        assert all(float(m.abs().max()) == 0.0 for m in momentum)
    elif policy == "average":
        assert all(torch.equal(m, momentum[0]) for m in momentum)
        # Independent: replay each rank's momentum without any sync and average it.
        alone = [FakeTarget(r) for r in range(4)]
        for t in range(4):
            for a in alone:
                a.local_step(t)
        expected = np.mean([torch.cat([m.reshape(-1) for m in a.momentum]).numpy()
                            for a in alone], axis=0)
        np.testing.assert_allclose(momentum[0].numpy(), expected, rtol=1e-12, atol=1e-14)
    else:
        assert not torch.equal(momentum[0], momentum[1])


@pytest.mark.parametrize("average_buffers", [True, False])
def test_buffers_follow_the_parameters_or_stay_local(average_buffers: bool) -> None:
    cfg = sync(algorithm="local", period=2, average_buffers=average_buffers)
    workers, _ = run_workers(cfg, steps=2, finish=False)
    floats = [w.target.buffers[0] for w in workers]
    assert all(torch.equal(b, floats[0]) for b in floats) == average_buffers
    # Integer buffers (BatchNorm's batch counter) are never averaged.
    assert all(int(w.target.buffers[1]) == 2 for w in workers)
    assert all(w.target.refreshed == 1 for w in workers)


def test_finish_leaves_the_consensus_with_buffers() -> None:
    cfg = sync(algorithm="local", period=4, average_buffers=False)
    workers, _ = run_workers(cfg, steps=6, finish=True)
    for w in workers:
        assert torch.equal(w.target.flat(), workers[0].target.flat())
        assert torch.equal(w.target.buffers[0], workers[0].target.buffers[0])
        assert [e.action for e in w.controller.pop_events()] == [GLOBAL, "final"]


def test_averaged_copy_leaves_workers_untouched() -> None:
    copies: dict[int, torch.nn.Module] = {}

    def evaluate(w: Worker, t: int) -> None:
        if t == 5:  # between the syncs at steps 4 and 8
            out = torch.nn.Module()
            for i, p in enumerate(w.target.params):
                out.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros_like(p)))
            out.register_buffer("b", torch.zeros(3, dtype=torch.float64))
            out.register_buffer("n", torch.zeros((), dtype=torch.long))
            before = w.target.flat().clone()
            w.controller.averaged_copy(w.target, out)
            assert torch.equal(w.target.flat(), before)
            copies[w.rank] = out

    workers, _ = run_workers(sync(algorithm="local", period=4), steps=6, between=evaluate)
    got = torch.cat([p.detach().reshape(-1) for p in copies[0].parameters()])
    expected = np.mean([w.after[5].numpy() for w in workers], axis=0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)
    assert workers[0].meter.totals["eval"].calls == 1


class Recorder(SyncObserver):
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def before_sync(self, step: int, action: str, target: object) -> None:
        self.seen.append(("before", step))

    def after_sync(self, step: int, action: str, distance: float, target: object) -> None:
        self.seen.append(("after", step))

    def after_step(self, step: int, action: str | None, target: object) -> None:
        self.seen.append(("step", step))


def test_observers_see_every_step_and_sync_in_order() -> None:
    recorders = {r: Recorder() for r in range(4)}
    run_workers(sync(algorithm="local", period=2), steps=4,
                observers=lambda r: [recorders[r]])
    assert recorders[3].seen == [("step", 1), ("before", 2), ("after", 2), ("step", 2),
                                 ("step", 3), ("before", 4), ("after", 4), ("step", 4)]


@UPDATES.register
class CountingCopy(Copy):
    """A stateful update written as a new part would be: one class, its state, its merge."""

    name = "counting_copy"

    def __init__(self, cfg: object) -> None:
        self.applied = 0

    def apply(self, index: int, start: int, local: torch.Tensor, reduced: torch.Tensor,
              out: torch.Tensor) -> None:
        self.applied += reduced.numel()
        super().apply(index, start, local, reduced, out)

    def state_dict(self) -> dict[str, int]:
        return {"applied": self.applied}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.applied = int(state.get("applied", 0))

    @classmethod
    def merge_states(cls, states: list[dict[str, int]]) -> dict[str, int]:
        return {"applied": max(s["applied"] for s in states)}


def test_a_new_stateful_part_is_checkpointed_and_merged_by_the_controller() -> None:
    cfg = sync(algorithm="local", period=3, update="counting_copy")
    workers, _ = run_workers(cfg, steps=7)
    ctl = workers[0].controller
    assert ctl.update.applied == 2 * PARAMS  # parameters only: buffers are copied
    state = ctl.state_dict()
    assert state["step"] == 7 and state["parts"]["update"] == {"applied": 2 * PARAMS}
    fresh = SyncController(cfg, ctl.schedule, ctl.info, ctl.meter)
    fresh.load_state_dict(state)
    assert (fresh.step, fresh.update.applied) == (7, 2 * PARAMS)
    assert [(e.step, e.distance) for e in fresh.events] == [(e.step, e.distance)
                                                           for e in ctl.events]
    states = [w.controller.state_dict() for w in workers]
    states[1]["parts"]["update"]["applied"] = 999
    fresh.load_merged(states, step=3)
    assert (fresh.step, fresh.update.applied, fresh.events) == (3, 999, [])


def test_one_worker_never_syncs() -> None:
    workers, world = run_workers(sync(algorithm="local", period=1), steps=3, world=1,
                                 local_world=1)
    assert world.everyone.calls[0] == 0 and workers[0].controller.events == []


def test_parts_of_a_section_are_found_by_name() -> None:
    assert isinstance(Part, type)
    from localsgd.sync.parts import PART_KINDS

    names = {kind: reg.names() for kind, (_, reg) in PART_KINDS.items()}
    assert {"minibatch", "local", "post_local", "hierarchical"} <= set(names["schedule"])
    assert {"complete"} <= set(names["topology"]) and "mean" in names["reducer"]
    assert "copy" in names["update"] and "blocking" in names["runner"]
