"""benchmarks/multinode/tta_lm.py without root: the runs it asks for, and how it reads them."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pytest
from conftest import REPO

from localsgd.recipe import load_config

sys.path.insert(0, str(REPO / "benchmarks" / "multinode"))
import netem  # noqa: E402 - a sibling script of tta_lm, not an installed package
import tta_lm  # noqa: E402 - likewise

ARGS = argparse.Namespace(minibatch_steps=160, steps=256, data=tta_lm.TEXT,
                          cache=Path("/tmp/cache"), test_subset=512, schedule_steps=256,
                          eval_every=16, target_bpb=3.0)


@pytest.mark.skipif(not tta_lm.TEXT.is_dir(), reason="no text corpus")
def test_every_variant_shares_the_schedule_target_and_evaluation(tmp_path: Path) -> None:
    cfgs = {}
    for v in tta_lm.VARIANTS:
        recipe, *overrides = tta_lm.train_args(ARGS, v, 1, tmp_path / v)
        cfgs[v] = load_config(recipe, overrides)
    for v, cfg in cfgs.items():
        assert cfg.lr_schedule.total_steps == 256 and cfg.seed == 1
        assert cfg.train.max_steps == (160 if v == "minibatch" else 256)
        assert cfg.train.target_loss == pytest.approx(3.0 * math.log(2), rel=1e-12)
        assert (cfg.train.eval_every_steps, cfg.data.test_subset) == (16, 512)
        assert cfg.run.checkpoint_every_steps == 0 and not cfg.run.resume
    assert cfgs["minibatch"].sync.algorithm == "minibatch"
    assert cfgs["sparseloco"].sync.compression.method == "chunk_topk"


def test_at_target_is_the_first_evaluation_at_or_below_it() -> None:
    records = [{"event": "step", "step": 8, "time/wall_s": 1.0},
               {"eval/bpb": 3.2, "step": 16, "tokens": 100, "comm/bytes": 2**20,
                "time/wall_s": 10.0},
               {"eval/bpb": 3.0, "step": 32, "tokens": 200, "comm/bytes": 3 * 2**20,
                "time/wall_s": 20.0},
               {"eval/bpb": 2.9, "step": 48, "tokens": 300, "comm/bytes": 5 * 2**20,
                "time/wall_s": 30.0}]
    assert tta_lm.at_target(records, 3.0) == {"wall_s": 20.0, "step": 32, "tokens": 200,
                                              "mib_per_worker": 3.0, "bpb": 3.0}
    assert tta_lm.at_target(records, 2.5) is None


def test_its_namespaces_carry_their_own_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PREFIX", "BRIDGE_NS", "BRIDGE"):
        monkeypatch.setattr(netem, name, getattr(netem, name))  # restored after the test
    netem.use_prefix("lm9")
    assert (netem.node_ns(1), netem.node_if(1), netem.BRIDGE_NS, netem.BRIDGE) == (
        "lm9-n1", "lm91", "lm9-br", "lm9br0")
    assert netem.node_command(1, 2, 1, ["r.yaml"], loopback=False)[:4] == [
        "ip", "netns", "exec", "lm9-n1"]
