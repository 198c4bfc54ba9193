"""Parts that compose: compressed pseudo-gradients under an outer optimizer, in the thread tier.

Each run is replayed here in float64 numpy from the workers' recorded parameters before
every sync, following the rules as the papers state them and independently of the
package: the pseudo-gradient d_i = anchor - theta_i, error feedback m_i = d_i + r_i with
the per-tensor scaled sign C (mean |m| times the sign, 0 counting as +), r_i = m_i - C(m_i),
Delta = mean_i C(m_i), then the outer step (SlowMo's convention divides by the inner LR
gamma and steps by alpha * gamma; DiLoCo's does neither):

    u <- beta * u + Delta / gamma,   d = Delta / gamma + beta * u (Nesterov) or u,
    anchor <- anchor - alpha * gamma * d,   every worker takes the anchor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threads import FakeTarget, Worker, run_workers, scaled_sign

from localsgd.sync.config import SyncConfig
from localsgd.sync.reducers.compressed import CompressionKeys
from localsgd.sync.updates.outer import OuterOptimizerKeys


def lr_at(step: int) -> float:
    """An inner learning rate that changes every step, so gamma's convention matters."""
    return 0.1 / (1 + 0.25 * step)


def compressed_outer(alpha: float, beta: float, nesterov: bool, scaled: bool,
                     **kw: object) -> SyncConfig:
    keys = {"algorithm": "local", "period": 2, **kw}
    return SyncConfig(topology="threads", reducer="threads_compressed",  # type: ignore[arg-type]
                      compression=CompressionKeys(method="ef_sign"), update="outer",
                      outer=OuterOptimizerKeys(lr=alpha, momentum=beta, nesterov=nesterov,
                                               scale_by_inner_lr=scaled), **keys)


class Replay:
    """The compressed outer optimizer in numpy: anchor, residuals, outer momentum."""

    def __init__(self, world: int, alpha: float, beta: float, nesterov: bool,
                 scaled: bool) -> None:
        self.anchor = FakeTarget(0).flat().numpy().copy()
        self.residual = [np.zeros_like(self.anchor) for _ in range(world)]
        self.u = np.zeros_like(self.anchor)
        self.alpha, self.beta, self.nesterov, self.scaled = alpha, beta, nesterov, scaled

    def sync(self, before: np.ndarray, steps_done: int) -> np.ndarray:
        sent = []
        for i, theta in enumerate(before):
            m = self.anchor - theta + self.residual[i]
            c = scaled_sign(m)
            self.residual[i] = m - c
            sent.append(c)
        gamma = lr_at(steps_done - 1) if self.scaled else 1.0
        g = np.mean(sent, axis=0) / gamma
        self.u = self.beta * self.u + g
        d = g + self.beta * self.u if self.nesterov else self.u
        self.anchor = self.anchor - self.alpha * gamma * d
        return self.anchor


def stacked(workers: list[Worker], t: int, after: bool = False) -> np.ndarray:
    return np.stack([(w.after if after else w.before)[t].numpy() for w in workers])


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize(("alpha", "beta", "nesterov", "scaled"), [
    (0.7, 0.0, False, True),   # outer SGD, SlowMo's convention
    (0.7, 0.9, True, False),   # DiLoCo: Nesterov on Delta itself
    (1.0, 0.5, False, True),   # SlowMo heavy ball
])
def test_compressed_outer_steps_follow_the_replay(world: int, alpha: float, beta: float,
                                                  nesterov: bool, scaled: bool) -> None:
    workers, _ = run_workers(compressed_outer(alpha, beta, nesterov, scaled), steps=8,
                             world=world, local_world=2, lr_at=lr_at)
    replay = Replay(world, alpha, beta, nesterov, scaled)
    for t in range(8):
        before, after = stacked(workers, t), stacked(workers, t, after=True)
        if (t + 1) % 2:
            np.testing.assert_array_equal(after, before)
            continue
        expected = replay.sync(before, t + 1)
        for row in after:
            np.testing.assert_allclose(row, expected, rtol=1e-9, atol=1e-12)


