"""Shared test helpers: real torchrun launches on free ports, real CIFAR-10 location."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR_ROOT = REPO.parent / "shared" / "data" / "cifar10"
ENTRY = REPO / "torchrun_entry.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # W&B is exercised by the reporting tests, which ask for offline mode themselves.
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
                "PYTHONUNBUFFERED": "1"})
    # Worker scripts import the shared test helpers, as the tests themselves do.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"),
                                                       env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def torchrun(args: list[str], nproc: int = 2, *, nnodes: int = 1, node_rank: int = 0,
             port: int | None = None, timeout: float = 300, check: bool = True,
             env: dict[str, str] | None = None, extra_launch: list[str] | None = None,
             script: Path = ENTRY) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun ... script args`` for real and return its output."""
    extra = extra_launch or []
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
              f"--nnodes={nnodes}"]
    if not any(a.startswith("--rdzv-backend") for a in extra):
        # Static rendezvous; elastic launches bring their own c10d endpoint instead.
        launch += [f"--node-rank={node_rank}", "--master-addr=127.0.0.1",
                   f"--master-port={port or free_port()}"]
    launch += extra
    proc = run_group([*launch, str(script), *args], env=env or worker_env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def run_group(cmd: list[str], env: dict[str, str],
              timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (agent and
    workers alike), so a hung test leaves no orphaned workers behind."""
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(
                f"timed out after {timeout}s:\n{out[-3000:]}\n{err[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def synthetic_args(run_dir: Path, *extra: str) -> list[str]:
    """A recipe for fast multi-process semantics tests (synthetic data, tiny CNN)."""
    return ["recipes/tests/tiny_synthetic.yaml", f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    if not (CIFAR_ROOT / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 not found at {CIFAR_ROOT}")
    return CIFAR_ROOT
