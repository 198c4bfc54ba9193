"""A multi-node start says what it waits for: node 0 names the endpoint and the missing
nodes every few seconds, the others say node 0 does not answer, and the final error names
what never arrived."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import REPO, free_port, synthetic_args, worker_env
from torch.distributed.elastic.rendezvous import RendezvousTimeoutError

from localsgd.cli import main
from localsgd.launch.rendezvous import FIRST_NOTICE_S, NOTICE_EVERY_S, dial, host_and_wait

WAITING = re.compile(r"localsgd: waiting at the rendezvous 127\.0\.0\.1:(\d+) for 1 of 2 nodes "
                     r"\(2 of 4 workers\), node ranks 1 missing \((\d+) s of (\d+) s\)")


def test_node_0_announces_the_wait_and_names_the_missing_nodes(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import localsgd.launch.rendezvous as rdzv

    # Sooner and more often than a real launch (2 s, then every 5 s: the slow test below).
    monkeypatch.setattr(rdzv, "FIRST_NOTICE_S", 0.5)
    monkeypatch.setattr(rdzv, "NOTICE_EVERY_S", 1.0)
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RendezvousTimeoutError) as err:
        host_and_wait("127.0.0.1", port, 0, 3, 2, timedelta(seconds=3), "t")
    took = time.monotonic() - start
    lines = capsys.readouterr().err.splitlines()
    assert 3 <= took < 5
    assert 2 <= len(lines) <= 3, lines  # at 0.5 s, 1.5 s and 2.5 s (late on a loaded machine)
    assert all(line.startswith(
        f"localsgd: waiting at the rendezvous 127.0.0.1:{port} for 2 of 3 nodes (4 of 6 "
        "workers), node ranks 1, 2 missing (") for line in lines), lines
    assert str(err.value).startswith(
        f"2 of 3 nodes (4 of 6 workers) never joined the rendezvous at 127.0.0.1:{port} "
        "within 3 s: node ranks 1, 2 missing; start them")


def test_another_node_says_node_0_does_not_answer(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # nobody listens there
    with pytest.raises(RendezvousTimeoutError, match=(
            f"node rank 1 could not reach the rendezvous at 127.0.0.1:{port} within 3 s")):
        dial("127.0.0.1", port, 1, 2, timedelta(seconds=3), "t")
    err = capsys.readouterr().err
    assert re.match(f"localsgd: node rank 1 waiting for node 0's rendezvous at 127.0.0.1:{port} "
                    r"\([23] s of 3 s\): it does not answer yet", err), err
    assert "Traceback" not in err and "socket.cpp" not in err


def test_nodes_that_arrive_late_join(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    hosted: list[object] = []
    host = threading.Thread(target=lambda: hosted.append(host_and_wait(
        "127.0.0.1", port, 0, 3, None, timedelta(seconds=30), "t")))
    host.start()
    time.sleep(FIRST_NOTICE_S + 0.5)
    clients = [dial("127.0.0.1", port, r, 3, timedelta(seconds=30), "t") for r in (2, 1)]
    host.join(timeout=10)
    assert hosted and not host.is_alive()
    # One store: what a node writes, the others read (as torchrun's agents then do).
    clients[0].set("k", "v")
    assert hosted[0].get("k") == b"v" and clients[1].get("k") == b"v"  # type: ignore[attr-defined]
    assert "for 2 of 3 nodes, node ranks 1, 2 missing" in capsys.readouterr().err


def test_localsgd_run_waits_with_the_recipes_timeout(capsys: pytest.CaptureFixture[str],
                                                     tmp_path: Path) -> None:
    # In this process: the launcher's rendezvous fails before any worker would start.
    port = free_port()
    start = time.monotonic()
    code = main(["run", "--nnodes=2", "--node-rank=0", "--nproc-per-node=2",
                 "--master-addr=127.0.0.1", f"--master-port={port}",
                 *synthetic_args(tmp_path / "r", "dist.timeout_s=4")])
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1 and 4 <= took < 8, err
    assert WAITING.search(err), err
    assert err.splitlines()[-1] == (
        f"localsgd: error: 1 of 2 nodes (2 of 4 workers) never joined the rendezvous at "
        f"127.0.0.1:{port} within 4 s: node ranks 1 missing; start them (same "
        "--master-addr/--master-port), check that they can reach this address (firewall, "
        "--master-addr), or raise dist.timeout_s")
    assert not (tmp_path / "r").exists()


def test_the_c10d_rendezvous_is_announced_too(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    port = free_port()
    code = main(["run", "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-conf=join_timeout=3",
                 *synthetic_args(tmp_path / "r")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert re.match(f"localsgd: waiting at the rendezvous 127.0.0.1:{port} for 2 nodes "
                    r"\(4 workers\) \([23] s of 3 s\)", err[0]), err
    assert err[-1].startswith(f"localsgd: error: the rendezvous at 127.0.0.1:{port} did not "
                              "gather 2 nodes (4 workers) within 3 s (join_timeout)"), err


@pytest.mark.slow
def test_a_missing_second_node_is_visible_within_seconds(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "localsgd", "run", "--nnodes=2", "--node-rank=0",
           "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}",
           *synthetic_args(tmp_path / "r", "dist.timeout_s=15")]
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    p = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stderr is not None
        for line in p.stderr:
            seen.append((time.monotonic() - start, line.rstrip("\n")))
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    waits = [(t, m) for t, m in seen if WAITING.search(m)]
    assert p.returncode == 1, seen
    assert len(waits) >= 2, seen
    # The first line within seconds of start-up (imports and the recipe check included);
    # it repeats every NOTICE_EVERY_S.
    assert waits[0][0] < 15, seen
    assert abs((waits[1][0] - waits[0][0]) - NOTICE_EVERY_S) < 2.5, seen
    assert seen[-1][1].startswith("localsgd: error: 1 of 2 nodes (2 of 4 workers) never "
                                  f"joined the rendezvous at 127.0.0.1:{port} within 15 s: "
                                  "node ranks 1 missing")
    assert not any("Traceback" in m for _, m in seen)


def worker_env_vars(monkeypatch: pytest.MonkeyPatch, port: int, rank: int) -> None:
    """The environment torchrun gives a worker of a 2-node job with 2 workers per node."""
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                        "WORLD_SIZE": "4", "LOCAL_RANK": str(rank % 2), "LOCAL_WORLD_SIZE": "2",
                        "TORCHELASTIC_USE_AGENT_STORE": "True",
                        "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)


def test_rank_0_names_the_workers_that_never_joined(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    from torch.distributed import PrefixStore, TCPStore

    import localsgd.launch.rendezvous as rdzv

    port = free_port()
    # Node 0's launcher hosts the store; rank 1 (same node) has joined, node 1's have not.
    launcher = TCPStore("127.0.0.1", port, 1, True, timedelta(seconds=30),
                        wait_for_workers=False)
    PrefixStore("localsgd/attempt_0", launcher).set("joined/1", "1")
    worker_env_vars(monkeypatch, port, rank=0)
    monkeypatch.setattr(rdzv, "WORKER_NOTICE_S", 1.0)  # announce sooner than a real job would
    code = main(["train", *synthetic_args(tmp_path / "r", "dist.timeout_s=3")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert re.match(f"localsgd: waiting at 127.0.0.1:{port} for 2 of 4 workers, ranks 2, 3 "
                    r"\(node ranks 1\) missing \([12] s of 3 s\)", err[0]), err
    assert len([line for line in err if line.startswith("localsgd: waiting")]) >= 2
    assert err[-1] == (
        f"localsgd: error (rank 0): 2 of 4 workers never joined the rendezvous at "
        f"127.0.0.1:{port} within 3 s: ranks 2, 3 (node ranks 1) missing; their launchers' "
        "messages say why (or raise dist.timeout_s)")


def test_a_worker_that_cannot_reach_the_store_says_so(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    port = free_port()  # a wrong address: nobody listens
    worker_env_vars(monkeypatch, port, rank=2)
    code = main(["train", *synthetic_args(tmp_path / "r", "dist.timeout_s=3")])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert re.match(f"localsgd: rank 2 waiting for the job's store at 127.0.0.1:{port} "
                    r"\(MASTER_ADDR:MASTER_PORT from node 0's launcher\) \([23] s of 3 s\): "
                    "it does not answer", err[0]), err
    assert err[-1].startswith(f"localsgd: error (rank 2): rank 2 could not reach the job's "
                              f"store at 127.0.0.1:{port} within 3 s")