def test_one_anchor_serves_reducer_and_update_and_plain_local_sgd_keeps_none() -> None:
    workers, _ = run_workers(compressed_outer(0.7, 0.9, True, False), steps=4, world=4,
                             lr_at=lr_at)
    ctl = workers[0].controller
    assert ctl.anchor is not None
    assert ctl.anchor is ctl.reducer.anchor is ctl.update.anchor  # type: ignore[attr-defined]
    anchor = ctl.anchor.nbytes()
    assert anchor == 66 * 8
    residuals = ctl.reducer.held_bytes()
    assert residuals == 66 * 8  # error feedback: one residual per parameter element
    buckets = sum(b.numel() * b.element_size() for b in ctl.averager.bucketer.buffers.values())
    assert ctl.extra_bytes() == buckets + anchor + residuals + ctl.update.held_bytes()
    plain, _ = run_workers(SyncConfig(topology="threads", reducer="threads",  # type: ignore[arg-type]
                                      algorithm="local", period=2), steps=4, world=4)
    assert plain[0].controller.anchor is None


def test_hierarchical_exact_in_nodes_compressed_across_outer_at_global_syncs() -> None:
    cfg = compressed_outer(0.7, 0.9, True, True, algorithm="hierarchical", period=1,
                           block_period=2)
    workers, _ = run_workers(cfg, steps=6, world=4, local_world=2, lr_at=lr_at)
    replay = Replay(4, 0.7, 0.9, True, True)
    for t in range(6):
        before, after = stacked(workers, t), stacked(workers, t, after=True)
        if (t + 1) % 2:  # a node average: exact, no outer step, no compression
            for node in (0, 2):
                mean = before[node:node + 2].mean(axis=0)
                for row in after[node:node + 2]:
                    np.testing.assert_allclose(row, mean, rtol=0, atol=1e-12)
            continue
        expected = replay.sync(before, t + 1)
        for row in after:
            np.testing.assert_allclose(row, expected, rtol=1e-9, atol=1e-12)


def replay_overlapped(workers: list[Worker], replay: Replay, period: int, tau: int,
                      fragments: list[slice], steps: int) -> None:
    """Fragment f of the sync after s steps starts after s + f * period / F steps from the
    snapshot then, and lands tau steps later: theta += (new anchor - snapshot) on its
    slice; nothing else moves the parameters. Later fragments of a sync read the anchor
    as the earlier ones left it (their slices do not overlap)."""
    gap = period // len(fragments)
    starts = {s + f * gap: part for s in range(period, steps + 1, period)
              for f, part in enumerate(fragments)}
    flying: dict[int, tuple[slice, np.ndarray, np.ndarray]] = {}
    for t in range(steps):
        done = t + 1
        before, after = stacked(workers, t), stacked(workers, t, after=True)
        expected = before.copy()
        if done in flying:
            part, snap, new = flying.pop(done)
            expected[:, part] += new - snap
        if done in starts:
            part = starts[done]
            snap = before[:, part].copy()
            # The outer step happens when the fragment lands: gamma is the LR of the last
            # local step before that.
            flying[done + tau] = (part, snap, replay.sync_part(part, snap, done + tau))
        for row, want in zip(after, expected, strict=True):
            np.testing.assert_allclose(row, want, rtol=1e-9, atol=1e-12)


def _sync_part(self: Replay, part: slice, snap: np.ndarray, steps_done: int) -> np.ndarray:
    """Replay.sync on the elements ``part`` only (a fragment)."""
    sent = []
    for i, theta in enumerate(snap):
        m = self.anchor[part] - theta + self.residual[i][part]
        c = scaled_sign_of(m, part)
        self.residual[i][part] = m - c
        sent.append(c)
    gamma = lr_at(steps_done - 1) if self.scaled else 1.0
    g = np.mean(sent, axis=0) / gamma
    self.u[part] = self.beta * self.u[part] + g
    d = g + self.beta * self.u[part] if self.nesterov else self.u[part]
    self.anchor[part] = self.anchor[part] - self.alpha * gamma * d
    return self.anchor[part].copy()


