"""The study table's columns: validation loss beside accuracy for every task, and bits per
byte as the headline (table column and frontier axis) when every run is a language model's."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from localsgd.study.table import markdown, variant_rows


def _records(tmp_path: Path, summaries: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    records, point = [], 0
    for variant, runs in summaries.items():
        for seed, summary in enumerate(runs):
            point += 1
            run_dir = tmp_path / f"{variant}_seed={seed}"
            run_dir.mkdir()
            base = {"eval/acc": 0.5, "eval/best_acc": 0.5, "time/wall_s": 10.0,
                    "comm/bytes": 2**20}
            (run_dir / "summary.json").write_text(json.dumps({**base, **summary}))
            records.append({"point": point, "variant": variant, "status": "complete",
                            "run_dir": str(run_dir)})
    return records


def test_lm_rows_carry_loss_and_bits_per_byte_and_the_table_shows_them(tmp_path: Path) -> None:
    losses = {"minibatch": [1.91, 1.94, 1.92], "diloco": [2.05, 2.08]}
    records = _records(tmp_path, {
        v: [{"eval/loss": x, "eval/bpb": x / math.log(2)} for x in xs]
        for v, xs in losses.items()})
    rows = variant_rows(records)
    for row, (variant, xs) in zip(rows, losses.items(), strict=True):
        assert row["variant"] == variant and row["runs"] == len(xs)
        assert math.isclose(row["final_loss_mean"], sum(xs) / len(xs))
        assert math.isclose(row["final_loss_std"], statistics.stdev(xs))
        assert math.isclose(row["final_bpb_mean"], sum(xs) / len(xs) / math.log(2))
    md = markdown(rows).splitlines()
    assert "final eval loss | final eval bits/byte |" in md[0]
    assert md[1].count("|") == md[0].count("|") == md[2].count("|")
    assert f"{sum(losses['diloco']) / 2 / math.log(2):.4f} +- " in md[3]


def test_classifier_rows_have_loss_but_no_bits_per_byte_column(tmp_path: Path) -> None:
    records = _records(tmp_path, {"local": [{"eval/loss": 1.2}, {"eval/loss": 1.4}]})
    (row,) = variant_rows(records)
    assert math.isclose(row["final_loss_mean"], 1.3) and row["final_bpb_mean"] is None
    md = markdown([row]).splitlines()
    assert "final eval loss |" in md[0] and "bits/byte" not in md[0]
    assert md[1].count("|") == md[0].count("|") == md[2].count("|")
