"""AdamW's moments averaged under overlap (sync.momentum=average, sync.overlap_steps >= 1).

Thread workers step a real ``torch.optim.AdamW`` on made-up gradients; the run is replayed
here in float64 numpy from the common start, AdamW written out as its paper states it
(decoupled decay, bias-corrected moments), and each overlapped average landing tau steps
after its snapshot as

    theta <- theta + (mean(theta_snap) - theta_snap),
    m <- m + beta1^tau (mean(m_snap) - m_snap),   v <- v + beta2^tau (mean(v_snap) - v_snap),

which is what replacing the moments by their average at the snapshot and taking the same
tau steps after it gives (each step scales a moment by its beta and adds the same term).
The unscaled correction v + (mean - snapshot) can turn a second moment negative (a worker
with v_snap = 1 next to one with 0, and tau steps of small gradients with beta2^tau < 1/2).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threads import FakeTarget, run_workers

from localsgd.engines.base import momentum_decays, momentum_tensors
from localsgd.recipe import load_config
from localsgd.sync.config import SyncConfig

LR, BETAS, EPS, WD = 0.05, (0.8, 0.9), 1e-8, 0.01


class AdamTarget(FakeTarget):
    """FakeTarget's parameters under a real AdamW; its moments are what syncs move."""

    def __init__(self, rank: int) -> None:
        super().__init__(rank)
        self.opt = torch.optim.AdamW(self.params, lr=LR, betas=BETAS, eps=EPS,
                                     weight_decay=WD)

    def local_step(self, step: int) -> None:
        for p in self.params:
            p.grad = torch.sin(p * (self.rank + 1) + step) * (1 + self.rank)
        self.opt.step()

    def momentum_buffers(self) -> list[torch.Tensor]:
        return momentum_tensors(self.opt)

    def momentum_decays(self) -> list[float | None]:
        return momentum_decays(self.opt)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        state = [self.opt.state[p] for p in self.params]
        return (torch.cat([s["exp_avg"].reshape(-1) for s in state]).numpy(),
                torch.cat([s["exp_avg_sq"].reshape(-1) for s in state]).numpy())


def replay(k: int, steps: int, period: int, tau: int) -> list[np.ndarray]:
    """Every worker's (theta, m, v) after the run, and theta after each step."""
    theta = np.stack([FakeTarget(0).flat().numpy()] * k)
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    ranks = np.arange(k)[:, None]
    b1, b2 = BETAS
    flying: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    history = []
    for t in range(steps):
        g = np.sin(theta * (ranks + 1) + t) * (1 + ranks)
        theta = theta * (1 - LR * WD)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        n = t + 1
        denom = np.sqrt(v) / np.sqrt(1 - b2 ** n) + EPS
        theta = theta - (LR / (1 - b1 ** n)) * m / denom
        if n in flying:
            snap_t, snap_m, snap_v = flying.pop(n)
            theta = theta + snap_t.mean(axis=0) - snap_t
            m = m + b1 ** tau * (snap_m.mean(axis=0) - snap_m)
            v = v + b2 ** tau * (snap_v.mean(axis=0) - snap_v)
        if n % period == 0:
            flying[n + tau] = (theta.copy(), m.copy(), v.copy())
        history.append(theta.copy())
    return [theta, m, v, *history]


@pytest.mark.parametrize("k", [4, 8])
@pytest.mark.parametrize(("period", "tau"), [(4, 1), (4, 3), (2, 2)])
def test_averaged_adamw_moments_land_as_the_delayed_replacement(k: int, period: int,
                                                                tau: int) -> None:
    steps = 12
    cfg = SyncConfig(topology="threads", reducer="threads", algorithm="local",  # type: ignore[arg-type]
                     period=period, overlap_steps=tau, momentum="average")
    workers, _ = run_workers(cfg, steps=steps, world=k, local_world=2, target=AdamTarget)
    theta, m, v, *history = replay(k, steps, period, tau)
    for t in range(steps):
        after = np.stack([w.after[t].numpy() for w in workers])
        np.testing.assert_allclose(after, history[t], rtol=1e-9, atol=1e-12)
    for i, w in enumerate(workers):
        got_m, got_v = w.target.moments()  # type: ignore[attr-defined]
        np.testing.assert_allclose(got_m, m[i], rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(got_v, v[i], rtol=1e-9, atol=1e-14)
        assert (got_v > 0).all()


def test_averaged_adamw_moments_under_overlap_are_accepted() -> None:
    cfg = load_config(None, ["optim.name=adamw", "sync.algorithm=local", "sync.period=4",
                             "sync.overlap_steps=2", "sync.momentum=average"])
    assert cfg.sync.overlap_steps == 2


def test_a_checkpoint_keeps_the_step_of_the_snapshot_in_flight() -> None:
    cfg = SyncConfig(topology="threads", reducer="threads", algorithm="local",  # type: ignore[arg-type]
                     period=4, overlap_steps=3, momentum="average")
    states: dict[int, dict] = {}

    def keep(w: object, t: int) -> None:
        if t == 4:  # the sync of step 4 lands at step 7
            states[w.rank] = w.controller.state_dict()  # type: ignore[attr-defined]

    run_workers(cfg, steps=5, world=4, local_world=2, target=AdamTarget, between=keep)
    [(start, due, _, flight)] = states[0]["parts"]["runner"]["pending"]
    assert (start, due, flight["launched"]) == (4, 7, 4)