Replay.sync_part = _sync_part  # type: ignore[attr-defined]


def scaled_sign_of(m: np.ndarray, part: slice) -> np.ndarray:
    """The scaled sign of the elements ``part`` of the flat parameters, tensor by tensor."""
    full = np.zeros(66)
    full[part] = m
    return scaled_sign(full)[part]


COPY = (1.0, 0.0, False, True)
"""An outer step with lr 1 and no momentum: the copy update, replayed by the same rule."""


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize(("update", "tau"), [("copy", 1), ("copy", 3), ("outer", 2)])
def test_compressed_overlapped_lands_the_replayed_correction(world: int, update: str,
                                                             tau: int) -> None:
    alpha, beta, nesterov, scaled = (0.7, 0.9, True, True) if update == "outer" else COPY
    cfg = compressed_outer(alpha, beta, nesterov, scaled, period=4, overlap_steps=tau)
    cfg.update = update
    workers, _ = run_workers(cfg, steps=12, world=world, local_world=2, lr_at=lr_at)
    replay_overlapped(workers, Replay(world, alpha, beta, nesterov, scaled), 4, tau,
                      [slice(0, 66)], 12)


def test_compressed_fragments_land_each_fragment_on_its_own_anchor_slice() -> None:
    cfg = compressed_outer(0.7, 0.9, True, False, period=4, overlap_steps=1, fragments=2)
    workers, _ = run_workers(cfg, steps=12, world=4, local_world=2, lr_at=lr_at)
    # Tensors of sizes 40, 21, 5 (then buffers 3 and 1) go to the fragment holding their
    # middle element: the first parameter alone, then the other two.
    replay_overlapped(workers, Replay(4, 0.7, 0.9, True, False), 4, 1,
                      [slice(0, 40), slice(40, 66)], 12)


