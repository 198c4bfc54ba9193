"""A resume with another part of each kind, mid-period and at a sync boundary: the resumed
run either continues as an independent computation says it must, or is refused before any
step with one line naming the changed keys (thread-tier workers, tests/sync/threads.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from threads import FakeTarget, Worker, run_workers

from localsgd.config.errors import ConfigError
from localsgd.sync.config import SyncConfig
from localsgd.sync.controller import SyncController
from localsgd.sync.reducers.compressed import CompressionKeys
from localsgd.sync.updates.outer import OuterOptimizerKeys

Saved = dict[int, tuple[dict, list[torch.Tensor]]]


def sync(**kw: object) -> SyncConfig:
    kw.setdefault("topology", "threads")
    kw.setdefault("reducer", "threads")
    return SyncConfig(algorithm="local", **kw)  # type: ignore[arg-type]


def checkpoint(cfg: SyncConfig, at: int, world: int = 4, local_world: int = 2,
               lr_at: Callable[[int], float] | None = None) -> Saved:
    """Each rank's controller state and tensors after ``at`` steps of ``cfg``."""
    saved: Saved = {}

    def keep(w: Worker, t: int) -> None:
        if t + 1 == at:
            saved[w.rank] = (w.controller.state_dict(), [x.clone() for x in w.target.tensors()])

    run_workers(cfg, steps=at, world=world, local_world=local_world, between=keep,
                lr_at=lr_at)
    return saved


def expected(saved: Saved, start: int, steps: int, syncs: set[int],
             mix: np.ndarray | None = None,
             outer: tuple[float, float] | None = None) -> list[list[np.ndarray]]:
    """Each rank's flat parameters after every step from ``start``, by hand: the same local
    steps, and at the steps in ``syncs`` the mean (or the mix ``mix``; or, with ``outer`` =
    (alpha, beta), an outer SGD step on an anchor that starts at the checkpoint's model)."""
    world = len(saved)
    targets = [FakeTarget(r) for r in range(world)]
    for r, t in enumerate(targets):
        for mine, kept in zip(t.tensors(), saved[r][1], strict=True):
            mine.copy_(kept)
    anchor = targets[0].flat().numpy().copy()
    velocity = np.zeros_like(anchor)
    out: list[list[np.ndarray]] = [[] for _ in range(world)]
    for step in range(start, steps):
        for t in targets:
            t.local_step(step)
        flat = np.stack([t.flat().numpy() for t in targets])
        if step + 1 in syncs:
            if mix is not None:
                new = mix @ flat
            elif outer is not None:
                alpha, beta = outer
                velocity = beta * velocity + (anchor - flat.mean(0))
                anchor = anchor - alpha * velocity
                new = np.stack([anchor] * world)
            else:
                new = np.stack([flat.mean(0)] * world)
            for t, row in zip(targets, new, strict=True):
                pos = 0
                for p in t.params:
                    p.copy_(torch.from_numpy(row[pos:pos + p.numel()]).reshape(p.shape))
                    pos += p.numel()
        for r, t in enumerate(targets):
            out[r].append(t.flat().numpy().copy())
    return out


def assert_follows(workers: list[Worker], want: list[list[np.ndarray]]) -> None:
    for w in workers:
        assert len(w.after) == len(want[w.rank])
        for got, exp in zip(w.after, want[w.rank], strict=True):
            np.testing.assert_allclose(got.numpy(), exp, rtol=0, atol=1e-12)


def refused(cfg: SyncConfig, saved: Saved, starts: str, **kw: object) -> str:
    with pytest.raises(ConfigError) as err:
        run_workers(cfg, steps=20, resume=saved, **kw)  # type: ignore[arg-type]
    (line,) = err.value.problems
    assert line.startswith(starts), line
    assert line.endswith("tart fresh with run.resume=false (or another run.dir)"), line
    return line


