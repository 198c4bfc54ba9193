"""Every schedule x topology x reducer x update x runner: it runs, or the capability rule
refuses it, each refusal one line per unmet need that names the keys of both sides.

Accepted cells run on 4 thread workers (the thread twins of the real parts) and are checked
against numpy: blocking syncs of an exact mean with the copy update give every worker the
mean of the models before the sync; any blocking sync through a reducer that gives
consensus leaves the workers on one model (as does every exact round of a ring with
``sync.exact_every``); a blocking gossip step is the ring's mixing matrix applied to the
stacked models, a CHOCO step the paper's rule on public copies; steps without a sync
(blocking) leave the models as the local step made them.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from threads import FakeTarget, run_workers, scaled_sign

from localsgd.config import ConfigError
from localsgd.recipe import load_config
from localsgd.sync.config import SyncConfig
from localsgd.sync.reducers.compressed import CompressionKeys

SWITCH = 2
"""The post-local switch step."""
SCHEDULES = {"minibatch": {}, "local": {"period": 2},
             "post_local": {"switch_step": SWITCH, "period": 2},
             "hierarchical": {"period": 1, "block_period": 2}}
TOPOLOGIES = {"complete": "threads", "ring": "threads_ring", "ring_exact": "threads_ring"}
"""ring_exact: a ring whose every second global sync is exact (sync.exact_every=2)."""
EXACT_EVERY = {"ring_exact": 2}
REDUCERS = {"mean": "threads", "compressed": "threads_compressed", "gossip": "gossip",
            "choco": "choco"}
METHOD = {"compressed": "ef_sign", "choco": "sign"}
"""The codec each compressing reducer is given."""
GRAPH_REDUCERS = ("gossip", "choco")
UPDATES = ["copy", "outer"]
RUNNERS = {"blocking": 0, "overlapped": 1}
RING4 = (np.eye(4) + np.roll(np.eye(4), 1, axis=1) + np.roll(np.eye(4), -1, axis=1)) / 3


class AllReduced(FakeTarget):
    """Mini-batch steps (before the post-local switch) alike on every worker, as if their
    gradients were all-reduced, so the workers agree when local steps begin."""

    def local_step(self, step: int) -> None:
        rank = self.rank
        self.rank = 0 if step < SWITCH else rank
        super().local_step(step)
        self.rank = rank


CELLS = list(itertools.product(SCHEDULES, TOPOLOGIES, REDUCERS, UPDATES, RUNNERS))


def overrides(schedule: str, topology: str, reducer: str, update: str,
              runner: str) -> list[str]:
    keys = {"algorithm": schedule, "topology": topology.removesuffix("_exact"),
            "reducer": reducer,
            "update": update, "runner": runner, "overlap_steps": RUNNERS[runner],
            **SCHEDULES[schedule]}
    if reducer in METHOD:
        keys["compression.method"] = METHOD[reducer]
    if schedule == "post_local":
        keys["period"] = 2
    if topology in EXACT_EVERY:
        keys["exact_every"] = EXACT_EVERY[topology]
    return [f"sync.{k}={'null' if v is None else v}" for k, v in keys.items()]


@pytest.mark.parametrize("cell", CELLS, ids=["-".join(c) for c in CELLS])
def test_each_cell_runs_or_is_refused_by_the_capability_rule(cell: tuple[str, ...]) -> None:
    schedule, topology, reducer, update, runner = cell
    try:
        load_config(None, overrides(*cell))
    except ConfigError as err:
        assert err.problems
        for line in err.problems:
            assert "\n" not in line and " needs " in line, line
            chosen = line.split(":")[0]
            # The part that needs, then (after "with") the chosen parts that could give it.
            assert chosen.startswith("sync.") and "=" in chosen, line
        return
    cfg = SyncConfig(algorithm=schedule, topology=TOPOLOGIES[topology],  # type: ignore[arg-type]
                     reducer=REDUCERS[reducer], update=update, runner=runner,
                     overlap_steps=RUNNERS[runner], exact_every=EXACT_EVERY.get(topology, 0),
                     compression=CompressionKeys(method=METHOD.get(reducer, "none")),
                     **SCHEDULES[schedule])
    workers, _ = run_workers(cfg, steps=8, world=4, local_world=2, lr_at=lambda s: 0.1,
                             target=AllReduced)
    schedule_of = workers[0].controller.schedule
    # The scope each sync took (a gossip topology with exact rounds turns some global
    # syncs into gossip steps).
    took = {e.step: e.action for e in workers[0].controller.events}
    hat = np.zeros((4, 66))
    for t in range(8):
        before = np.stack([w.before[t].numpy() for w in workers])
        after = np.stack([w.after[t].numpy() for w in workers])
        assert np.isfinite(after).all()
        if runner != "blocking":
            continue
        action = schedule_of.action_after(t + 1)
        if action is None:
            np.testing.assert_array_equal(after, before)
        elif took[t + 1] == "global" and (reducer not in GRAPH_REDUCERS
                                          or topology in EXACT_EVERY):
            for row in after:
                np.testing.assert_array_equal(row, after[0])
            if (reducer == "mean" or topology in EXACT_EVERY) and update == "copy":
                np.testing.assert_allclose(after[0], before.mean(axis=0), rtol=0, atol=1e-12)
        elif reducer == "gossip":  # a gossip step: the ring's W on the stacked models
            np.testing.assert_allclose(after, RING4 @ before, rtol=0, atol=1e-12)
        elif reducer == "choco":  # public copies from 0, scaled signs, gamma = 1
            hat = hat + np.stack([scaled_sign(x - h) for x, h in zip(before, hat, strict=True)])
            np.testing.assert_allclose(after, before + RING4 @ hat - hat, rtol=1e-9,
                                       atol=1e-12)


def test_the_rule_refuses_exactly_the_documented_combinations() -> None:
    refused = set()
    for cell in CELLS:
        try:
            load_config(None, overrides(*cell))
        except ConfigError:
            refused.add(cell)
    # Every cell that mixes gossip with an exact reducer, or a graph with the compressed or
    # mean reducer, or outer over gossip without exact rounds, is refused; compression
    # composes with everything else (outer, overlap, hierarchical), and outer with gossip
    # that has exact rounds (SlowMo over gossip).
    assert ("local", "complete", "compressed", "outer", "overlapped") not in refused
    assert ("hierarchical", "complete", "compressed", "outer", "blocking") not in refused
    assert ("local", "ring", "gossip", "copy", "overlapped") not in refused
    assert ("local", "ring_exact", "gossip", "outer", "overlapped") not in refused
    for cell in CELLS:
        schedule, topology, reducer, update, runner = cell
        graph = topology.startswith("ring")
        expect = ((graph != (reducer in GRAPH_REDUCERS))
                  or (update == "outer" and topology == "ring")
                  or (graph and schedule in ("minibatch", "hierarchical"))
                  or (update == "outer" and schedule == "minibatch"))
        assert (cell in refused) == expect, cell


@pytest.mark.parametrize("runner", RUNNERS)
def test_averaged_adamw_moments_combine_with_every_runner(runner: str) -> None:
    # Blocking replaces the moments by their average; overlapped lands them as the
    # correction scaled by beta^tau, replayed in tests/sync/test_adamw_overlap.py.
    load_config(None, ["optim.name=adamw", "sync.momentum=average",
                       *overrides("local", "complete", "mean", "copy", runner)])
