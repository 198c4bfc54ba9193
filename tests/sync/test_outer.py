"""Outer optimizers (sync.update=outer), in process on thread workers, in float64.

Expectations are computed here with numpy from the workers' recorded parameters, following
the rule as SlowMo and DiLoCo state it, independently of ``updates/outer.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import assert_refused
from threads import Worker, run_workers

from localsgd.recipe import load_config
from localsgd.sync.config import SyncConfig
from localsgd.sync.updates.outer import Outer, OuterOptimizerKeys, StateDevice


def sync(**kw: object) -> SyncConfig:
    return SyncConfig(topology="threads", reducer="threads", **kw)  # type: ignore[arg-type]


def outer(**kw: object) -> dict:
    return {"update": "outer", "outer": OuterOptimizerKeys(**kw)}  # type: ignore[arg-type]


def lr_at(step: int) -> float:
    """A learning rate that changes every step, so gamma's convention matters."""
    return 0.1 / (1 + 0.25 * step)


def start_params() -> np.ndarray:
    """Every worker's parameters before step 0 (FakeTarget starts identical everywhere)."""
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(s, generator=g, dtype=torch.float64).reshape(-1)
                      for s in [(40,), (7, 3), (5,)]]).numpy()


def mean_before(workers: list[Worker], t: int) -> np.ndarray:
    return np.mean([w.before[t].numpy() for w in workers], axis=0)


def expected_outer(workers: list[Worker], syncs: list[int], alpha: float, beta: float,
                   nesterov: bool, scaled: bool) -> list[np.ndarray]:
    """theta_a after each sync (steps completed), from the recorded pre-sync parameters."""
    anchor, u, out = start_params(), None, []
    for s in syncs:
        gamma = lr_at(s - 1) if scaled else 1.0
        g = (anchor - mean_before(workers, s - 1)) / gamma
        u = g if u is None else beta * u + g
        d = g + beta * u if nesterov else u
        anchor = anchor - alpha * gamma * d
        out.append(anchor)
    return out


def test_alpha_one_beta_zero_is_plain_averaging_with_the_same_collectives() -> None:
    plain, plain_world = run_workers(sync(algorithm="local", period=3), steps=10, lr_at=lr_at)
    outer_run, outer_world = run_workers(sync(algorithm="local", period=3, **outer()),
                                         steps=10, lr_at=lr_at)
    for a, b in zip(plain, outer_run, strict=True):
        for x, y in zip(a.after, b.after, strict=True):
            np.testing.assert_allclose(y.numpy(), x.numpy(), rtol=0, atol=1e-13)
        assert a.meter.flat() == pytest.approx(b.meter.flat(), rel=0, abs=1.0)  # bytes, calls
    assert plain_world.everyone.calls == outer_world.everyone.calls


@pytest.mark.parametrize(("alpha", "beta", "nesterov", "scaled"), [
    (1.0, 0.5, False, True),    # SlowMo
    (0.7, 0.9, True, False),    # DiLoCo: outer Nesterov on the pseudo-gradient itself
    (0.7, 0.9, True, True),
])
def test_two_syncs_match_an_independent_computation(alpha: float, beta: float, nesterov: bool,
                                                    scaled: bool) -> None:
    cfg = sync(algorithm="local", period=3, **outer(lr=alpha, momentum=beta, nesterov=nesterov,
                                                    scale_by_inner_lr=scaled))
    workers, _ = run_workers(cfg, steps=6, lr_at=lr_at)
    want = expected_outer(workers, [3, 6], alpha, beta, nesterov, scaled)
    for w in workers:
        for s, anchor in zip([3, 6], want, strict=True):
            np.testing.assert_allclose(w.after[s - 1].numpy(), anchor, rtol=0, atol=1e-12)
    # The outer step moved the model away from the plain mean (the test can fail).
    assert not np.allclose(want[1], mean_before(workers, 5), atol=1e-6)


def test_post_local_takes_its_anchor_at_the_switch() -> None:
    cfg = sync(algorithm="post_local", period=2, switch_step=3,
               **outer(lr=0.5, momentum=0.5))
    workers, _ = run_workers(cfg, steps=5, lr_at=lr_at)
    gamma = lr_at(4)
    for w in workers:
        # The thread harness does not all-reduce gradients, so each worker's model at the
        # switch (after 3 steps) is its own anchor.
        at_switch = w.after[2].numpy()
        want = at_switch - 0.5 * gamma * (at_switch - mean_before(workers, 4)) / gamma
        np.testing.assert_allclose(w.after[4].numpy(), want, rtol=0, atol=1e-12)