# schedule ------------------------------------------------------------------------------
def test_another_period_mid_period_keeps_the_models_apart_until_its_next_sync() -> None:
    saved = checkpoint(sync(period=4), at=6)
    assert not saved[0][0]["consensus"]
    new = sync(period=3)
    # Period 3 would end a sync at step 6: the checkpoint, not the schedule, says the
    # models differ there, so a run that ends right away still takes the final average.
    ended, _ = run_workers(new, steps=6, resume=saved, finish=True)
    mean = np.mean([t[1][0].numpy() for t in saved.values()], axis=0)
    for w in ended:
        np.testing.assert_allclose(w.target.params[0].numpy(), mean, rtol=0, atol=1e-12)
    resumed, _ = run_workers(new, steps=13, resume=saved)
    assert_follows(resumed, expected(saved, 6, 13, {9, 12}))


def test_another_period_at_a_boundary_continues_with_its_syncs() -> None:
    saved = checkpoint(sync(period=4), at=8)
    assert saved[0][0]["consensus"]
    resumed, _ = run_workers(sync(period=3), steps=13, resume=saved)
    # Events not yet logged travel in the checkpoint (4 and 8), then period 3's.
    assert [e.step for e in resumed[0].controller.events] == [4, 8, 9, 12]
    assert_follows(resumed, expected(saved, 8, 13, {9, 12}))


# period rule ---------------------------------------------------------------------------
def half(step: int) -> float:
    return 0.5


QSR = {"period_rule": "qsr", "qsr_alpha": 1.0}
"""(1.0 / 0.5)^2 = 4: periods of 4 steps, ending at 4, 8, 12."""


@pytest.mark.parametrize(("at", "syncs"), [(8, {12}), (6, {8, 12})],
                         ids=["mid-period", "boundary"])
def test_fixed_to_qsr_continues_with_the_rule_periods(at: int, syncs: set[int]) -> None:
    saved = checkpoint(sync(period=3), at=at)
    assert saved[0][0]["consensus"] == (at % 3 == 0)
    resumed, _ = run_workers(sync(period=3, **QSR), steps=13, resume=saved, lr_at=half)
    assert_follows(resumed, expected(saved, at, 13, syncs))


@pytest.mark.parametrize("at", [6, 8], ids=["mid-period", "boundary"])
def test_qsr_with_another_alpha_is_refused(at: int) -> None:
    saved = checkpoint(sync(period=3, **QSR), at=at, lr_at=half)
    line = refused(sync(period=3, period_rule="qsr", qsr_alpha=1.5), saved,
                   "sync.qsr_alpha: the checkpoint was written with 1.0, the recipe says 1.5; "
                   "its sync periods end at [0, 4, 8", lr_at=half)
    assert "this recipe's at [0, 9" in line


# topology ------------------------------------------------------------------------------
RING = np.array([[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]]) / 3
"""Metropolis weights of the 4-ring: each worker and its two neighbours, 1/3 each."""


@pytest.mark.parametrize("at", [5, 6], ids=["mid-period", "boundary"])
def test_ring_to_complete_averages_models_the_ring_left_apart(at: int) -> None:
    ring = sync(topology="threads_ring", reducer="auto", period=2)
    saved = checkpoint(ring, at=at, local_world=1)
    assert not saved[0][0]["consensus"]  # gossip never agrees, even after its syncs
    resumed, _ = run_workers(sync(period=2), steps=11, local_world=1, resume=saved)
    assert_follows(resumed, expected(saved, at, 11, {8, 10} | ({6} if at == 5 else set())))


@pytest.mark.parametrize("at", [5, 6], ids=["mid-period", "boundary"])
def test_complete_to_ring_mixes_from_the_checkpoint(at: int) -> None:
    saved = checkpoint(sync(period=2), at=at, local_world=1)
    assert saved[0][0]["consensus"] == (at == 6)
    ring = sync(topology="threads_ring", reducer="auto", period=2)
    resumed, _ = run_workers(ring, steps=11, local_world=1, resume=saved)
    syncs = {8, 10} | ({6} if at == 5 else set())
    assert_follows(resumed, expected(saved, at, 11, syncs, mix=RING))


# reducer -------------------------------------------------------------------------------
EF_SIGN = {"reducer": "auto", "compression": CompressionKeys(method="ef_sign")}