class EvalCopy(torch.nn.Module):
    """Where ``averaged_copy`` writes: FakeTarget's parameters and buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(s, dtype=torch.float64))
                                          for s in [(40,), (7, 3), (5,)]])
        self.register_buffer("stat", torch.zeros(3, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def flat(self) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in self.ps]).numpy()


@pytest.mark.parametrize("exact", [False, True])
def test_compressed_evaluation_sends_no_fp32_model_unless_asked(exact: bool) -> None:
    cfg = compressed_outer(1.0, 0.0, False, True)
    cfg.update = "copy"
    cfg.compression.exact_average = exact
    copies: dict[int, tuple[np.ndarray, float]] = {}

    def evaluate(w: Worker, t: int) -> None:
        if t == 4:  # five steps done: mid-period, one step after the sync of step 4
            out = EvalCopy()
            sent = w.meter.flat().get("comm/eval/bytes", 0.0)
            w.controller.averaged_copy(w.target, out)
            copies[w.rank] = (out.flat(), w.meter.flat()["comm/eval/bytes"] - sent)

    workers, _ = run_workers(cfg, steps=5, world=4, between=evaluate, lr_at=lr_at)
    mean = np.mean([w.before[4].numpy() for w in workers], axis=0)
    for w in workers:
        model, sent = copies[w.rank]
        if exact:  # the exact average of the workers' models, in float64
            np.testing.assert_allclose(model, mean, rtol=0, atol=1e-12)
            assert sent == (66 + 3) * 8
        else:  # the model of the last sync, every worker's after step 4; buffers only
            np.testing.assert_array_equal(model, workers[0].after[3].numpy())
            assert sent == 3 * 8


def qsr_ends(alpha: float, base: int, steps: int, lr: object) -> list[int]:
    """Global sync steps of the QSR: each period max(base, floor((alpha / lr)^2)), from the
    LR at its first step."""
    ends = [0]
    while ends[-1] < steps:
        ends.append(ends[-1] + max(base, int((alpha / lr(ends[-1])) ** 2)))  # type: ignore[operator]
    return ends[1:]


@pytest.mark.parametrize("world", [4, 8])
def test_qsr_sets_the_global_period_of_hierarchical_sgd(world: int) -> None:
    def decaying(step: int) -> float:
        return 0.2 if step < 8 else 0.15

    cfg = SyncConfig(topology="threads", reducer="threads", algorithm="hierarchical",  # type: ignore[arg-type]
                     period=2, block_period=2, period_rule="qsr", qsr_alpha=0.5)
    workers, _ = run_workers(cfg, steps=30, world=world, local_world=2, lr_at=decaying)
    ends = qsr_ends(0.5, 4, 30, decaying)
    assert ends[:4] == [6, 12, 23, 34]  # (0.5/0.2)^2 = 6.25, then (0.5/0.15)^2 = 11.1
    last = 0
    for t in range(30):
        done = t + 1
        before, after = stacked(workers, t), stacked(workers, t, after=True)
        if done in ends:
            last = done
            for row in after:
                np.testing.assert_allclose(row, before.mean(axis=0), rtol=0, atol=1e-12)
        elif (done - last) % 2 == 0:
            for node in range(0, world, 2):
                mean = before[node:node + 2].mean(axis=0)
                for row in after[node:node + 2]:
                    np.testing.assert_allclose(row, mean, rtol=0, atol=1e-12)
        else:
            np.testing.assert_array_equal(after, before)


def test_ef_sign_residuals_are_per_parameter_so_bucket_mb_changes_no_result() -> None:
    # 61 float64 elements a bucket: the parameters (40, 21, 5) travel in two buckets,
    # none split, where the default layout sends them in one.
    small = compressed_outer(0.7, 0.9, True, True, bucket_mb=61 * 8 / 2**20)
    big = compressed_outer(0.7, 0.9, True, True)
    a, _ = run_workers(big, steps=8, world=4, lr_at=lr_at)
    b, _ = run_workers(small, steps=8, world=4, lr_at=lr_at)
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x.after, y.after, strict=True))
    assert sorted(b[0].controller.reducer.feedback.residuals) == [  # type: ignore[attr-defined]
        "param0@0", "param1@0", "param2@0"]
    # A checkpoint mid-period resumes under the other layout, bitwise.
    states: dict[int, tuple[dict, list[torch.Tensor]]] = {}

    def keep(w: Worker, t: int) -> None:
        if t == 2:
            states[w.rank] = (w.controller.state_dict(), [x.clone() for x in w.target.tensors()])

    run_workers(big, steps=3, world=4, lr_at=lr_at, between=keep)
    resumed, _ = run_workers(small, steps=8, world=4, lr_at=lr_at, resume=states)
    for x, y in zip(a, resumed, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x.after[3:], y.after, strict=True))


def test_a_checkpoint_with_residuals_per_bucket_still_resumes_bitwise() -> None:
    """Older checkpoints kept one residual per bucket ("index:start:numel")."""
    cfg = compressed_outer(0.7, 0.9, True, True)
    a, _ = run_workers(cfg, steps=6, world=4, lr_at=lr_at)
    states: dict[int, tuple[dict, list[torch.Tensor]]] = {}

    def keep(w: Worker, t: int) -> None:
        if t == 2:
            state = w.controller.state_dict()
            res = state["parts"]["reducer"]["feedback"]["residuals"]
            whole = torch.cat([res.pop(f"param{i}@0") for i in range(3)])
            res["0:0:66"] = whole
            states[w.rank] = (state, [x.clone() for x in w.target.tensors()])

    run_workers(cfg, steps=3, world=4, lr_at=lr_at, between=keep)
    resumed, _ = run_workers(cfg, steps=6, world=4, lr_at=lr_at, resume=states)
    for x, y in zip(a, resumed, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x.after[3:], y.after, strict=True))
