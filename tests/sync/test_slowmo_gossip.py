"""Gossip steps with an exact round every N syncs (``sync.exact_every``), and SlowMo over it.

Thread workers run the real ring topology and the real ``gossip`` reducer (a shared mailbox
carries the sends); each run is replayed here in float64 numpy, from the workers' recorded
models before every sync, with a ring matrix built independently of ``graphs``. Global
syncs are counted from 1: the N-th, 2N-th, ... are exact, the others gossip steps
x <- W x. An exact round averages the workers (x_bar) and, with ``sync.update=outer``, takes
SlowMo's outer step on the anchor (the model of the last exact round):

    u <- beta u + (anchor - x_bar) / gamma,   d = (anchor - x_bar) / gamma + beta u
    (Nesterov) or u,   anchor <- anchor - alpha gamma d,   every worker takes the anchor,

gamma the inner LR of the last step (1 with ``scale_by_inner_lr=false``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_refused
from threads import FakeTarget, Worker, ring_mixing, run_workers

from localsgd.config import ConfigError
from localsgd.recipe import load_config
from localsgd.sync.config import SyncConfig
from localsgd.sync.updates.outer import OuterOptimizerKeys


def lr_at(step: int) -> float:
    return 0.1 / (1 + 0.25 * step)


OUTERS = {"copy": None, "sgd": (0.7, 0.0, False, True), "diloco": (0.7, 0.9, True, False),
          "slowmo": (1.0, 0.5, False, True)}
"""update -> (alpha, beta, nesterov, scale_by_inner_lr); copy has no outer step."""


def config(update: str, period: int, every: int, **kw: object) -> SyncConfig:
    keys: dict[str, object] = {"algorithm": "local", "period": period, "exact_every": every,
                               **kw}
    outer = OUTERS[update]
    if outer is not None:
        alpha, beta, nesterov, scaled = outer
        keys |= {"update": "outer", "outer": OuterOptimizerKeys(
            lr=alpha, momentum=beta, nesterov=nesterov, scale_by_inner_lr=scaled)}
    return SyncConfig(topology="threads_ring", **keys)  # type: ignore[arg-type]


class Replay:
    """Gossip rounds and exact rounds with SlowMo's outer step, in numpy."""

    def __init__(self, k: int, update: str, every: int) -> None:
        self.w = ring_mixing(k)
        self.every = every
        self.outer = OUTERS[update]
        self.anchor = FakeTarget(0).flat().numpy().copy()
        self.u = np.zeros_like(self.anchor)
        self.rounds = 0

    def sync(self, x: np.ndarray, steps_done: int) -> tuple[np.ndarray, bool]:
        """The models after the next global sync of ``x`` (stacked); whether it was exact."""
        self.rounds += 1
        if self.rounds % self.every:
            return self.w @ x, False
        mean = x.mean(axis=0)
        if self.outer is None:
            return np.broadcast_to(mean, x.shape).copy(), True
        alpha, beta, nesterov, scaled = self.outer
        gamma = lr_at(steps_done - 1) if scaled else 1.0
        g = (self.anchor - mean) / gamma
        self.u = beta * self.u + g
        d = g + beta * self.u if nesterov else self.u
        self.anchor = self.anchor - alpha * gamma * d
        return np.broadcast_to(self.anchor, x.shape).copy(), True


def stacked(workers: list[Worker], t: int, after: bool = False) -> np.ndarray:
    return np.stack([(w.after if after else w.before)[t].numpy() for w in workers])


@pytest.mark.parametrize("k", [4, 8])
@pytest.mark.parametrize(("update", "period", "every"), [
    ("copy", 2, 2),     # gossip with a periodic exact average
    ("sgd", 1, 3),      # SlowMo's own setting: gossip every step, outer step every 3
    ("diloco", 2, 2),
    ("slowmo", 1, 4),
])
def test_gossip_with_exact_rounds_follows_the_replay(k: int, update: str, period: int,
                                                     every: int) -> None:
    steps = 12
    workers, world = run_workers(config(update, period, every), steps=steps, world=k,
                                 local_world=1, lr_at=lr_at)
    replay = Replay(k, update, every)
    exact_steps = []
    for t in range(steps):
        before, after = stacked(workers, t), stacked(workers, t, after=True)
        if (t + 1) % period:
            np.testing.assert_array_equal(after, before)
            continue
        expected, exact = replay.sync(before, t + 1)
        np.testing.assert_allclose(after, expected, rtol=1e-9, atol=1e-12)
        if exact:
            exact_steps.append(t + 1)
            for row in after:  # one model, bit for bit
                np.testing.assert_array_equal(row, after[0])
    assert exact_steps == list(range(period * every, steps + 1, period * every))
    events = workers[0].controller.events
    assert [e.step for e in events if e.action == "global"] == exact_steps
    gossip_steps = [e.step for e in events if e.action == "gossip"]
    assert len(gossip_steps) == steps // period - len(exact_steps)
    # Exact rounds are one all-reduce each and report the true consensus distance; gossip
    # steps send to the two neighbours and report none.
    for e in events:
        assert math.isnan(e.distance) == (e.action == "gossip")
    totals = workers[0].meter.totals
    assert totals["average"].calls == len(exact_steps)
    assert totals["gossip"].calls == len(gossip_steps)
    assert world.mailbox.sent[0] == 2 * len(gossip_steps)