def test_compressed_reducer_mid_period_without_an_anchor_is_refused_before_any_sync() -> None:
    saved = checkpoint(sync(period=4), at=6)
    refused(sync(period=4, **EF_SIGN), saved,
            "sync.reducer: the checkpoint was written with threads, the recipe says auto "
            "(compressed); resuming mid-period needs the anchor (the model of the last sync) "
            "it never kept. Resume with sync.reducer=threads, or start fresh")
    # A checkpoint that recorded nothing about its parts is still checked.
    for state, _ in saved.values():
        del state["recipe"], state["consensus"]
    refused(sync(period=4, **EF_SIGN), saved, "sync.reducer: the checkpoint cannot be "
            "continued: resuming mid-period needs the anchor")


def test_compressed_reducer_at_a_boundary_takes_the_model_as_its_anchor() -> None:
    saved = checkpoint(sync(period=4), at=8)
    resumed, world = run_workers(sync(period=4, **EF_SIGN), steps=8, resume=saved)
    assert not any(world.everyone.calls.values())  # rebuilt without a collective
    for w in resumed:
        # What a compressed run holds right after a sync that ended on this model.
        state = w.controller.reducer.state_dict()
        params = saved[w.rank][1][:len(w.target.params)]
        assert state["seed"] == 8 and state["feedback"] == {"residuals": {}}
        # Flat per parameter (the sync's anchor); older checkpoints held them shaped.
        assert all(torch.equal(a, p.reshape(-1))
                   for a, p in zip(state["anchor"], params, strict=True))
        assert all(torch.equal(a, saved[0][1][i].reshape(-1))
                   for i, a in enumerate(state["anchor"]))


def test_error_feedback_residuals_refuse_another_bucket_layout() -> None:
    # A compressed checkpoint at a boundary, as its reducer writes it (its syncs need gloo's
    # all-gather, which the thread tier does not have).
    saved = checkpoint(sync(period=4), at=8)
    for state, tensors in saved.values():
        state["parts"]["reducer"] = {"anchor": [t.clone() for t in tensors[:3]], "seed": 8,
                                     "feedback": {"residuals": {"0:0:66": torch.zeros(66)}}}
        state["recipe"]["keys"] |= {"sync.reducer": "auto", "sync.compression.method": "ef_sign"}
    refused(sync(period=4, bucket_mb=0.0001, **EF_SIGN), saved,
            "sync.bucket_mb: the checkpoint was written with 25.0, the recipe says 0.0001; its "
            "error-feedback residuals are kept per averaging bucket")
    resumed, _ = run_workers(sync(period=4, **EF_SIGN), steps=8, resume=saved)
    assert "0:0:66" in resumed[0].controller.reducer.feedback.residuals


# update --------------------------------------------------------------------------------
OUTER = {"update": "outer",
         "outer": OuterOptimizerKeys(lr=0.7, momentum=0.5, scale_by_inner_lr=False)}


def test_outer_update_mid_period_without_an_anchor_is_refused() -> None:
    saved = checkpoint(sync(period=4), at=6)
    refused(sync(period=4, **OUTER), saved,
            "sync.update: the checkpoint was written with copy, the recipe says outer; "
            "resuming mid-period needs the anchor")


def test_outer_update_at_a_boundary_steps_from_the_checkpoint_model() -> None:
    saved = checkpoint(sync(period=4), at=8)
    resumed, _ = run_workers(sync(period=4, **OUTER), steps=17, resume=saved)
    assert_follows(resumed, expected(saved, 8, 17, {12, 16}, outer=(0.7, 0.5)))


@pytest.mark.parametrize("at", [6, 8], ids=["mid-period", "boundary"])
def test_outer_to_copy_averages_from_the_checkpoint(at: int) -> None:
    saved = checkpoint(sync(period=4, **OUTER), at=at)
    resumed, _ = run_workers(sync(period=4), steps=13, resume=saved)
    assert_follows(resumed, expected(saved, at, 13, {12} | ({8} if at == 6 else set())))


