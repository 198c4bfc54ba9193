"""Multi-node start-up that says what it waits for.

torchrun waits silently, for up to 900 s, in three places; each is announced here (first
after a couple of seconds, then every few) and ends in one line naming what never came:

- the launchers' rendezvous, before any worker exists. With the static rendezvous
  (``--nnodes=N --node-rank=R --master-addr=A --master-port=P``) node 0 hosts the job's
  TCPStore and waits for all N launchers; here node 0 counts them by node rank (same
  store, same keys afterwards, so torchrun's agent and the workers see no difference) and
  the others say that A:P does not answer yet. With ``--rdzv-backend=c10d`` the wait
  happens inside torchrun's handler, whose state is not public: a watcher thread says it
  waits, for how many nodes, and for how long.
- a worker connecting to the job's store (MASTER_ADDR:MASTER_PORT, the address node 0's
  launcher advertises): a wrong ``--master-addr``/``--local-addr`` shows up here.
- rank 0 waiting for the other workers to reach the store: it names the missing ranks.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from torch.distributed import DistError, TCPStore
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousTimeoutError,
    rendezvous_handler_registry,
)
from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import (
    StaticTCPRendezvous,
    create_rdzv_handler,
)

BACKEND = "localsgd-static"
"""The name this rendezvous is registered under (torchrun's ``static``, announced)."""
C10D_BACKEND = "localsgd-c10d"
"""torchrun's ``c10d`` rendezvous, its waits announced."""
FIRST_NOTICE_S = 2.0
"""A normal start joins within this; only a wait longer than it is announced."""
NOTICE_EVERY_S = 5.0
"""How often the waiting line is repeated."""
WORKER_NOTICE_S = 10.0
"""Workers of one job start together, but importing torch on a loaded machine can put
seconds between them: their wait is announced after this, and repeated as often."""
_POLL_S = 0.25


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


class Announcer:
    """Calls ``say(elapsed)`` after ``first`` seconds, then every ``every`` (by default
    ``FIRST_NOTICE_S`` and ``NOTICE_EVERY_S``)."""

    def __init__(self, say: Callable[[float], None], first: float | None = None,
                 every: float | None = None) -> None:
        self._say = say
        self._start = time.monotonic()
        self._next = FIRST_NOTICE_S if first is None else first
        self._every = NOTICE_EVERY_S if every is None else every

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def tick(self) -> None:
        if self.elapsed >= self._next:
            self._say(self.elapsed)
            self._next += self._every


def host_and_wait(addr: str, port: int, node_rank: int, nodes: int, nproc: int | None,
                  timeout: timedelta, run_id: str) -> TCPStore:
    """Node 0: host the store and wait until every node's launcher has said it is there."""
    store = TCPStore(addr, port, nodes, True, timeout, wait_for_workers=False,
                     multi_tenant=True)
    return _wait_for_nodes(store, f"{addr}:{port}", node_rank, nodes, nproc, timeout, run_id)


def _wait_for_nodes(store: TCPStore, endpoint: str, node_rank: int, nodes: int,
                    nproc: int | None, timeout: timedelta, run_id: str) -> TCPStore:
    key = f"localsgd/rdzv/{run_id}/node/"
    store.set(f"{key}{node_rank}", "1")

    def missing() -> list[int]:
        return [r for r in range(nodes) if not store.check([f"{key}{r}"])]

    def count(gone: list[int]) -> str:
        workers = f" ({len(gone) * nproc} of {nodes * nproc} workers)" if nproc else ""
        return f"{len(gone)} of {nodes} nodes{workers}"

    def say(elapsed: float) -> None:
        gone = missing()
        _say(f"localsgd: waiting at the rendezvous {endpoint} for {count(gone)}, node ranks "
             f"{_ranks(gone)} missing ({elapsed:.0f} s of {timeout.total_seconds():.0f} s); "
             f"every node runs `localsgd run --nnodes={nodes} --node-rank=R` with this "
             "--master-addr/--master-port and must reach that address")

    clock = Announcer(say)
    while gone := missing():
        if clock.elapsed > timeout.total_seconds():
            raise RendezvousTimeoutError(
                f"{count(gone)} never joined the rendezvous at "
                f"{endpoint} within {timeout.total_seconds():.0f} s: node ranks "
                f"{_ranks(gone)} missing; start them (same --master-addr/--master-port), "
                "check that they can reach this address (firewall, --master-addr), or "
                "raise dist.timeout_s")
        clock.tick()
        time.sleep(_POLL_S)
    return store


def dial(addr: str, port: int, node_rank: int, nodes: int, timeout: timedelta,
         run_id: str) -> TCPStore:
    """Another node: connect to node 0's store, saying so while it does not answer."""
    endpoint = f"{addr}:{port}"
    clock = Announcer(lambda elapsed: _say(
        f"localsgd: node rank {node_rank} waiting for node 0's rendezvous at {endpoint} "
        f"({elapsed:.0f} s of {timeout.total_seconds():.0f} s): it does not answer yet; "
        "is node 0 started, and is --master-addr its address?"))
    while True:
        left = timeout.total_seconds() - clock.elapsed
        if left <= 0:
            raise RendezvousTimeoutError(
                f"node rank {node_rank} could not reach the rendezvous at {endpoint} within "
                f"{timeout.total_seconds():.0f} s; start node 0 (--node-rank=0) and check "
                "--master-addr/--master-port and the firewall, or raise dist.timeout_s")
        # A plain connection first: TCPStore's own retries log a C++ stack trace each.
        try:
            socket.create_connection((addr, port), timeout=min(left, 1.0)).close()
        except OSError:
            clock.tick()
            time.sleep(min(_POLL_S * 4, max(left, 0.0)))
            continue
        try:
            store = TCPStore(addr, port, nodes, False, timedelta(seconds=left))
            break
        except DistError:
            clock.tick()
    store.set_timeout(timeout)
    store.set(f"localsgd/rdzv/{run_id}/node/{node_rank}", "1")
    return store


class AnnouncedStaticRendezvous(StaticTCPRendezvous):
    """torchrun's static rendezvous whose first join is announced (see the module doc)."""

    def __init__(self, *args: Any, nproc: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nproc = nproc

    def get_backend(self) -> str:
        return BACKEND

    def next_rendezvous(self) -> RendezvousInfo:
        # Only the first join waits for the nodes; a restart reuses the store, as torchrun's.
        if self._store is None and self.rank == 0:
            self._store = host_and_wait(self.master_addr, self.master_port, self.rank,
                                        self.world_size, self.nproc, self.timeout, self.run_id)
        elif self._store is None:
            self._store = dial(self.master_addr, self.master_port, self.rank,
                               self.world_size, self.timeout, self.run_id)
        return super().next_rendezvous()


def _create(params: RendezvousParameters) -> AnnouncedStaticRendezvous:
    nproc = params.config.pop("localsgd_nproc", None)
    inner = create_rdzv_handler(params)
    return AnnouncedStaticRendezvous(
        inner.master_addr, inner.master_port, inner.rank, inner.world_size, inner.run_id,
        int(inner.timeout.total_seconds()), nproc=int(nproc) if nproc else None)


class AnnouncedRendezvous(RendezvousHandler):
    """Another backend's handler (c10d) whose waits are announced from a watcher thread:
    its state lives in the backend's store, so only the wait itself can be reported."""

    def __init__(self, inner: RendezvousHandler, params: RendezvousParameters,
                 nproc: int | None) -> None:
        self.inner = inner
        self.endpoint = params.endpoint
        nodes = (str(params.min_nodes) if params.min_nodes == params.max_nodes
                 else f"{params.min_nodes} to {params.max_nodes}")
        more = "" if params.min_nodes == params.max_nodes else "+"
        workers = f" ({params.min_nodes * nproc}{more} workers)" if nproc else ""
        self.waits_for = f"{nodes} nodes{workers}"
        self.join_timeout = params.get_as_int("join_timeout", 600) or 600

    def get_backend(self) -> str:
        return C10D_BACKEND

    @property
    def use_agent_store(self) -> bool:
        return self.inner.use_agent_store

    def next_rendezvous(self) -> RendezvousInfo:
        done = threading.Event()

        def say(elapsed: float) -> None:
            _say(f"localsgd: waiting at the rendezvous {self.endpoint} for {self.waits_for} "
                 f"({elapsed:.0f} s of {self.join_timeout} s); every node runs `localsgd run` "
                 f"with --rdzv-endpoint={self.endpoint} and must reach it")

        def watch() -> None:
            clock = Announcer(say)
            while not done.wait(_POLL_S):
                clock.tick()

        watcher = threading.Thread(target=watch, name="localsgd-rendezvous", daemon=True)
        watcher.start()
        try:
            return self.inner.next_rendezvous()
        except RendezvousTimeoutError as exc:
            raise RendezvousTimeoutError(
                f"the rendezvous at {self.endpoint} did not gather {self.waits_for} within "
                f"{self.join_timeout} s (join_timeout): start the missing nodes with the same "
                "--rdzv-endpoint/--rdzv-id, check that they reach it, or raise "
                "dist.timeout_s") from exc
        finally:
            done.set()
            watcher.join()

    def is_closed(self) -> bool:
        return self.inner.is_closed()

    def set_closed(self) -> None:
        self.inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return self.inner.num_nodes_waiting()

    def get_run_id(self) -> str:
        return self.inner.get_run_id()

    def shutdown(self) -> bool:
        return self.inner.shutdown()


def _create_c10d(params: RendezvousParameters) -> AnnouncedRendezvous:
    nproc = params.config.pop("localsgd_nproc", None)
    plain = RendezvousParameters("c10d", params.endpoint, params.run_id, params.min_nodes,
                                 params.max_nodes, params.local_addr, **params.config)
    inner = rendezvous_handler_registry.create_handler(plain)
    return AnnouncedRendezvous(inner, plain, int(nproc) if nproc else None)


def register() -> None:
    """Make ``BACKEND`` and ``C10D_BACKEND`` known to torchrun's launcher."""
    # Registering the same creator again is a no-op.
    rendezvous_handler_registry.register(BACKEND, _create)
    rendezvous_handler_registry.register(C10D_BACKEND, _create_c10d)


class JoinError(RuntimeError):
    """Workers that never joined the job's store (its text is the whole explanation)."""


def reach(addr: str, port: int, rank: int, local_rank: int, timeout: timedelta) -> None:
    """A worker: wait until the job's store at ``addr:port`` (torchrun's MASTER_ADDR and
    MASTER_PORT, hosted by node 0's launcher) accepts connections, saying so meanwhile.

    The address is the one node 0's launcher advertises (``--master-addr``, or with
    ``--rdzv-backend=c10d`` its ``--local-addr``/host name): a wrong one shows up here.
    """
    endpoint = f"{addr}:{port}"
    def say(elapsed: float) -> None:
        if local_rank == 0:  # one line per node
            _say(f"localsgd: rank {rank} waiting for the job's store at {endpoint} "
                 f"(MASTER_ADDR:MASTER_PORT from node 0's launcher) ({elapsed:.0f} s of "
                 f"{timeout.total_seconds():.0f} s): it does not answer; node 0's "
                 "--master-addr (or with --rdzv-backend=c10d its --local-addr) must be an "
                 "address this node reaches")

    clock = Announcer(say)
    while True:
        left = timeout.total_seconds() - clock.elapsed
        try:
            socket.create_connection((addr, port), timeout=max(min(left, 1.0), 0.1)).close()
            return
        except OSError:
            if left <= 0:
                raise JoinError(
                    f"rank {rank} could not reach the job's store at {endpoint} within "
                    f"{timeout.total_seconds():.0f} s; check node 0's --master-addr (or "
                    "--local-addr with --rdzv-backend=c10d) and the firewall") from None
            clock.tick()
            time.sleep(_POLL_S)


def await_workers(store: Any, rank: int, world: int, local_world: int, endpoint: str,
                  timeout: timedelta) -> None:
    """Every worker says it is there; rank 0 waits for all, naming the missing ones."""
    store.set(f"joined/{rank}", "1")
    if rank != 0:
        return  # init_process_group waits for the others; rank 0 speaks for the job
    everyone = [f"joined/{r}" for r in range(world)]

    def missing() -> list[int]:
        return [r for r in range(world) if not store.check([f"joined/{r}"])]

    def which(gone: list[int]) -> str:
        nodes = sorted({r // local_world for r in gone})
        return f"ranks {_ranks(gone)} (node ranks {_ranks(nodes)})"

    def say(elapsed: float) -> None:
        gone = missing()
        _say(f"localsgd: waiting at {endpoint} for {len(gone)} of {world} workers, "
             f"{which(gone)} missing ({elapsed:.0f} s of {timeout.total_seconds():.0f} s)")

    clock = Announcer(say, WORKER_NOTICE_S, WORKER_NOTICE_S)
    while not store.check(everyone):
        if clock.elapsed > timeout.total_seconds():
            gone = missing()
            raise JoinError(
                f"{len(gone)} of {world} workers never joined the rendezvous at {endpoint} "
                f"within {timeout.total_seconds():.0f} s: {which(gone)} missing; their "
                "launchers' messages say why (or raise dist.timeout_s)")
        clock.tick()
        time.sleep(_POLL_S)
