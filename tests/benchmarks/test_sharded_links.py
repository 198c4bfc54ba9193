"""bench_sharded_links.py without root: its overrides, the per-sync deltas, the ring model."""

from __future__ import annotations

import pytest
from test_multinode_harness import _load

links = _load("bench_sharded_links")


def test_interval_overrides_give_the_global_sync_every_n_steps() -> None:
    # Hierarchical syncs globally every period (2) * block_period steps.
    assert links.interval_value("hier-g1", 16) == 8
    assert links.interval_value("fsdp-node", 16) == 16
    assert "engine.name=fsdp" in links.LAYOUTS["fsdp-node"][0]


def _row(syncs: int, tx: tuple[int, int], engine: int) -> dict[str, object]:
    nodes = [{"tx_bytes": t, "rx_bytes": t + 1, "tx_packets": t // 1000} for t in tx]
    return {"global_syncs": syncs, "syncs": syncs, "node_results": nodes,
            "comm": {"comm/bytes": engine, "comm/average/bytes": engine}}


def test_per_sync_is_the_difference_over_the_syncs_apart() -> None:
    many, few = _row(16, (9_000_000, 8_000_000), 5_000_000), _row(2, (2_000_000, 1_000_000),
                                                                    800_000)
    got = links.per_sync(many, few)
    assert got["syncs_apart"] == 14
    assert got["veth_tx_per_node"] == pytest.approx(7_000_000 / 14)
    assert got["veth_txrx_per_node"] == pytest.approx(2 * 7_000_000 / 14)
    assert got["engine_bytes_per_rank"] == pytest.approx(4_200_000 / 14)
    assert got["tx_minus_headers_per_node"] == pytest.approx((7_000_000 - 7_000 * 66) / 14)


def test_ring_model_of_a_node_per_sync() -> None:
    # One ring over 4 ranks crosses each node once with 2 * 3/4 of the payload; two rings of
    # 2 (one per shard column) both cross, each with 2 * 1/2 of one rank's payload.
    assert links.expected_tx("hier-g1", 1000) == pytest.approx(1500)
    assert links.expected_tx("fsdp-node", 500) == pytest.approx(1000)