# runner --------------------------------------------------------------------------------
def landed(w: Worker, workers: list[Worker], started: int, lands: int, first: int) -> None:
    """The correction of the sync started after ``started`` steps lands after ``lands``:
    theta <- theta + mean(snapshot) - snapshot (indices of steps resumed at ``first``)."""
    snap = w.after[started - 1 - first].numpy()
    mean = np.mean([v.after[started - 1 - first].numpy() for v in workers], axis=0)
    np.testing.assert_allclose(w.after[lands - 1 - first].numpy(),
                               w.before[lands - 1 - first].numpy() + mean - snap,
                               rtol=0, atol=1e-12)


def test_average_in_flight_resumed_blocking_is_refused() -> None:
    saved = checkpoint(sync(period=4, overlap_steps=3), at=6)
    refused(sync(period=4), saved,
            "sync.overlap_steps: the checkpoint was written with 3, the recipe says 0; it "
            "holds the average of step 4 still in flight, which only an overlapped runner "
            "lands. Resume with sync.overlap_steps=3")


def test_average_in_flight_lands_at_its_step_with_another_tau() -> None:
    cfg = sync(period=4, overlap_steps=3)
    saved = checkpoint(cfg, at=6)
    full, _ = run_workers(cfg, steps=13)
    resumed, _ = run_workers(sync(period=4, overlap_steps=2), steps=13, resume=saved)
    for a, b in zip(full, resumed, strict=True):
        # The sync of step 4 lands at 7 as in the run that started it; the next at 8 + 2.
        assert all(torch.equal(x, y) for x, y in zip(a.after[6:8], b.after[:2], strict=True))
        landed(b, resumed, started=8, lands=10, first=6)
        assert [e.step for e in b.controller.events] == [4, 8]


def test_average_in_flight_refuses_other_fragments_or_an_earlier_sync() -> None:
    saved = checkpoint(sync(period=4, overlap_steps=2, fragments=2), at=5)
    assert saved[0][0]["parts"]["runner"]["waiting"]
    refused(sync(period=4, overlap_steps=2), saved,
            "sync.fragments: the checkpoint was written with 2, the recipe says 1; it holds "
            "an average in flight, started with the old sync.fragments")
    saved = checkpoint(sync(period=4, overlap_steps=3), at=5)
    refused(sync(period=3, overlap_steps=3), saved,
            "sync.period: the checkpoint was written with 4, the recipe says 3; the average "
            "in flight lands at step 7, after this recipe's next sync starts (step 6)")


@pytest.mark.parametrize("at", [6, 8], ids=["mid-period", "boundary"])
def test_blocking_to_overlapped_starts_its_first_average_at_the_next_sync(at: int) -> None:
    saved = checkpoint(sync(period=4), at=at)
    resumed, _ = run_workers(sync(period=4, overlap_steps=2), steps=15, resume=saved)
    first = 8 if at == 6 else 12
    for w in resumed:
        landed(w, resumed, started=first, lands=first + 2, first=at)
        assert [e.step for e in w.controller.events] == [4, 8, 12]


# another world size ------------------------------------------------------------------
def test_world_size_change_drops_averages_in_flight_and_checks_anchors() -> None:
    workers, _ = run_workers(sync(period=4, overlap_steps=3), steps=6)
    states = [w.controller.state_dict() for w in workers]
    assert states[0]["parts"]["runner"]["pending"]
    ctl = workers[0].controller
    # The merged run starts at an epoch's first step from the average of the models; a
    # blocking runner there has nothing in flight to land.
    blocking = SyncController(sync(period=4), ctl.schedule, ctl.info, ctl.meter)
    blocking.load_merged(states, step=4)
    assert blocking.step == 4 and blocking.in_consensus()
    compressed = SyncController(sync(period=4, **EF_SIGN), ctl.schedule, ctl.info, ctl.meter)
    with pytest.raises(ConfigError, match="sync.reducer: the checkpoint in ckpt was written "
                                          "with threads, the recipe says auto"):
        compressed.load_merged(states, step=2, where="ckpt")
    compressed.load_merged(states, step=4, where="ckpt")  # a boundary: the model is the anchor
