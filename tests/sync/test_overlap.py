"""Overlapped averaging (sync.overlap_steps = tau), in process on thread workers.

The rule: the average starts at a sync step s from a snapshot, and after step s + tau each
worker's tensors become theta + (mean of the snapshots - own snapshot). Each expectation is
computed from the workers' own recorded tensors, independently of the averager.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_refused
from threads import Worker, run_workers

from localsgd.config import ConfigError
from localsgd.recipe import load_config
from localsgd.sync.config import SyncConfig
from localsgd.sync.runners.overlapped import Overlapped


def sync(**kw: object) -> SyncConfig:
    return SyncConfig(topology="threads", reducer="threads", **kw)  # type: ignore[arg-type]


def snapshot(w: Worker, t: int) -> np.ndarray:
    """What worker ``w`` sent at step index ``t``: its tensors after that step, a correction
    landing at the same step (tau = period) included; a start changes nothing itself."""
    return w.after[t].numpy()


def snapshot_mean(workers: list[Worker], t: int) -> np.ndarray:
    return np.mean([snapshot(w, t) for w in workers], axis=0)


@pytest.mark.parametrize(("period", "tau"), [(4, 1), (4, 2), (4, 4), (3, 3)])
def test_correction_lands_tau_steps_later_and_keeps_local_progress(period: int,
                                                                   tau: int) -> None:
    cfg = sync(algorithm="local", period=period, overlap_steps=tau)
    steps = 3 * period + tau
    workers, _ = run_workers(cfg, steps=steps)
    assert isinstance(workers[0].controller.runner, Overlapped)
    starts = [s for s in range(1, steps + 1) if s % period == 0]
    dues = {s + tau: s for s in starts}
    for t in range(steps):
        step = t + 1
        for w in workers:
            if step in dues:
                s = dues[step] - 1
                expected = w.before[t].numpy() + snapshot_mean(workers, s) - snapshot(w, s)
                np.testing.assert_allclose(w.after[t].numpy(), expected, rtol=1e-12,
                                           atol=1e-13)
            else:
                assert torch.equal(w.after[t], w.before[t]), step
    # The workers never agree exactly (each keeps its own progress since the snapshot) ...
    assert not torch.equal(workers[0].after[-1], workers[1].after[-1])
    # ... and each event carries the start step and the snapshot's consensus distance.
    events = workers[0].controller.pop_events()
    assert [e.step for e in events] == [s for s in starts if s + tau <= steps]
    for e in events:
        s = e.step - 1
        mean = snapshot_mean(workers, s)
        own = snapshot(workers[0], s)
        assert e.distance == pytest.approx(float(np.linalg.norm(own - mean)), rel=1e-10)


def test_counts_match_blocking_and_waiting_is_its_own_metric() -> None:
    blocking, _ = run_workers(sync(algorithm="local", period=4), steps=12)
    overlapped, world = run_workers(sync(algorithm="local", period=4, overlap_steps=2),
                                    steps=14)
    for b, o in zip(blocking, overlapped, strict=True):
        tb, to = b.meter.totals["average"], o.meter.totals["average"]
        assert (to.calls, to.bytes) == (tb.calls, tb.bytes) == (3, 3 * (66 + 3) * 8)
        assert 0 <= to.wait_s <= to.seconds
        assert tb.wait_s == tb.seconds > 0
        assert "comm/average/wait_s" in o.meter.flat()


def test_finish_lands_the_last_correction_then_takes_the_exact_consensus() -> None:
    cfg = sync(algorithm="local", period=4, overlap_steps=3)
    workers, _ = run_workers(cfg, steps=9, finish=True)  # started at 8, due at 11
    flat = [w.target.flat() for w in workers]
    assert all(torch.equal(f, flat[0]) for f in flat)
    assert [(e.step, e.action) for e in workers[0].controller.pop_events()] == [
        (4, "global"), (8, "global"), (9, "final")]


@pytest.mark.parametrize("policy", ["local", "average", "reset"])
def test_buffers_and_momentum_follow_the_rule_of_their_policy(policy: str) -> None:
    cfg = sync(algorithm="local", period=4, overlap_steps=2, momentum=policy)
    workers, _ = run_workers(cfg, steps=6)
    n_params, n_buffers = 66, 3 + 1
    momentum = slice(n_params + n_buffers, None)
    started = np.mean([w.whole_after[3].numpy() for w in workers], axis=0)
    for w in workers:
        before, after = w.whole_before[5].numpy(), w.whole_after[5].numpy()
        corrected = before + started - w.whole_after[3].numpy()
        # Parameters are corrected, the float buffer takes the snapshots' average and the
        # integer counter is untouched.
        np.testing.assert_allclose(after[:n_params], corrected[:n_params], rtol=1e-12,
                                   atol=1e-13)
        np.testing.assert_allclose(after[n_params:n_params + 3],
                                   started[n_params:n_params + 3], rtol=1e-12, atol=1e-13)
        assert after[n_params + 3] == before[n_params + 3] == 6
        if policy == "average":
            np.testing.assert_allclose(after[momentum], corrected[momentum], rtol=1e-12,
                                       atol=1e-13)
        elif policy == "reset":
            assert not after[momentum].any() and before[momentum].any()
        else:
            assert np.array_equal(after[momentum], before[momentum])


def test_checkpoint_with_an_average_in_flight_resumes_bitwise() -> None:
    cfg = sync(algorithm="local", period=4, overlap_steps=3)
    saved: dict[int, tuple[dict, list[torch.Tensor]]] = {}

    def checkpoint(w: Worker, t: int) -> None:
        if t == 5:  # step 6: started at 4, due at 7
            state = w.controller.state_dict()
            assert len(state["parts"]["runner"]["pending"]) == 1
            saved[w.rank] = (state, [x.clone() for x in w.target.tensors()])

    full, _ = run_workers(cfg, steps=13, between=checkpoint)
    resumed, _ = run_workers(cfg, steps=13, resume=saved)
    for a, b in zip(full, resumed, strict=True):
        assert len(b.after) == 7
        assert all(torch.equal(x, y) for x, y in zip(a.after[6:], b.after, strict=True))
        assert [(e.step, e.distance) for e in a.controller.events] == [
            (e.step, e.distance) for e in b.controller.events]
        assert [e.step for e in b.controller.events] == [4, 8]  # 12 lands at 15
    merged = Overlapped.merge_states([saved[0][0]["parts"]["runner"]])
    assert merged == {"pending": [], "waiting": [], "partial": []}


@pytest.mark.parametrize(("overrides", "text"), [
    (["sync.algorithm=local", "sync.period=4", "sync.overlap_steps=5"],
     "sync.overlap_steps: 5 exceeds sync.period=4"),
    (["sync.algorithm=local", "sync.runner=overlapped"],
     "sync.overlap_steps: must be >= 1 with sync.runner=overlapped"),
    (["sync.algorithm=local", "sync.overlap_steps=-3"], "sync.overlap_steps: must be >= 0"),
    (["sync.algorithm=local", "sync.runner=overlaped"],
     "sync.runner: unknown value 'overlaped'; did you mean 'overlapped'"),
])
def test_bad_overlap_settings_are_one_line_each(overrides: list[str], text: str) -> None:
    assert_refused(overrides, text)


def test_blocking_run_refuses_a_checkpoint_with_an_average_in_flight() -> None:
    from localsgd.sync.runners.blocking import Blocking

    with pytest.raises(ConfigError, match="sync.overlap_steps: the checkpoint holds an "
                                          "average still in flight"):
        Blocking(None, None).load_state_dict({"pending": [[4, 6, "global", {}]]})
    Blocking(None, None).load_state_dict({})  # a blocking checkpoint is fine


def test_overlap_steps_picks_the_runner_and_blocking_ignores_it() -> None:
    assert load_config(None, ["sync.algorithm=local", "sync.period=4",
                              "sync.overlap_steps=2"]).sync.overlap_steps == 2
    with pytest.warns(UserWarning, match="sync.overlap_steps: has no effect with "
                                         "sync.runner=blocking"):
        load_config(None, ["sync.algorithm=local", "sync.runner=blocking",
                           "sync.overlap_steps=2"])


def test_hierarchical_overlaps_node_and_global_averages() -> None:
    cfg = sync(algorithm="hierarchical", period=2, block_period=2, overlap_steps=1)
    workers, _ = run_workers(cfg, steps=9, world=4, local_world=2)
    for t in range(9):
        step = t + 1
        started = step - 1
        for w in workers:
            if started >= 2 and started % 2 == 0:  # an average started at `started` lands
                s = started - 1
                ranks = [0, 1, 2, 3] if started % 4 == 0 else (
                    [0, 1] if w.rank < 2 else [2, 3])
                mean = np.mean([snapshot(workers[r], s) for r in ranks], axis=0)
                np.testing.assert_allclose(w.after[t].numpy(),
                                           w.before[t].numpy() + mean - snapshot(w, s),
                                           rtol=1e-12, atol=1e-13)
            else:
                assert torch.equal(w.after[t], w.before[t]), step
    assert [(e.step, e.action) for e in workers[0].controller.events] == [
        (2, "intra"), (4, "global"), (6, "intra"), (8, "global")]


def test_fragments_stream_the_model_and_hold_a_fraction_of_it() -> None:
    """F=2, H=4, tau=1: fragment 0 (the first 40-element parameter) starts at the sync step
    and lands one step later; fragment 1 (the rest: 21 + 5 parameter elements and the
    3-element buffer) starts two steps after the sync and lands one step after that."""
    cfg = sync(algorithm="local", period=4, overlap_steps=1, fragments=2)
    workers, _ = run_workers(cfg, steps=8)
    parts = [slice(0, 40), slice(40, 66)]
    starts = {5: (3, parts[0]), 7: (5, parts[1])}  # landing step -> (start index, elements)
    for t in range(8):
        for w in workers:
            changed = w.after[t] != w.before[t]
            if t + 1 not in starts:
                assert not changed.any(), t + 1
                continue
            s, part = starts[t + 1]
            expected = (w.before[t].numpy()[part] + snapshot_mean(workers, s)[part]
                        - snapshot(w, s)[part])
            np.testing.assert_allclose(w.after[t].numpy()[part], expected, rtol=1e-12,
                                       atol=1e-13)
            others = torch.ones(66, dtype=torch.bool)
            others[part] = False
            assert changed[part].all() and not changed[others].any(), t + 1
    # One event per sync, its distance combining both fragments' (each at its own start).
    (event,) = workers[0].controller.events
    sq = sum(float(np.sum((snapshot(workers[0], s)[part] - snapshot_mean(workers, s)[part])
                          ** 2)) for s, part in starts.values())
    assert (event.step, event.action) == (4, "global")
    assert event.distance == pytest.approx(sq ** 0.5, rel=1e-10)


def test_fragments_bound_the_memory_in_flight() -> None:
    peak = {}
    for parts in (1, 2):
        cfg = sync(algorithm="local", period=4, overlap_steps=1, fragments=parts)
        workers, _ = run_workers(cfg, steps=8)
        peak[parts] = workers[0].controller.runner.peak_bytes
    # Snapshot + reduce buffer: the whole 69-element float64 sync, or its larger fragment.
    assert peak == {1: 2 * 69 * 8, 2: 2 * 40 * 8}


def test_a_checkpoint_between_fragments_resumes_bitwise() -> None:
    cfg = sync(algorithm="local", period=4, overlap_steps=1, fragments=2)
    saved: dict[int, tuple[dict, list[torch.Tensor]]] = {}

    def checkpoint(w: Worker, t: int) -> None:
        if t == 5:  # step 6: fragment 0 landed at 5, fragment 1 started at 6, due at 7
            state = w.controller.state_dict()
            runner = state["parts"]["runner"]
            assert len(runner["pending"]) == 1 and runner["partial"]
            saved[w.rank] = (state, [x.clone() for x in w.target.tensors()])

    full, _ = run_workers(cfg, steps=12, between=checkpoint)
    resumed, _ = run_workers(cfg, steps=12, resume=saved)
    for a, b in zip(full, resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.after[6:], b.after, strict=True))
        assert [(e.step, e.distance) for e in a.controller.events] == [
            (e.step, e.distance) for e in b.controller.events]


@pytest.mark.parametrize(("overrides", "text"), [
    (["sync.fragments=3"], "sync.fragments: 3 does not divide sync.period=4"),
    (["sync.fragments=2", "sync.overlap_steps=3"],
     "sync.overlap_steps: 3 exceeds sync.period / sync.fragments = 2"),
    (["sync.fragments=0"], "sync.fragments: must be >= 1"),
])
def test_bad_fragment_settings(overrides: list[str], text: str) -> None:
    assert_refused(["sync.algorithm=local", "sync.period=4", "sync.overlap_steps=1", *overrides],
                   text)
