"""The sync schedule as pure functions, checked against hand-written expectations."""

from __future__ import annotations

from localsgd.sync.config import SyncConfig
from localsgd.sync.controller import SyncController
from localsgd.sync.schedules.base import GLOBAL, LOCAL, MINIBATCH, NODE, Schedule


def sched(**kw: object) -> Schedule:
    return SyncController.schedule_for(SyncConfig(**kw), steps_per_epoch=10)


def test_minibatch_always_syncs_gradients_never_averages() -> None:
    s = sched()
    assert all(s.grad_sync(t) for t in range(100))
    assert all(s.action_after(t) is None for t in range(100))
    assert all(s.in_consensus(t) for t in range(100))


def test_local_averages_every_h_steps() -> None:
    s = sched(algorithm="local", period=4)
    assert not any(s.grad_sync(t) for t in range(20))
    assert [t for t in range(1, 20) if s.action_after(t) == GLOBAL] == [4, 8, 12, 16]
    assert s.in_consensus(8) and not s.in_consensus(9) and s.in_consensus(0)


def test_post_local_switches_at_epoch() -> None:
    s = sched(algorithm="post_local", period=3, switch_epoch=1.5)
    assert s.switch_step == 15
    assert [s.phase(t) for t in (14, 15)] == [MINIBATCH, LOCAL]
    assert s.grad_sync(14) and not s.grad_sync(15)
    assert [t for t in range(1, 30) if s.action_after(t) is not None] == [18, 21, 24, 27]
    assert s.in_consensus(15) and not s.in_consensus(16) and s.in_consensus(18)
    assert s.effective_period(14) == 1 and s.effective_period(15) == 3


def test_hierarchical_intra_every_h_global_every_h_times_hb() -> None:
    s = sched(algorithm="hierarchical", period=2, block_period=3, switch_step=4)
    actions = {t: s.action_after(t) for t in range(1, 20)}
    assert [t for t, a in actions.items() if a == GLOBAL] == [10, 16]
    assert [t for t, a in actions.items() if a == NODE] == [6, 8, 12, 14, 18]
    assert s.effective_period(5) == 6