def test_the_update_steps_only_at_exact_rounds_and_the_workers_then_agree() -> None:
    cfg = config("diloco", 2, 3)
    seen: dict[int, list[bool]] = {}

    def probe(w: Worker, t: int) -> None:
        seen.setdefault(w.rank, []).append(w.controller.in_consensus())

    workers, _ = run_workers(cfg, steps=12, world=4, local_world=1, lr_at=lr_at,
                             between=probe, finish=True)
    ctl = workers[0].controller
    # After the exact rounds of steps 6 and 12 (and at no other step) every worker holds one
    # model, so evaluation and the end of the run send nothing more.
    assert [t + 1 for t, agree in enumerate(seen[0]) if agree] == [6, 12]
    assert ctl.anchor is not None and ctl.anchor.step == 12
    np.testing.assert_array_equal(ctl.anchor.tensors[0].numpy(), workers[0].after[11][:40])
    assert [e.action for e in ctl.events][-1] == "global"  # no "final" average
    # Two exact rounds (parameters and buffers), then the BatchNorm statistics alone.
    average = workers[0].meter.totals["average"]
    assert (average.calls, average.bytes) == (3, 2 * (66 + 3) * 8 + 3 * 8)


def test_overlapped_exact_rounds_land_as_corrections() -> None:
    k, period, tau, every, steps = 4, 2, 1, 2, 12
    workers, _ = run_workers(config("slowmo", period, every, overlap_steps=tau), steps=steps,
                             world=k, local_world=1, lr_at=lr_at)
    replay = Replay(k, "slowmo", every)
    flying: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for t in range(steps):
        done = t + 1
        before, after = stacked(workers, t), stacked(workers, t, after=True)
        expected = before.copy()
        if done in flying:
            snap, new = flying.pop(done)
            expected += new - snap
        if done % period == 0:
            # The outer step is taken when the sync lands: gamma is the LR before then.
            snap = before.copy()
            flying[done + tau] = (snap, replay.sync(snap, done + tau)[0])
        np.testing.assert_allclose(after, expected, rtol=1e-9, atol=1e-12)


def test_a_checkpoint_between_exact_rounds_resumes_bitwise() -> None:
    cfg = config("slowmo", 1, 4)
    saved: dict[int, tuple[dict, list[torch.Tensor]]] = {}

    def checkpoint(w: Worker, t: int) -> None:
        if t == 5:  # six syncs done: two gossip steps since the exact round of step 4
            saved[w.rank] = (w.controller.state_dict(), [x.clone() for x in w.target.tensors()])

    full, _ = run_workers(cfg, steps=12, world=4, local_world=1, lr_at=lr_at,
                          between=checkpoint)
    assert saved[0][0]["parts"]["topology"] == {"rounds": 6}
    resumed, _ = run_workers(cfg, steps=12, world=4, local_world=1, lr_at=lr_at,
                             resume=saved)
    for a, b in zip(full, resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.after[6:], b.after, strict=True))
        assert [(e.step, e.action) for e in a.controller.events] == [
            (e.step, e.action) for e in b.controller.events]


def test_the_capability_rule_accepts_outer_over_gossip_with_exact_rounds() -> None:
    cfg = load_config(None, ["sync.algorithm=local", "sync.topology=ring",
                             "sync.update=outer", "sync.exact_every=4"])
    assert cfg.sync.exact_every == 4
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sync.algorithm=local", "sync.topology=ring", "sync.update=outer"])
    [line] = err.value.problems
    assert line.startswith("sync.update=outer with sync.reducer=gossip: outer needs consensus")
    assert line.endswith(", or sync.exact_every > 0 (exact rounds of gossip)"), line
    assert_refused(["sync.algorithm=local", "sync.topology=ring", "sync.exact_every=-1"],
                   "sync.exact_every: must be >= 0")


def test_exact_rounds_on_the_complete_topology_warn() -> None:
    with pytest.warns(UserWarning, match="sync.exact_every: has no effect with "
                                         "sync.topology=complete"):
        load_config(None, ["sync.algorithm=local", "sync.exact_every=2"])
