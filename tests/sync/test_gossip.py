"""Gossip topologies: mixing matrices, each gossip step, convergence, accounting and resume.

Thread workers (tests/sync/threads.py) run the real ring / torus / expander topologies and
the real ``gossip`` reducer; only the point-to-point transport is a shared mailbox instead of
gloo (tests/integration covers gloo's isend/irecv under torchrun). Every expectation is
computed here with numpy from matrices built independently of ``graphs``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_refused
from threads import Worker, ring_mixing, run_workers

from localsgd.config import ConfigError
from localsgd.recipe import load_config, validate_launch
from localsgd.sync.config import SyncConfig
from localsgd.sync.topologies import graphs


def torus_reference(rows: int, cols: int) -> np.ndarray:
    k = rows * cols
    w = np.zeros((k, k))
    for i in range(k):
        r, c = divmod(i, cols)
        for rr, cc in ((r, c), (r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            w[i, (rr % rows) * cols + (cc % cols)] += 1 / 5
    return w


def expander_reference(p: int) -> np.ndarray:
    w = np.zeros((p, p))
    for i in range(p):
        inverse = next(j for j in range(p) if (i * j) % p == 1) if i else 0
        for j in ((i + 1) % p, (i - 1) % p, inverse):
            w[i, j] += 1 / 3
    return w


REFERENCE = {"ring": ring_mixing,
             "torus": lambda k: torus_reference(*graphs.torus_sides(k)),  # type: ignore[misc]
             "expander": lambda k: expander_reference(k)}


@pytest.mark.parametrize("name", ["ring", "torus", "expander"])
def test_mixing_matrices_are_symmetric_and_doubly_stochastic_up_to_64(name: str) -> None:
    build = getattr(graphs, name)
    built = 0
    for k in range(1, 65):
        buildable = {"ring": True, "torus": any(k % a == 0 and k // a >= 3
                                                for a in range(3, k + 1)),
                     "expander": k >= 2 and all(k % d for d in range(2, k))}[name]
        if not buildable:
            with pytest.raises(graphs.GraphError):
                build(k)
            continue
        w = build(k)
        built += 1
        np.testing.assert_array_equal(w, w.T)
        np.testing.assert_allclose(w.sum(axis=0), 1, atol=1e-15)
        np.testing.assert_allclose(w.sum(axis=1), 1, atol=1e-15)
        assert (w >= 0).all()
        np.testing.assert_allclose(w, REFERENCE[name](k), atol=1e-15)
        if k > 2:  # connected: the average is the only fixed point
            assert graphs.contraction(w) < 1 - 1e-9
    assert built == {"ring": 64, "torus": 33, "expander": 18}[name]
    if name == "torus":
        assert graphs.torus_sides(12) == (3, 4) and graphs.torus_sides(36) == (6, 6)
        assert graphs.torus_sides(8) is None and graphs.torus_sides(10) is None


def gossip(topology: str, **kw: object) -> SyncConfig:
    return SyncConfig(topology=f"threads_{topology}", **kw)  # type: ignore[arg-type]


def stacked(workers: list[Worker], which: str, t: int) -> np.ndarray:
    return np.stack([getattr(w, which)[t].numpy() for w in workers])


@pytest.mark.parametrize(("topology", "k"), [("ring", 4), ("ring", 8), ("torus", 9),
                                             ("expander", 7)])
def test_each_gossip_step_is_the_mixing_matrix_applied_to_the_stacked_models(
        topology: str, k: int) -> None:
    w_ref = REFERENCE[topology](k)
    workers, world = run_workers(gossip(topology, algorithm="local", period=1), steps=6,
                                 world=k, local_world=1, train=False)
    for t in range(6):
        np.testing.assert_allclose(stacked(workers, "after", t),
                                   w_ref @ stacked(workers, "before", t), rtol=0, atol=1e-12)
    # Point to point only: no collective over the group, one message per neighbour and sync.
    assert sum(world.everyone.calls.values()) == 0
    degree = int((w_ref[0] > 0).sum()) - 1
    assert world.mailbox.sent[0] == 6 * degree
    totals = workers[0].meter.totals
    model_bytes = sum(p.numel() * 8 for p in workers[0].target.params) + 3 * 8  # + buffer
    assert totals["gossip"].bytes == 6 * degree * model_bytes
    assert totals["gossip"].calls == 6 and totals["average"].calls == 0
    assert all(math.isnan(e.distance) for e in workers[0].controller.events)


def test_local_gossip_mixes_every_period_and_trains_in_between() -> None:
    k, period = 4, 3
    w_ref = ring_mixing(k)
    workers, _ = run_workers(gossip("ring", algorithm="local", period=period), steps=9,
                             world=k, local_world=1)
    for t in range(9):
        before, after = stacked(workers, "before", t), stacked(workers, "after", t)
        if (t + 1) % period == 0:
            np.testing.assert_allclose(after, w_ref @ before, rtol=0, atol=1e-12)
        else:
            np.testing.assert_array_equal(after, before)


def distance(models: np.ndarray) -> float:
    """sqrt(sum_i ||x_i - mean||^2)."""
    return float(np.linalg.norm(models - models.mean(axis=0)))


@pytest.mark.parametrize(("topology", "k"), [("ring", 8), ("torus", 16), ("expander", 11)])
def test_consensus_distance_shrinks_at_the_second_eigenvalue(topology: str, k: int) -> None:
    lam = float(np.sort(np.abs(np.linalg.eigvalsh(REFERENCE[topology](k))))[-2])
    steps = 30
    workers, _ = run_workers(gossip(topology, algorithm="local", period=1), steps=steps,
                             world=k, local_world=1, train=False, shapes=[(400,)])
    d = [distance(stacked(workers, "before", 0))]
    d += [distance(stacked(workers, "after", t)) for t in range(steps)]
    # A symmetric doubly stochastic W never contracts the distance by less than lambda_2
    # per step ...
    for t, dt in enumerate(d):
        assert dt <= lam ** t * d[0] * (1 + 1e-9), t
    # ... and from a random start, after the faster modes have died out, by about that much
    # (the tolerance leaves room for the next eigenvalue's share).
    rate = (d[steps] / d[steps - 10]) ** (1 / 10)
    assert rate == pytest.approx(lam, rel=0.03)


def test_measured_distance_every_n_syncs_and_exact_final_consensus() -> None:
    k = 4
    workers, world = run_workers(gossip("ring", algorithm="local", period=2,
                                        consensus_every=2), steps=8, world=k,
                                 local_world=1, finish=True)
    events = workers[1].controller.events
    syncs = [e for e in events if e.action == "global"]
    assert [e.step for e in syncs] == [2, 4, 6, 8]
    for i, e in enumerate(syncs):
        if i % 2:
            assert math.isnan(e.distance)
            continue
        before = stacked(workers, "before", e.step - 1)
        own = before[1] - before.mean(axis=0)
        assert e.distance == pytest.approx(float(np.linalg.norm(own)), rel=1e-10)
    assert workers[1].meter.totals["consensus"].calls == 2
    # The run ends on the exact average of everyone (not one more gossip step).
    last = stacked(workers, "after", 7)
    for w in workers:
        np.testing.assert_allclose(w.target.flat().numpy(), last.mean(axis=0), atol=1e-13)
        assert w.controller.in_consensus()
    assert events[-1].action == "final" and not math.isnan(events[-1].distance)


def test_overlapped_gossip_adds_the_mix_of_the_snapshot_tau_steps_later() -> None:
    k, period, tau = 4, 4, 2
    w_ref = ring_mixing(k)
    workers, _ = run_workers(gossip("ring", algorithm="local", period=period,
                                    overlap_steps=tau), steps=10, world=k, local_world=1)
    for t in range(10):
        before, after = stacked(workers, "before", t), stacked(workers, "after", t)
        start = t + 1 - tau
        if start > 0 and start % period == 0:
            snap = stacked(workers, "after", start - 1)
            np.testing.assert_allclose(after, before + w_ref @ snap - snap, rtol=0,
                                       atol=1e-12)
        else:
            np.testing.assert_array_equal(after, before)


def test_checkpoint_between_gossip_steps_resumes_bitwise() -> None:
    cfg = gossip("ring", algorithm="post_local", switch_step=2, period=2, consensus_every=3)
    saved: dict[int, tuple[dict, list[torch.Tensor]]] = {}

    def checkpoint(w: Worker, t: int) -> None:
        if t == 4:
            saved[w.rank] = (w.controller.state_dict(), [x.clone() for x in w.target.tensors()])

    full, _ = run_workers(cfg, steps=12, world=4, local_world=1, between=checkpoint)
    resumed, _ = run_workers(cfg, steps=12, world=4, local_world=1, resume=saved)
    for a, b in zip(full, resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.after[5:], b.after, strict=True))
        # Events not yet logged travel in the checkpoint; measured syncs are 4 and 10.
        assert [(e.step, str(e.distance)) for e in a.controller.events] == [
            (e.step, str(e.distance)) for e in b.controller.events]
        assert [e.step for e in b.controller.events if not math.isnan(e.distance)] == [4, 10]
    assert b.controller.state_dict()["measured_syncs"] == 5  # steps 4, 6, 8, 10, 12


def test_gossip_recipes_choose_their_reducer() -> None:
    cfg = load_config(None, ["sync.algorithm=local", "sync.period=1", "sync.topology=ring"])
    assert cfg.sync.reducer == "auto"
    from localsgd.sync.parts import SECTION
    assert SECTION.name_of(cfg.sync, "reducer") == "gossip"
    assert SECTION.name_of(load_config(None, []).sync, "reducer") == "mean"


@pytest.mark.parametrize(("overrides", "text"), [
    (["sync.algorithm=hierarchical", "sync.period=2", "sync.block_period=2",
      "sync.topology=ring"],
     "sync.algorithm=hierarchical with sync.topology=ring: "
     "hierarchical needs node_groups"),
    (["sync.topology=torus"],
     "sync.topology=torus with sync.algorithm=minibatch: "
     "torus needs model_averages"),
    (["sync.algorithm=local", "sync.topology=ring", "sync.update=outer"],
     "sync.update=outer with sync.reducer=gossip: outer needs consensus"),
    (["sync.algorithm=local", "sync.period=4", "sync.topology=ring", "sync.fragments=2",
      "sync.overlap_steps=1"],
     "sync.topology=ring with sync.runner=overlapped: "
     "ring needs whole_syncs"),
    (["sync.algorithm=local", "sync.topology=ring", "sync.reducer=mean"],
     "sync.reducer=mean with sync.topology=ring: mean needs all_workers"),
    (["sync.algorithm=local", "sync.reducer=gossip"],
     "sync.reducer=gossip with sync.topology=complete: gossip needs neighbours"),
    (["sync.algorithm=local", "sync.topology=ring", "sync.consensus_every=-1"],
     "sync.consensus_every: must be >= 0"),
    (["sync.algorithm=local", "sync.topology=rign"],
     "sync.topology: unknown value 'rign'; did you mean 'ring'"),
])
def test_bad_gossip_settings_are_one_line_each(overrides: list[str], text: str) -> None:
    assert_refused(overrides, text)


@pytest.mark.parametrize(("topology", "world", "text"), [
    ("torus", 8, "a torus needs a world size that is a product of two sides >= 3"),
    ("expander", 6, "needs a prime world size"),
])
def test_world_sizes_a_graph_cannot_take_are_refused_at_launch(topology: str, world: int,
                                                               text: str) -> None:
    cfg = load_config(None, ["sync.algorithm=local", f"sync.topology={topology}"])
    with pytest.raises(ConfigError) as err:
        validate_launch(cfg, world, world)
    assert [p for p in err.value.problems
            if p.startswith(f"sync.topology: {topology}: ") and text in p], err.value.problems
    validate_launch(cfg, {"torus": 9, "expander": 7}[topology], 1)


def test_gossip_with_zero_stage_1_is_refused(tmp_path: Path) -> None:
    ds = tmp_path / "zero1.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert_refused(["sync.algorithm=local", "sync.topology=ring", "engine.name=deepspeed",
                    f"engine.deepspeed_config={ds}"],
                   f"engine.deepspeed_config: '{ds}' sets zero_optimization.stage=1, but "
                   "sync.topology=ring")
