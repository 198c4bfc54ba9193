"""CHOCO-SGD (sync.reducer=choco) on thread workers, replayed in float64 numpy.

The thread workers run the real ring topology and the real ``choco`` reducer (a shared
mailbox carries the point-to-point sends). The replay follows the paper's rule as stated,
with one public copy x_hat_j per worker j (starting at 0) that every holder updates alike,
and a ring matrix built here:

    q_i = C(x_i - x_hat_i),   x_hat_i += q_i   (every i),
    x_i <- x_i + gamma sum_j W_ij (x_hat_j - x_hat_i),

C the per-tensor scaled sign (mean |m| times the sign, 0 counting as +), top-k of the whole
bucket, or nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_refused
from threads import Worker, ring_mixing, run_workers, scaled_sign

from localsgd.config import ConfigError
from localsgd.recipe import load_config
from localsgd.sync.config import SyncConfig
from localsgd.sync.reducers.choco import ChocoOptions
from localsgd.sync.reducers.compressed import CompressionKeys


def top_k(m: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(m)
    keep = np.argsort(-np.abs(m), kind="stable")[:k]
    out[keep] = m[keep]
    return out


CODECS = {"none": lambda m: m, "sign": scaled_sign,
          "topk": lambda m: top_k(m, math.ceil(0.1 * 66))}


def choco(method: str, gamma: float, period: int = 1, **kw: object) -> SyncConfig:
    ratio = {"ratio": 0.1} if method == "topk" else {}
    if method == "topk":  # top-k of the whole bucket: only the parameters in it
        kw.setdefault("average_buffers", False)
    return SyncConfig(algorithm="local", period=period, topology="threads_ring",  # type: ignore[arg-type]
                      reducer="choco", compression=CompressionKeys(method=method, **ratio),
                      choco=ChocoOptions(gamma=gamma), **kw)


class Replay:
    def __init__(self, k: int, method: str, gamma: float) -> None:
        self.w, self.c, self.gamma = ring_mixing(k), CODECS[method], gamma
        self.hat = np.zeros((k, 66))

    def sync(self, x: np.ndarray) -> np.ndarray:
        for i in range(len(x)):
            self.hat[i] = self.hat[i] + self.c(x[i] - self.hat[i])
        pull = self.w @ self.hat - self.hat  # sum_j W_ij (x_hat_j - x_hat_i), rows summing to 1
        return x + self.gamma * pull


def stacked(workers: list[Worker], t: int, after: bool = False) -> np.ndarray:
    return np.stack([(w.after if after else w.before)[t].numpy() for w in workers])


@pytest.mark.parametrize("k", [4, 8])
@pytest.mark.parametrize(("method", "gamma", "period"), [
    ("none", 1.0, 1),    # plain gossip x <- W x
    ("none", 0.5, 2),
    ("sign", 0.4, 1),
    ("topk", 0.3, 2),
])
def test_choco_follows_the_replay(k: int, method: str, gamma: float, period: int) -> None:
    steps = 10
    workers, world = run_workers(choco(method, gamma, period), steps=steps, world=k,
                                 local_world=1)
    replay = Replay(k, method, gamma)
    syncs = 0
    for t in range(steps):
        before, after = stacked(workers, t), stacked(workers, t, after=True)
        if (t + 1) % period:
            np.testing.assert_array_equal(after, before)
            continue
        syncs += 1
        expected = replay.sync(before)
        np.testing.assert_allclose(after, expected, rtol=1e-9, atol=1e-12)
        if method == "none" and gamma == 1.0:
            np.testing.assert_allclose(after, ring_mixing(k) @ before, rtol=0, atol=1e-12)
    # Point to point only, one payload per neighbour and sync.
    assert sum(world.everyone.calls.values()) == 0
    assert world.mailbox.sent[0] == 2 * syncs
    assert all(math.isnan(e.distance) for e in workers[0].controller.events)


def test_bytes_are_the_payloads_and_memory_the_two_public_copies() -> None:
    workers, _ = run_workers(choco("sign", 0.5), steps=4, world=4, local_world=1)
    ctl = workers[0].controller
    # One bucket: 66 parameters and 3 BatchNorm-like floats, 4 tensors: 1 sign bit each
    # packed in int32 words, one float32 scale per tensor, to each of 2 neighbours.
    payload = math.ceil(69 / 32) * 4 + 4 * 4
    totals = workers[0].meter.totals
    assert (totals["gossip"].calls, totals["gossip"].bytes) == (4, 4 * 2 * payload)
    assert ctl.extra_memory()["reducer"] == 2 * 69 * 8
    assert ctl.anchor is None
    assert ctl.extra_bytes() == sum(ctl.extra_memory().values())


@pytest.mark.parametrize("method", ["sign", "randomk", "sign_overlapped"])
def test_a_checkpoint_between_syncs_resumes_bitwise(method: str) -> None:
    # Overlapped: period 4, tau 2, so the sync of step 4 is in flight at the checkpoint.
    overlapped = method == "sign_overlapped"
    cfg = choco(method.removesuffix("_overlapped"), 0.5, period=4 if overlapped else 2,
                overlap_steps=2 if overlapped else 0)
    if method == "randomk":
        cfg.compression.ratio = 0.25
    saved: dict[int, tuple[dict, list[torch.Tensor]]] = {}

    def checkpoint(w: Worker, t: int) -> None:
        if t == 4:
            saved[w.rank] = (w.controller.state_dict(), [x.clone() for x in w.target.tensors()])

    full, _ = run_workers(cfg, steps=10, world=4, local_world=1, between=checkpoint)
    state = saved[0][0]["parts"]["reducer"]
    assert state["syncs"] == (1 if overlapped else 2)
    assert sorted(state["copies"]) == ["0@0", "1@0", "2@0", "3@0"]
    assert bool(saved[0][0]["parts"]["runner"].get("pending")) == overlapped
    resumed, _ = run_workers(cfg, steps=10, world=4, local_world=1, resume=saved)
    for a, b in zip(full, resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.after[5:], b.after, strict=True))


def test_exact_rounds_between_compressed_gossip_steps() -> None:
    cfg = choco("sign", 0.4, exact_every=2)
    workers, _ = run_workers(cfg, steps=8, world=4, local_world=1)
    replay = Replay(4, "sign", 0.4)
    for t in range(8):
        before, after = stacked(workers, t), stacked(workers, t, after=True)
        if (t + 1) % 2:
            np.testing.assert_allclose(after, replay.sync(before), rtol=1e-9, atol=1e-12)
        else:  # the exact round: the mean, and the public copies wait for the next step
            np.testing.assert_allclose(after, np.broadcast_to(before.mean(axis=0), after.shape),
                                       rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [4, 8])
def test_overlapped_choco_lands_the_consensus_step_as_a_correction(k: int) -> None:
    period, tau, steps = 2, 1, 10
    workers, _ = run_workers(choco("sign", 0.4, period, overlap_steps=tau), steps=steps,
                             world=k, local_world=1)
    replay = Replay(k, "sign", 0.4)
    flying: dict[int, np.ndarray] = {}
    for t in range(steps):
        done = t + 1
        before, after = stacked(workers, t), stacked(workers, t, after=True)
        expected = before + flying.pop(done, 0.0)
        if done % period == 0:  # sent from the snapshot, its step lands tau steps later
            flying[done + tau] = replay.sync(before) - before
        np.testing.assert_allclose(after, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("overrides", "text"), [
    (["sync.compression.method=ef_sign"],
     "sync.compression.method: error feedback with sync.reducer=choco is refused"),
    (["sync.compression.method=topk", "sync.compression.error_feedback=true"],
     "sync.compression.error_feedback: error feedback with sync.reducer=choco is refused"),
    (["sync.choco.gamma=1.5"], "sync.choco.gamma: must be in (0, 1], got 1.5"),
    (["sync.topology=complete"], "sync.reducer=choco with sync.topology=complete: choco "
                                 "needs neighbours"),
])
def test_bad_choco_settings_are_one_line_each(overrides: list[str], text: str) -> None:
    assert_refused(["sync.algorithm=local", "sync.topology=ring", "sync.reducer=choco",
                    *overrides], text)


def test_a_resume_with_another_bucket_layout_is_refused_while_copies_exist() -> None:
    saved: dict[int, tuple[dict, list[torch.Tensor]]] = {}

    def checkpoint(w: Worker, t: int) -> None:
        if t == 2:
            saved[w.rank] = (w.controller.state_dict(), [x.clone() for x in w.target.tensors()])

    run_workers(choco("sign", 0.5), steps=3, world=4, local_world=1, between=checkpoint)
    with pytest.raises(ConfigError) as err:
        run_workers(choco("sign", 0.5, bucket_mb=61 * 8 / 2**20), steps=6, world=4,
                    local_world=1, resume=saved)
    [line] = err.value.problems
    assert line.startswith("sync.bucket_mb: the checkpoint was written with 25.0, the recipe "
                           "says 0.000465"), line
    assert "its public copies are kept per tensor slice" in line


def test_choco_keys_without_the_choco_reducer_warn() -> None:
    with pytest.warns(UserWarning, match="sync.choco: has no effect with sync.reducer=gossip"):
        load_config(None, ["sync.algorithm=local", "sync.topology=ring",
                           "sync.choco.gamma=0.5"])
