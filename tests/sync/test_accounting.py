"""The communication meter: standard kinds always reported, new kinds opened by any part."""

from __future__ import annotations

from localsgd.sync.accounting import KINDS, CommMeter


def test_a_part_can_record_a_kind_of_its_own() -> None:
    meter = CommMeter()
    meter.record("average", 400, 0.5)
    meter.record("average_compressed", 13, 0.25, calls=2)
    flat = meter.flat()
    assert all(f"comm/{k}/calls" in flat for k in KINDS)  # present even when zero
    assert (flat["comm/average_compressed/bytes"], flat["comm/average_compressed/calls"]) == (
        13, 2)
    assert (flat["comm/bytes"], flat["comm/calls"], flat["comm/seconds"]) == (413, 3, 0.75)
    restored = CommMeter()
    restored.load_state_dict(meter.state_dict())
    assert restored.flat() == flat
    assert "average_compressed 0.0 MiB/2 calls" in meter.summary_line()
