"""Resumes with another sync part, end to end: real torchrun workers, real checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run_group, synthetic_args, torchrun, worker_env
from helpers import final_model, summary

# 16 steps per epoch; a sync every 4 steps.
LOCAL = ["sync.algorithm=local", "sync.period=4", "run.checkpoint_every_epochs=1"]


@pytest.mark.slow
def test_compression_turned_on_mid_period_is_refused_with_one_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    torchrun(synthetic_args(run, *LOCAL, "train.max_steps=6"))
    # Relaunched as users start jobs, through ``localsgd run``.
    proc = run_group([sys.executable, "-m", "localsgd", "run", "--nproc-per-node=2",
                      *synthetic_args(run, *LOCAL, "train.max_steps=12",
                                      "sync.compression.method=ef_sign")],
                     env=worker_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = (f"sync.compression.method: the checkpoint in {run}/checkpoints/step-00000006 was "
            "written with none, the recipe says ef_sign; resuming mid-period needs the anchor "
            "(the model of the last sync) it never kept. Resume with "
            "sync.compression.method=none, or start fresh with run.resume=false (or another "
            "run.dir)")
    assert f"  - {line}\n" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "resumed from step" not in proc.stdout
    assert "localsgd: error: the job failed (rank 0 exit code 2" in proc.stderr
    assert summary(run)["step"] == 6  # the first launch's, untouched


@pytest.mark.slow
def test_compression_turned_on_at_a_boundary_continues(tmp_path: Path) -> None:
    run = tmp_path / "run"
    torchrun(synthetic_args(run, *LOCAL, "train.max_steps=8"))
    before = summary_bytes(run)
    proc = torchrun(synthetic_args(run, *LOCAL, "train.max_steps=16",
                                   "sync.compression.method=ef_sign"))
    assert "resumed from step 8" in proc.stdout
    s = summary(run)
    assert s["step"] == 16 and s["eval/acc"] is not None
    # Syncs at 12 and 16 send signs, about 1 bit per parameter and worker, not 32.
    numel = sum(t.numel() for t in final_model(run).values())
    sent = s["comm/average/bytes"] - before
    assert 2 * numel / 8 <= sent < 2 * numel * 4 / 16


def summary_bytes(run: Path) -> float:
    return float(summary(run)["comm/average/bytes"])
