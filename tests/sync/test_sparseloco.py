"""SparseLoCo's sync in the thread tier: chunked top-k, 2-bit values, decayed error feedback
and a plain outer SGD step, replayed in float64 numpy from the workers' parameters before
every sync, independently of the package:

    e_i <- beta e_i + (anchor - theta_i),  s_i = Q(chunk-top-k(e_i)),  e_i <- e_i - s_i,
    anchor <- anchor - alpha mean_i s_i,    every worker takes the anchor.

Then: the residuals in a checkpoint resume bitwise, and merge on a world-size change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sparse_codecs import np_chunks, np_keep, np_quantize
from threads import SEGMENTS, FakeTarget, Worker, run_workers

from localsgd.sync.config import SyncConfig
from localsgd.sync.controller import SyncController
from localsgd.sync.reducers.compressed import CompressionKeys
from localsgd.sync.updates.outer import OuterOptimizerKeys

CHUNK, RATIO, BITS = 16, 0.25, 2


def sparseloco(alpha: float, beta: float, **kw: object) -> SyncConfig:
    keys = {"algorithm": "local", "period": 2, **kw}
    return SyncConfig(topology="threads", reducer="threads_compressed",  # type: ignore[arg-type]
                      compression=CompressionKeys(method="chunk_topk", chunk=CHUNK, ratio=RATIO,
                                                  bits=BITS, error_feedback=True,
                                                  feedback_decay=beta),
                      update="outer",
                      outer=OuterOptimizerKeys(lr=alpha, momentum=0.0, nesterov=False,
                                               scale_by_inner_lr=False), **keys)


def np_sent(m: np.ndarray) -> np.ndarray:
    """Q(chunk-top-k(m)) of a flat FakeTarget model, decoded."""
    kept = np.zeros(len(m), bool)
    for a, b in np_chunks(SEGMENTS, CHUNK):
        kept[a + np.argsort(-np.abs(m[a:b]))[:np_keep(RATIO, b - a)]] = True
    where = np.flatnonzero(kept)
    groups = np.searchsorted([a for a, _ in SEGMENTS], where, side="right") - 1
    book, code = np_quantize(m[where], groups, len(SEGMENTS), BITS)
    out = np.zeros_like(m)
    out[where] = book[groups, code]
    return out


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.95), (0.7, 0.5), (1.0, 1.0)])
def test_sparseloco_syncs_follow_the_replay(world: int, alpha: float, beta: float) -> None:
    workers, _ = run_workers(sparseloco(alpha, beta), steps=10, world=world)
    anchor = FakeTarget(0).flat().numpy().copy()
    residual = np.zeros((world, len(anchor)))
    for t in range(10):
        before = np.stack([w.before[t].numpy() for w in workers])
        after = np.stack([w.after[t].numpy() for w in workers])
        if (t + 1) % 2:
            np.testing.assert_array_equal(after, before)
            continue
        sent = []
        for i in range(world):
            residual[i] = beta * residual[i] + (anchor - before[i])
            s = np_sent(residual[i])
            residual[i] -= s
            sent.append(s)
        anchor = anchor - alpha * np.mean(sent, axis=0)
        for row in after:
            np.testing.assert_allclose(row, anchor, rtol=1e-6, atol=1e-9)
        for i, w in enumerate(workers):
            if t == 9:  # the worker's own residuals, per parameter
                feedback = w.controller.reducer.feedback  # type: ignore[attr-defined]
                mine = torch.cat([feedback.residuals[f"param{j}@0"] for j in range(3)])
                np.testing.assert_allclose(mine.numpy(), residual[i], rtol=1e-6, atol=1e-9)
    # Something was really dropped: a residual is owed, and the models moved.
    assert np.abs(residual).max() > 1e-3
    assert not np.allclose(anchor, FakeTarget(0).flat().numpy())


def test_residuals_in_the_checkpoint_resume_bitwise() -> None:
    cfg = sparseloco(1.0, 0.95)
    a, _ = run_workers(cfg, steps=8, world=4)
    states: dict[int, tuple[dict, list[torch.Tensor]]] = {}

    def keep(w: Worker, t: int) -> None:
        if t == 4:  # mid-period, after 2 syncs: residuals and the anchor are owed
            states[w.rank] = (w.controller.state_dict(), [x.clone() for x in w.target.tensors()])

    run_workers(cfg, steps=5, world=4, between=keep)
    saved = states[0][0]["parts"]["reducer"]["feedback"]["residuals"]
    assert sorted(saved) == ["param0@0", "param1@0", "param2@0"]
    assert any(r.abs().max() > 0 for r in saved.values())
    resumed, _ = run_workers(cfg, steps=8, world=4, resume=states)
    for x, y in zip(a, resumed, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x.after[5:], y.after, strict=True))


def test_residuals_merge_as_their_mean_on_a_world_size_change() -> None:
    cfg = sparseloco(1.0, 0.95)
    workers, _ = run_workers(cfg, steps=4, world=4)
    states = [w.controller.state_dict() for w in workers]
    ctl = workers[0].controller
    two = SyncController(cfg, ctl.schedule, ctl.info, ctl.meter)
    two.load_merged(states, step=4)
    merged = two.reducer.feedback.residuals  # type: ignore[attr-defined]
    for key in ("param0@0", "param1@0", "param2@0"):
        old = [s["parts"]["reducer"]["feedback"]["residuals"][key].numpy() for s in states]
        np.testing.assert_allclose(merged[key].numpy(), np.mean(old, axis=0), rtol=1e-12)
        assert np.abs(np.mean(old, axis=0)).max() > 0
    assert two.reducer.feedback.decay == 0.95  # type: ignore[attr-defined]
    assert all(torch.equal(x, y) for x, y in zip(two.anchor.tensors,  # type: ignore[union-attr]
                                                 ctl.anchor.tensors, strict=True))
