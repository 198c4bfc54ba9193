"""``localsgd run``: real torchrun launches through the launcher API, as users start jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, free_port, run_group, synthetic_args, worker_env
from helpers import final_model, summary

LOCALSGD = [sys.executable, "-m", "localsgd", "run"]


def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return run_group([*LOCALSGD, *args], env=worker_env(), timeout=timeout)


def test_bad_recipe_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    proc = run("--nproc-per-node=2", *synthetic_args(tmp_path / "r", "sync.algoritm=local"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("localsgd: error")]
    assert len(errors) == 1, proc.stderr
    assert "sync.algoritm: unknown key; did you mean 'sync.algorithm'?" in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing started


def test_launch_facts_are_checked_before_any_worker_starts(tmp_path: Path) -> None:
    proc = run("--nnodes=1", "--nproc-per-node=2",
               *synthetic_args(tmp_path / "r", "sync.algorithm=hierarchical"))
    assert proc.returncode == 2
    assert "hierarchical needs at least 2 nodes" in proc.stderr


def test_a_finished_run_is_reported_complete_on_relaunch(tmp_path: Path) -> None:
    args = synthetic_args(tmp_path / "r", "run.checkpoint_every_epochs=1")
    first = run("--nproc-per-node=2", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    model = final_model(tmp_path / "r")
    again = run("--nproc-per-node=2", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    acc = summary(tmp_path / "r")["eval/acc"]
    assert again.stdout.strip().splitlines() == [
        f"localsgd: {tmp_path / 'r'} is already complete (step 32, final eval/acc {acc:.4f}); "
        "to train again use run.resume=false or another run.dir"]
    assert all((model[k] == final_model(tmp_path / "r")[k]).all() for k in model)


def test_a_worker_failure_is_one_line_per_rank(tmp_path: Path) -> None:
    proc = run("--nproc-per-node=2", *synthetic_args(tmp_path / "r", "data.name=cifar10",
                                                     "data.root=/nonexistent",
                                                     "data.download=false"))
    assert proc.returncode == 2
    assert "CIFAR-10 not found" in proc.stderr
    assert "localsgd: error: the job failed (rank 0 exit code 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_elastic_restart_resumes_after_a_worker_is_killed(tmp_path: Path) -> None:
    """--max-restarts passes through: a SIGKILLed worker restarts the group, which resumes
    from the latest checkpoint and finishes with the same model as an unbroken run."""
    common = ["train.epochs=30", "run.checkpoint_every_steps=4"]
    whole = run("--nproc-per-node=2", *synthetic_args(tmp_path / "whole", *common))
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = tmp_path / "cut"
    cmd = [*LOCALSGD, "--nproc-per-node=2", "--max-restarts=1",
           *synthetic_args(run_dir, *common, "dist.timeout_s=30")]
    with subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as p:
        try:
            deadline = time.monotonic() + 120
            while not any((run_dir / "checkpoints").glob("step-*/COMPLETE")):
                assert time.monotonic() < deadline and p.poll() is None, "no checkpoint"
                time.sleep(0.05)
            workers = subprocess.run(["pgrep", "-f", f"localsgd train .*run.dir={run_dir}"],
                                     capture_output=True, text=True).stdout.split()
            assert workers, "no worker process found"
            os.kill(int(workers[-1]), signal.SIGKILL)
            out, err = p.communicate(timeout=240)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err[-3000:]
    assert "resumed from step" in out
    a, b = final_model(tmp_path / "whole"), final_model(run_dir)
    assert all((a[k] == b[k]).all() for k in a)


def test_two_node_launch_with_static_rendezvous(tmp_path: Path) -> None:
    port = str(free_port())
    procs = [subprocess.Popen(
        [*LOCALSGD, "--nnodes=2", f"--node-rank={n}", "--nproc-per-node=1",
         "--master-addr=127.0.0.1", f"--master-port={port}",
         *synthetic_args(tmp_path / "r", "sync.algorithm=hierarchical", "sync.period=2")],
        cwd=REPO, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    result = summary(tmp_path / "r")
    assert result["sync/algorithm"] == "hierarchical" and result["comm/average/calls"] > 0