def test_hierarchical_steps_outer_only_at_global_syncs() -> None:
    cfg = sync(algorithm="hierarchical", period=2, block_period=2, **outer(lr=0.5))
    workers, _ = run_workers(cfg, steps=4, world=4, local_world=2, lr_at=lr_at)
    for node in ([0, 1], [2, 3]):  # step 2: a plain mean inside each node
        mean = np.mean([workers[r].before[1].numpy() for r in node], axis=0)
        for r in node:
            np.testing.assert_allclose(workers[r].after[1].numpy(), mean, rtol=0, atol=1e-13)
    want = expected_outer(workers, [4], 0.5, 0.0, False, True)[0]
    for w in workers:
        np.testing.assert_allclose(w.after[3].numpy(), want, rtol=0, atol=1e-12)


def test_outer_state_resumes_bitwise_and_merges() -> None:
    cfg = sync(algorithm="local", period=3, **outer(lr=0.8, momentum=0.6, nesterov=True))
    saved: dict[int, tuple[dict, list[torch.Tensor]]] = {}

    def checkpoint(w: Worker, t: int) -> None:
        if t == 4:  # after one outer step, mid-period
            # A checkpoint serializes at once; here the state must not follow later steps.
            saved[w.rank] = (copy.deepcopy(w.controller.state_dict()),
                             [x.clone() for x in w.target.tensors()])

    full, _ = run_workers(cfg, steps=10, between=checkpoint, lr_at=lr_at)
    resumed, _ = run_workers(cfg, steps=10, resume=saved, lr_at=lr_at)
    for a, b in zip(full, resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.after[5:], b.after, strict=True))
        assert torch.equal(a.controller.update.velocity[0], b.controller.update.velocity[0])
    states = [saved[r][0]["parts"]["update"] for r in range(4)]
    merged = Outer.merge_states(states)
    assert all(torch.equal(x, y) for x, y in zip(merged["anchor"], states[0]["anchor"],
                                                  strict=True))
    # Every rank holds the same outer state, so keeping rank 0's loses nothing.
    assert all(torch.equal(s["velocity"][1], states[0]["velocity"][1]) for s in states)


def test_state_on_cpu_gives_the_same_result() -> None:
    base = sync(algorithm="local", period=2, **outer(lr=0.7, momentum=0.9, nesterov=True))
    cpu = sync(algorithm="local", period=2, **outer(lr=0.7, momentum=0.9, nesterov=True,
                                                    state_device=StateDevice.cpu))
    a, _ = run_workers(base, steps=6, lr_at=lr_at)
    b, _ = run_workers(cpu, steps=6, lr_at=lr_at)
    assert all(torch.equal(x, y) for x, y in zip(a[0].after, b[0].after, strict=True))
    assert b[0].controller.anchor is b[0].controller.update.anchor
    assert b[0].controller.anchor.tensors[0].device.type == "cpu"


@pytest.mark.parametrize(("overrides", "text"), [
    (["sync.update=outer", "sync.outer.lr=0"], "sync.outer.lr: must be > 0"),
    (["sync.update=outer", "sync.algorithm=local", "sync.outer.momentum=1"],
     "sync.outer.momentum: must be in [0, 1)"),
    (["sync.update=outer", "sync.algorithm=local", "sync.outer.nesterov=true"],
     "sync.outer.nesterov: Nesterov needs sync.outer.momentum > 0"),
    (["sync.update=outer"], "sync.update=outer with sync.algorithm=minibatch: outer needs "
                            "model_averages"),
    (["sync.update=outer", "sync.outer.state_device=gpu"], "sync.outer.state_device"),
])
def test_bad_outer_settings_are_one_line_each(overrides: list[str], text: str) -> None:
    assert_refused(overrides, text)


def test_outer_keys_without_the_outer_update_warn() -> None:
    with pytest.warns(UserWarning, match="sync.outer: has no effect with sync.update=copy"):
        load_config(None, ["sync.algorithm=local", "sync.outer.lr=0.5"])


def test_overlapped_outer_step_lands_as_a_correction() -> None:
    """tau=1: the outer step on the snapshots' mean lands one step later, keeping the local
    progress: theta <- theta + (anchor_new - snapshot)."""
    cfg = sync(algorithm="local", period=3, overlap_steps=1, **outer(lr=0.7, momentum=0.9,
                                                                    nesterov=True))
    workers, _ = run_workers(cfg, steps=5, lr_at=lr_at)
    gamma = lr_at(2)
    snap_mean = np.mean([w.after[2].numpy() for w in workers], axis=0)  # sent after step 3
    g = (start_params() - snap_mean) / gamma
    anchor_new = start_params() - 0.7 * gamma * (g + 0.9 * g)
    for w in workers:
        want = w.before[3].numpy() + (anchor_new - w.after[2].numpy())
        np.testing.assert_allclose(w.after[3].numpy(), want, rtol=0, atol=1e-12)
