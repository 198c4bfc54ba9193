"""Plot series from hand-written records: resumes, missing keys, error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from localsgd.report.plots import collect_series, plot_runs


def _run(path: Path, records: list[dict[str, Any]], algorithm: str = "local") -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"name: t\nsync:\n  algorithm: {algorithm}\n")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _epoch(epoch: int, acc: float | None, **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"event": "epoch", "epoch": epoch, "step": 10 * epoch,
                         "train/loss": 1.0 / epoch, "time/wall_s": 2.0 * epoch,
                         "comm/bytes": 1000 * epoch, **extra}
    if acc is not None:
        r["eval/acc"] = acc
    return r


def test_resumed_run_keeps_last_record_per_epoch_and_skips_missing_eval(tmp_path: Path) -> None:
    records = [
        _epoch(1, 0.1), {"event": "sync", "step": 5, "sync/consensus_distance": 0.3},
        _epoch(2, None),  # eval_every_epochs=2: no eval this epoch
        # crash, resume from the epoch-1 checkpoint: epoch 2 and its sync are redone
        {"event": "sync", "step": 5, "sync/consensus_distance": 0.25},
        _epoch(2, 0.2), _epoch(3, 0.3),
    ]
    run = _run(tmp_path / "a", records)
    series = collect_series([run])
    assert series["acc_vs_epoch"] == {"a (local)": ([1.0, 2.0, 3.0], [0.1, 0.2, 0.3])}
    assert series["loss_vs_epoch"]["a (local)"][0] == [1.0, 2.0, 3.0]
    assert series["consensus_vs_step"] == {"a (local)": ([5.0], [0.25])}


def test_same_named_runs_get_distinct_labels(tmp_path: Path) -> None:
    a = _run(tmp_path / "x" / "run", [_epoch(1, 0.1)], "local")
    b = _run(tmp_path / "y" / "run", [_epoch(1, 0.2)], "local")
    assert set(collect_series([a, b])["acc_vs_epoch"]) == {"run (local)", f"{b} (local)"}


def test_dir_without_metrics_is_a_clear_error(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    good = _run(tmp_path / "good", [_epoch(1, 0.1)])
    assert plot_runs([str(good), str(tmp_path / "missing")], None) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "metrics.jsonl" in err
    assert not list(good.glob("*.png"))


def test_run_without_epochs_yet_is_an_error(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path / "early", [{"event": "step", "step": 1, "train/loss_rank0": 2.0}])
    assert plot_runs([str(run)], None) == 2
    assert "no epoch or sync records" in capsys.readouterr().err


def test_default_output_is_first_run_dir(tmp_path: Path) -> None:
    run = _run(tmp_path / "only", [_epoch(1, 0.1), _epoch(2, 0.2)], "minibatch")
    assert plot_runs([str(run)], None) == 0
    # No sync records: no consensus plot for mini-batch SGD.
    assert sorted(p.name for p in run.glob("*.png")) == [
        "acc_vs_bytes.png", "acc_vs_epoch.png", "acc_vs_time.png", "loss_vs_epoch.png"]


def test_a_sync_and_the_final_average_at_one_step_are_both_drawn(tmp_path: Path) -> None:
    # An overlapped run lands the step-8 average at the end, then takes the final average.
    records = [{"event": "sync", "step": 4, "sync/action": "global",
                "sync/consensus_distance": 0.5},
               {"event": "sync", "step": 8, "sync/action": "global",
                "sync/consensus_distance": 0.4},
               {"event": "sync", "step": 8, "sync/action": "final",
                "sync/consensus_distance": 0.1}, _epoch(1, 0.2)]
    run = _run(tmp_path / "o", records)
    assert collect_series([run])["consensus_vs_step"]["o (local)"] == (
        [4.0, 8.0, 8.0], [0.5, 0.4, 0.1])


def test_consensus_plot_carries_the_period_of_each_sync(tmp_path: Path) -> None:
    syncs = [{"event": "sync", "step": st, "sync/action": "global",
              "sync/consensus_distance": 0.1 * st, "sync/period": per}
             for st, per in ((4, 4), (8, 4), (24, 16))]
    old = {"event": "sync", "step": 4, "sync/action": "global", "sync/consensus_distance": 0.5}
    data = collect_series([_run(tmp_path / "qsr", [_epoch(1, 0.5), *syncs]),
                           _run(tmp_path / "old", [_epoch(1, 0.5), old])])
    assert data["consensus_vs_step+sync/period"] == {"qsr (local)": ([4, 8, 24], [4, 4, 16])}
    assert set(data["consensus_vs_step"]) == {"qsr (local)", "old (local)"}
    assert plot_runs([str(tmp_path / "qsr"), str(tmp_path / "old")], str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "consensus_vs_step.png").stat().st_size > 0
