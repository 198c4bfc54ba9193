"""SlowMo over gossip and CHOCO-SGD under real gloo point-to-point sends (4 processes).

The real ring topology moves the bytes with ``batch_isend_irecv``; the expectations are
the numpy replays of tests/sync/test_slowmo_gossip.py and tests/sync/test_choco.py, which
the thread tier checks at K = 4 and 8 (no LR schedule here: gamma = 1 in the outer step).
Four process start-ups cost about a minute on 2 loaded cores, so this is the slow tier.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from procs import Record, Scenario, run_processes
from test_choco import Replay as ChocoReplay
from test_slowmo_gossip import Replay as SlowMoReplay

from localsgd.sync.reducers.choco import ChocoOptions
from localsgd.sync.reducers.compressed import CompressionKeys
from localsgd.sync.updates.outer import OuterOptimizerKeys

pytestmark = pytest.mark.slow

K = 4
SCENARIOS = [
    Scenario("slowmo", {"algorithm": "local", "period": 1, "topology": "ring",
                        "exact_every": 3, "update": "outer",
                        "outer": OuterOptimizerKeys(lr=0.7, momentum=0.9, nesterov=True,
                                                    scale_by_inner_lr=False)},
             steps=7, resume_at=4, finish=True),
    Scenario("choco", {"algorithm": "local", "period": 1, "topology": "ring",
                       "reducer": "choco", "compression": CompressionKeys(method="sign"),
                       "choco": ChocoOptions(gamma=0.4)},
             steps=6, resume_at=3, finish=True),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Record]]:
    return run_processes(K, SCENARIOS, tmp_path_factory.mktemp("gossip_gloo"))


def rows(ranks: list[dict[str, Record]], name: str, which: str) -> list[np.ndarray]:
    """Per step, the stacked flat models of every rank."""
    per_rank = [getattr(r[name], which) for r in ranks]
    return [np.stack([p[t].numpy() for p in per_rank]) for t in range(len(per_rank[0]))]


def check_resume_and_final(ranks: list[dict[str, Record]], name: str, at: int) -> None:
    for r in ranks:
        rec = r[name]
        assert all(torch.equal(a, b) for a, b in zip(rec.after[at:], rec.resumed_after,
                                                     strict=True))
    finals = np.stack([r[name].final.numpy() for r in ranks])  # type: ignore[union-attr]
    for row in finals:  # the run ends on one model
        np.testing.assert_array_equal(row, finals[0])


def test_slowmo_over_gossip_under_gloo(ranks: list[dict[str, Record]]) -> None:
    replay = SlowMoReplay(K, "diloco", 3)
    replay.outer = (0.7, 0.9, True, False)
    for before, after in zip(rows(ranks, "slowmo", "before"), rows(ranks, "slowmo", "after"),
                             strict=True):
        expected, _ = replay.sync(before, 0)
        np.testing.assert_allclose(after, expected, rtol=1e-9, atol=1e-12)
    assert [a for _, a, _ in ranks[0]["slowmo"].events] == [
        "gossip", "gossip", "global", "gossip", "gossip", "global", "gossip", "final"]
    check_resume_and_final(ranks, "slowmo", 4)


def test_choco_under_gloo(ranks: list[dict[str, Record]]) -> None:
    replay = ChocoReplay(K, "sign", 0.4)
    for before, after in zip(rows(ranks, "choco", "before"), rows(ranks, "choco", "after"),
                             strict=True):
        np.testing.assert_allclose(after, replay.sync(before), rtol=1e-9, atol=1e-12)
    comm = ranks[0]["choco"].comm
    payload = (3 * 4 + 4 * 4) * 2  # 69 sign bits in 3 words, 4 scales, to 2 neighbours
    assert comm["comm/gossip/bytes"] == 6 * payload
    check_resume_and_final(ranks, "choco", 3)

