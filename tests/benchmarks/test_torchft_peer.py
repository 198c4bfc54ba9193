"""torchft's DiLoCo peer in the multi-node harness, without root: commands, fragments, bounds."""

from __future__ import annotations

import importlib
import itertools
import sys
from pathlib import Path

import pytest
from test_multinode_harness import HERE, bench, netem
from torch import nn

from localsgd.models import build_model
from localsgd.recipe import load_config

sys.path.insert(0, str(HERE))
worker = importlib.import_module("torchft_worker")
overlap = importlib.import_module("bench_overlap")
sys.path.remove(str(HERE))


def test_each_replica_group_is_its_own_job_on_its_own_address() -> None:
    cmd = netem.node_command(1, 2, 1, ["r.yaml"], loopback=False, torchrun="torchrun",
                             entry=HERE / "torchft_worker.py", own_job=True)
    assert cmd[:4] == ["ip", "netns", "exec", netem.node_ns(1)]
    assert "--nnodes=1" in cmd and "--node-rank=0" in cmd
    assert f"--master-addr={netem.node_ip(1)}" in cmd
    with pytest.raises(ValueError, match="namespaces"):
        netem.node_command(1, 2, 1, ["r.yaml"], loopback=True, own_job=True)
    env = bench.replica_env(2)(1)
    assert env == {"TORCHFT_LIGHTHOUSE": f"http://{netem.node_ip(0)}:{bench.LIGHTHOUSE_PORT}",
                   "REPLICA_GROUP_ID": "1", "NUM_REPLICA_GROUPS": "2"}
    argv = bench.lighthouse_argv(2)
    assert argv[0].endswith("torchft_lighthouse") and argv[argv.index("--min_replicas") + 1] == "2"


def test_peer_runs_the_sparseloco_recipe_workload(tmp_path: Path) -> None:
    ours = bench.train_args(bench.VARIANTS["sparseloco-H4-o1"], 64, 64, 2, tmp_path)
    peer = bench.train_args(bench.VARIANTS["torchft-H4-f2-d1"], 64, 64, 2, tmp_path)
    assert ours[0] == peer[0] == str(bench.SPARSELOCO)
    # Same data, model and inner loop; only how the workers synchronise differs.
    assert [a for a in ours if not a.startswith("sync.")] == [
        a for a in peer if not a.startswith("--ft-")]
    assert "--ft-bucketize" in peer and "--ft-delay=1" in peer and "--ft-fragments=2" in peer
    for key, group in overlap.GROUPS.items():
        assert {group.bound, group.blocking, group.peer} <= set(group.names), key
        assert set(group.names) <= set(bench.VARIANTS), key


def _units_sizes() -> tuple[list[int], nn.Module]:
    cfg = load_config(str(bench.SPARSELOCO), ["data.name=synthetic", "data.image_size=32"])
    model = build_model(cfg.model, 10, 32)
    return [sum(p.numel() for p in u.parameters()) for u in worker.units(model)], model


@pytest.mark.parametrize("n", [2, 3, 4])
def test_balanced_fragments_are_the_best_contiguous_split(n: int) -> None:
    sizes, model = _units_sizes()
    frags = worker.balanced_fragments(model, n)
    got = [sum(p.numel() for p in f.parameters()) for f in frags]
    # Every parameter in exactly one fragment, in model order.
    ids = [id(p) for f in frags for p in f.parameters()]
    assert ids == [id(p) for p in model.parameters()]
    # Brute force over every set of cut points: none has a smaller largest fragment.
    best = min(max(sum(sizes[i:j]) for i, j in zip((0, *cuts), (*cuts, len(sizes)),
                                                    strict=True))
               for cuts in itertools.combinations(range(1, len(sizes)), n - 1))
    assert max(got) == best and all(g > 0 for g in got)


def test_marginal_bytes_use_each_groups_own_bound() -> None:
    def row(variant: str, rnd: int, engine: float, wire: float) -> dict[str, object]:
        return {"variant": variant, "rate": "20mbit", "round": rnd, "flat_ring": True,
                "ring_factor": 1.0, "engine_bytes_per_rank": engine, "wire_tx_mean": wire,
                "wire_tx_mean_minus_headers": wire - 1000}

    rows = [row("no-comm-sparseloco", 0, 1e6, 2e6), row("no-comm-sparseloco", 1, 1e6, 3e6),
            row("sparseloco-H4", 0, 1.1e6, 2.105e6), row("sparseloco-H4", 1, 1.1e6, 3.095e6)]
    bench.add_marginal(rows, {"sparseloco-H4": "no-comm-sparseloco"})
    assert rows[2]["marginal_wire_ratio"] == pytest.approx(1.05)
    assert rows[3]["marginal_wire_ratio"] == pytest.approx(0.95)


def test_peer_table_ratios_bytes_and_dropped_commits() -> None:
    sys.path.insert(0, str(HERE))
    table_mod = importlib.import_module("peer_table")
    sys.path.remove(str(HERE))

    def row(variant: str, rnd: int, sps: float, sync: int, commits: tuple[int, int] | None,
            ) -> dict[str, object]:
        peer = {} if commits is None else {"peer/commits": commits[0],
                                           "peer/commit_failures": commits[1]}
        return {"variant": variant, "rate": "20mbit", "round": rnd, "steady_steps_per_s": sps,
                "comm": {"comm/average/bytes": sync, "comm/bytes": sync + 10},
                "peer": peer, "flat_ring": True, "ring_factor": 1.0,
                "engine_bytes_per_rank": sync + 10, "wire_tx_mean": 2.0 * sync + 100,
                "wire_tx_mean_minus_headers": 2.0 * sync}

    rows = [r for rnd, (a, b, c) in enumerate([(10.0, 9.0, 6.0), (8.0, 8.0, 5.0),
                                               (9.0, 8.1, 6.0)])
            for r in (row("no-comm-sparseloco", rnd, a, 100, None),
                      row("sparseloco-H4-o1", rnd, b, 1100, None),
                      row("torchft-no-sync", rnd, a, 0, (0, 0)),
                      row("torchft-H4-f2-d1", rnd, c, 100_000, (32, 0)),
                      row("torchft-H4-f2-d1-q", rnd, a, 100_000, (0, 32)))]
    text = table_mod.table(rows)
    ours = next(line for line in text.splitlines() if line.startswith("| sparseloco-H4-o1 |"))
    # Medians of each round's ratio: 0.9, 1.0, 0.9 to the bound; 1.5, 1.6, 1.35 to torchft.
    assert "| 0.90 | 1.50 |" in ours and "| 0.0110 |" in ours
    # The wire doubles the engine's added bytes here (2 x 1000 over 1000).
    assert ours.endswith("| 2.000 |")
    assert "| torchft-H4-f2-d1-q (syncs dropped) |" in text
    assert "| 32 / 0 |" in text and "| 0 / 32 |" in text
