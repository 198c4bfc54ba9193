"""Elastic restarts with exact resume, world-size changes, damaged checkpoints, stopped peers,
non-finite losses: real torchrun agents, real signals, real checkpoint files."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, synthetic_args, torchrun, worker_env
from helpers import final_model, summary

FAULT = REPO / "tests" / "integration" / "fault_entry.py"
# post-local: mini-batch for 20 steps, then H=5; a checkpoint every 6 steps; 16 steps/epoch.
COMMON = ["sync.algorithm=post_local", "sync.switch_step=20", "sync.period=5",
          "train.epochs=3", "train.max_steps=40", "run.checkpoint_every_steps=6",
          "run.checkpoint_every_epochs=1"]


def elastic(port: int) -> list[str]:
    """An elastic launch as documented: 1 to 2 nodes, c10d rendezvous, restarts allowed."""
    return ["--nnodes=1:2", "--max-restarts=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-conf=last_call_timeout=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ft") / "clean"
    torchrun(synthetic_args(run, *COMMON))
    return run


@pytest.mark.parametrize("kill_step", [
    pytest.param(9, id="minibatch-phase", marks=pytest.mark.slow),
    pytest.param(27, id="between-syncs")])
def test_sigkilled_worker_restarts_and_resumes_bitwise(
        tmp_path: Path, uninterrupted: Path, kill_step: int) -> None:
    run = tmp_path / "killed"
    env = worker_env(FAULT_RANK="1", FAULT_STEP=str(kill_step), FAULT_SIGNAL="KILL")
    proc = torchrun(synthetic_args(run, *COMMON), script=FAULT, env=env,
                    extra_launch=elastic(free_port()))
    resumed = 6 * (kill_step // 6)
    assert f"resumed from step {resumed}" in proc.stdout, proc.stdout[-2000:]
    a, b = final_model(uninterrupted), final_model(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    clean = summary(uninterrupted)
    after = summary(run)
    for key in ("comm/grad/calls", "comm/average/calls", "comm/average/bytes", "step"):
        assert clean[key] == after[key], key


def test_world_size_change_resumes_from_the_average(tmp_path: Path) -> None:
    run = tmp_path / "shrink"
    common = ["sync.algorithm=local", "sync.period=5", "run.checkpoint_every_epochs=1"]
    torchrun(synthetic_args(run, *common, "train.max_steps=16"))
    ckpt = run / "checkpoints" / "step-00000016"
    old = [torch.load(ckpt / f"rank{r}.pt", weights_only=True)["engine"]["model"]
           for r in range(2)]
    assert any(not torch.equal(old[0][k], old[1][k]) for k in old[0])
    # One worker: 32 steps per epoch, so epoch 1 starts at step 32; stopping there saves
    # exactly the model the new worker resumed from.
    proc = torchrun(synthetic_args(run, *common, "train.max_steps=32"), nproc=1)
    assert "resumed from step 32 (epoch 1, written by 2 workers, now 1)" in proc.stdout
    resumed = final_model(run)
    for k in resumed:
        assert torch.allclose(resumed[k], (old[0][k] + old[1][k]) / 2, atol=1e-7), k
    proc = torchrun(synthetic_args(run, *common), nproc=1)  # and training goes on
    result = summary(run)
    assert result["world_size"] == 1 and result["step"] == 64


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    run = tmp_path / "damaged"
    args = ["run.checkpoint_every_steps=4", "run.keep_checkpoints=2"]
    torchrun(synthetic_args(run, *args, "train.max_steps=16"))
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-00000012", "step-00000016"]
    latest = run / "checkpoints" / "step-00000016" / "rank1.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    proc = torchrun(synthetic_args(run, *args, "train.max_steps=20"))
    assert "resumed from step 12" in proc.stdout
    assert "step-00000016 is incomplete or corrupted" in proc.stderr


def test_nonfinite_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "nan"
    proc = torchrun(synthetic_args(run, "run.checkpoint_every_steps=1", "optim.base_lr=1e3",
                                   "train.max_steps=30"), check=False)
    assert proc.returncode != 0
    messages = [line for line in proc.stderr.splitlines() if "localsgd: error" in line]
    assert len(messages) == 1, proc.stderr[-3000:]
    assert re.search(r"(loss is nan in step|parameters became non-finite by step) \d+",
                     messages[0])
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    kept = sorted((run / "checkpoints").iterdir())
    assert kept and all((d / "COMPLETE").exists() for d in kept)
    for rank in range(2):
        state = torch.load(kept[-1] / f"rank{rank}.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["engine"]["model"].values())


@pytest.mark.slow
def test_stopped_peer_fails_within_timeout_then_restart_resumes(
        tmp_path: Path, uninterrupted: Path) -> None:
    """SIGSTOP freezes a worker; the other fails its next collective after dist.timeout_s,
    torchrun restarts the job, and it still ends bitwise equal to the uninterrupted run."""
    run = tmp_path / "stopped"
    env = worker_env(FAULT_RANK="1", FAULT_STEP="14", FAULT_SIGNAL="STOP")
    start = time.monotonic()
    proc = torchrun(synthetic_args(run, *COMMON, "dist.timeout_s=8"), script=FAULT, env=env,
                    extra_launch=elastic(free_port()), timeout=300)
    assert time.monotonic() - start < 200
    assert "a collective did not complete within dist.timeout_s=8s" in proc.stderr
    assert "resumed from step 12" in proc.stdout
    a, b = final_model(uninterrupted), final_model(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
