"""Emulated multi-node torchrun jobs on one machine, with slow links (root only).

    sudo python benchmarks/multinode/netem.py run --nodes 2 --rate 20mbit -- \\
        recipes/tests/tiny_synthetic.yaml train.max_steps=20
    sudo python benchmarks/multinode/netem.py run --loopback --nodes 2 -- RECIPE ...
    sudo python benchmarks/multinode/netem.py cleanup

Each node is a network namespace ``lsgd-n<i>`` holding one end of a veth pair (``lsgd<i>``,
address 10.77.0.<i+1>/24); the other end (``lsgd<i>b``) is enslaved to a bridge inside the
namespace ``lsgd-br``, so the root namespace's network is never touched. A netem qdisc
(rate + delay) on *both* ends shapes each node's upload and download independently, like a
node NIC on a switch. One torchrun agent runs per node under ``ip netns exec`` with
``GLOO_SOCKET_IFNAME`` set to the node's veth, so gloo cannot silently use another path.
``--loopback`` runs the same agents on 127.0.0.1 without namespaces, for comparison.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "torchrun_entry.py"
# Namespaces, veths and the bridge are named from this prefix; cleanup removes only its own
# (``<prefix>-*``), so harness runs with different prefixes can share one machine.
PREFIX = os.environ.get("LSGD_NETEM_PREFIX", "lsgd")
BRIDGE_NS = f"{PREFIX}-br"
BRIDGE = f"{PREFIX}br0"
SUBNET = "10.77.0"
MASTER_PORT = 29500


def use_prefix(prefix: str) -> None:
    """Name the namespaces, veths and bridge ``<prefix>...`` from now on (what
    ``LSGD_NETEM_PREFIX`` does at import), for scripts that take the prefix as an option."""
    global PREFIX, BRIDGE_NS, BRIDGE
    PREFIX, BRIDGE_NS, BRIDGE = prefix, f"{prefix}-br", f"{prefix}br0"


class NotRootError(RuntimeError):
    """Namespaces, veths and qdiscs need CAP_NET_ADMIN; refusing early beats half a topology."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError(
            "netem.py needs root (it creates network namespaces, veth pairs, a bridge and tc "
            "qdiscs); rerun with sudo, or use --loopback for an unshaped run without namespaces")


def node_ns(i: int) -> str:
    return f"{PREFIX}-n{i}"


def node_if(i: int) -> str:
    return f"{PREFIX}{i}"


def node_ip(i: int) -> str:
    return f"{SUBNET}.{i + 1}"


_RATE_UNITS = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}


def rate_bits(rate: str) -> float:
    """``20mbit`` -> 2e7 (tc's decimal bit units; byte units are not accepted here)."""
    for unit, scale in _RATE_UNITS.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate {rate!r}: use a number with gbit, mbit, kbit or bit")


@dataclass
class Topology:
    nodes: int
    rate: str = "1gbit"
    delay: str = "0.25ms"
    # "auto": netem (rate + delay) when the kernel has sch_netem, else tbf (rate only).
    shaper: str = "auto"
    created: list[str] = field(default_factory=list)

    def qdisc_args(self) -> list[str]:
        if self.shaper == "netem":
            # netem's default queue of 1000 packets overflows when a fast sender meets a slow
            # rate; drops would turn a bandwidth experiment into a retransmission one.
            return ["netem", "delay", self.delay, "rate", self.rate, "limit", "100000"]
        # veth hands tbf GSO packets of up to 64 KiB; a bucket smaller than one of them would
        # make tbf split or drop it, so the burst is at least that (26 ms at 20 Mbit/s, which
        # is noise against transfers of megabytes). The 32 MB queue is deeper than any TCP
        # window autotuning reaches, so the shaper delays packets instead of dropping them.
        burst = max(65536, int(rate_bits(self.rate) / 8 / 250))
        return ["tbf", "rate", self.rate, "burst", str(burst), "limit", str(32 << 20)]


def _sh(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, text=True, capture_output=True)


def _ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def setup(topo: Topology) -> None:
    """Build the bridge namespace and one namespace per node; shape every link."""
    require_root()
    cleanup(quiet=True)  # a previous crashed run must not make `ip netns add` fail
    _sh(["ip", "netns", "add", BRIDGE_NS])
    topo.created.append(BRIDGE_NS)
    _sh(_ns(BRIDGE_NS, "ip", "link", "set", "lo", "up"))
    _sh(_ns(BRIDGE_NS, "ip", "link", "add", BRIDGE, "type", "bridge"))
    _sh(_ns(BRIDGE_NS, "ip", "link", "set", BRIDGE, "up"))
    for i in range(topo.nodes):
        ns, dev, peer = node_ns(i), node_if(i), f"{node_if(i)}b"
        _sh(["ip", "netns", "add", ns])
        topo.created.append(ns)
        # Created directly inside the namespaces, so no veth ever appears in the root one.
        _sh(["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer,
             "netns", BRIDGE_NS])
        # torchrun workers talk to their own agent and store over lo; it starts down.
        _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        _sh(["ip", "-n", ns, "addr", "add", f"{node_ip(i)}/24", "dev", dev])
        _sh(["ip", "-n", ns, "link", "set", dev, "up"])
        _sh(["ip", "-n", BRIDGE_NS, "link", "set", peer, "master", BRIDGE])
        _sh(["ip", "-n", BRIDGE_NS, "link", "set", peer, "up"])
    set_rate(topo, topo.rate, topo.delay)


def has_netem() -> bool:
    """Whether this kernel offers sch_netem (containers often lack the module)."""
    probe = _sh(["ip", "netns", "exec", BRIDGE_NS, "tc", "qdisc", "replace", "dev", BRIDGE,
                 "root", "netem", "delay", "1ms"], check=False)
    if probe.returncode == 0:
        _sh(["ip", "netns", "exec", BRIDGE_NS, "tc", "qdisc", "del", "dev", BRIDGE, "root"],
            check=False)
    return probe.returncode == 0


def set_rate(topo: Topology, rate: str, delay: str | None = None) -> None:
    """Reshape every link in place (no need to rebuild namespaces between sweep points)."""
    topo.rate = rate
    if delay is not None:
        topo.delay = delay
    if topo.shaper == "auto":
        topo.shaper = "netem" if has_netem() else "tbf"
        if topo.shaper == "tbf":
            print("netem: sch_netem is not available in this kernel; shaping with tbf "
                  "(rate only, no added delay)", file=sys.stderr)
    for i in range(topo.nodes):
        _sh(["ip", "netns", "exec", node_ns(i), "tc", "qdisc", "replace", "dev", node_if(i),
             "root", *topo.qdisc_args()])
        _sh(["ip", "netns", "exec", BRIDGE_NS, "tc", "qdisc", "replace", "dev",
             f"{node_if(i)}b", "root", *topo.qdisc_args()])


def qdisc_drops(i: int) -> int:
    """Packets the shaper dropped on node i's links (both directions); should stay 0."""
    total = 0
    for ns, dev in ((node_ns(i), node_if(i)), (BRIDGE_NS, f"{node_if(i)}b")):
        text = _sh(_ns(ns, "tc", "-s", "qdisc", "show", "dev", dev), check=False).stdout
        words = text.replace(",", " ").split()
        total += sum(int(words[k + 1]) for k, w in enumerate(words[:-1]) if w == "dropped")
    return total


def our_namespaces() -> list[str]:
    out = _sh(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{PREFIX}-")]


def cleanup(quiet: bool = False) -> list[str]:
    """Kill what still runs inside our namespaces, then delete them (veths go with them)."""
    removed = []
    for ns in our_namespaces():
        pids = _sh(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    if removed and not quiet:
        print(f"netem: removed {' '.join(removed)}", file=sys.stderr)
    return removed


def link_counters(i: int) -> dict[str, int]:
    """tx/rx bytes of node i's veth, read through sysfs as the namespace sees it."""
    base = f"/sys/class/net/{node_if(i)}/statistics"
    out = _sh(_ns(node_ns(i), "cat", f"{base}/tx_bytes", f"{base}/rx_bytes",
                  f"{base}/tx_packets", f"{base}/rx_packets")).stdout.split()
    tx, rx, txp, rxp = (int(v) for v in out)
    return {"tx_bytes": tx, "rx_bytes": rx, "tx_packets": txp, "rx_packets": rxp,
            "qdisc_drops": qdisc_drops(i)}


def worker_threads(total_workers: int) -> int:
    # torchrun only sets OMP_NUM_THREADS when a node has >1 worker; with 1 worker per node
    # every worker would take all cores and the nodes would fight for them.
    return max(1, (os.cpu_count() or 1) // max(1, total_workers))


def node_command(i: int, nodes: int, nproc: int, train_args: Sequence[str], *,
                 loopback: bool, master_port: int = MASTER_PORT,
                 torchrun: str | None = None, entry: Path | None = None,
                 own_job: bool = False) -> list[str]:
    """The argv that starts node i's torchrun agent (pure: tested without root).

    ``entry`` is the worker script (default ``torchrun_entry.py``); it gets ``train_args``.
    ``own_job``: every node is a torchrun job of its own (one node, its store on the node's
    own address), as torchft's replica groups are; they meet through torchft's lighthouse.
    """
    torchrun = torchrun or str(Path(sys.executable).with_name("torchrun"))
    if own_job and loopback:
        raise ValueError("own_job runs need the namespaces (each node its own address)")
    master = "127.0.0.1" if loopback else node_ip(i if own_job else 0)
    nnodes, rank = (1, 0) if own_job else (nodes, i)
    cmd = [torchrun, f"--nnodes={nnodes}", f"--node-rank={rank}", f"--nproc-per-node={nproc}",
           f"--master-addr={master}", f"--master-port={master_port}", "--max-restarts=0",
           str(entry or ENTRY), *train_args]
    return cmd if loopback else _ns(node_ns(i), *cmd)


def node_env(i: int, nodes: int, nproc: int, *, loopback: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"GLOO_SOCKET_IFNAME": "lo" if loopback else node_if(i),
                "OMP_NUM_THREADS": str(worker_threads(nodes * nproc)),
                "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    return env


@dataclass
class NodeResult:
    rank: int
    returncode: int
    max_rss_kib: int
    tx_bytes: int | None = None
    rx_bytes: int | None = None
    tx_packets: int | None = None
    rx_packets: int | None = None
    qdisc_drops: int | None = None


@dataclass
class JobResult:
    wall_s: float
    nodes: list[NodeResult]

    @property
    def ok(self) -> bool:
        return all(n.returncode == 0 for n in self.nodes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    time.sleep(2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_job(nodes: int, nproc: int, train_args: Sequence[str], *, loopback: bool,
            log_dir: Path, timeout_s: float = 900.0, entry: Path | None = None,
            own_job: bool = False, node_extra_env: Callable[[int], dict[str, str]] | None = None,
            sidecar: Sequence[str] | None = None) -> JobResult:
    """Start every node's agent, wait for all, and return exit codes, peak RSS, wire bytes.

    The namespaces must already exist (``setup``) unless ``loopback``. ``own_job``: one
    torchrun job per node (``node_command``); ``node_extra_env(i)`` adds to node i's
    environment; ``sidecar`` is a service started in node 0's namespace before the agents and
    stopped after them (torchft's lighthouse); its traffic is in the veth counts.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port() if loopback else MASTER_PORT
    before = None if loopback else [link_counters(i) for i in range(nodes)]
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    side: subprocess.Popen[bytes] | None = None
    start = time.monotonic()
    try:
        if sidecar:
            log = open(log_dir / "sidecar.log", "wb")  # noqa: SIM115 - closed in finally
            logs.append(log)
            side = subprocess.Popen(list(sidecar) if loopback else _ns(node_ns(0), *sidecar),
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            time.sleep(1.0)  # bound before the first agent asks for it
        for i in range(nodes):
            log = open(log_dir / f"node{i}.log", "wb")  # noqa: SIM115 - closed in finally
            logs.append(log)
            env = node_env(i, nodes, nproc, loopback=loopback)
            if node_extra_env is not None:
                env.update(node_extra_env(i))
            # Own session: a Ctrl-C or timeout can kill the agent *and* its workers.
            procs.append(subprocess.Popen(
                node_command(i, nodes, nproc, train_args, loopback=loopback, master_port=port,
                             entry=entry, own_job=own_job),
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        results: dict[int, tuple[int, int]] = {}
        pending = {p.pid: i for i, p in enumerate(procs)}
        while pending:
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"job exceeded {timeout_s:.0f}s; logs in {log_dir}")
            for pid, i in list(pending.items()):
                # wait4 rather than Popen.wait: its rusage is the peak RSS of the agent and
                # every worker it reaped, i.e. the node's largest process.
                got, status, usage = os.wait4(pid, os.WNOHANG)
                if got == pid:
                    procs[i].returncode = os.waitstatus_to_exitcode(status)
                    results[i] = (procs[i].returncode, int(usage.ru_maxrss))
                    del pending[pid]
                    if procs[i].returncode != 0:
                        # One failed node leaves the others blocked in rendezvous/collectives.
                        for p in procs:
                            if p.returncode is None:
                                _kill_group(p)
            time.sleep(0.2)
        wall = time.monotonic() - start
    finally:
        for p in procs:
            if p.returncode is None:
                _kill_group(p)
                p.wait()
        if side is not None:
            _kill_group(side)
            side.wait()
        for log in logs:
            log.close()
    after = None if loopback else [link_counters(i) for i in range(nodes)]
    out = []
    for i in range(nodes):
        rc, rss = results[i]
        nr = NodeResult(rank=i, returncode=rc, max_rss_kib=rss)
        if before is not None and after is not None:
            for key in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets", "qdisc_drops"):
                setattr(nr, key, after[i][key] - before[i][key])
        out.append(nr)
    return JobResult(wall_s=wall, nodes=out)


class Session:
    """Context manager: topology up on enter, down on exit, Ctrl-C, SIGTERM or interpreter exit."""

    def __init__(self, topo: Topology | None) -> None:
        self.topo = topo

    def __enter__(self) -> Session:
        if self.topo is not None:
            require_root()
            atexit.register(cleanup, True)
            # SIGTERM would otherwise end the interpreter without running finally/atexit.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            setup(self.topo)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.topo is not None:
            cleanup(quiet=True)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="set up, run one torchrun job across the nodes, clean up")
    run.add_argument("--nodes", type=int, default=2)
    run.add_argument("--nproc-per-node", type=int, default=1)
    run.add_argument("--rate", default="20mbit", help="tc rate per node link and direction")
    run.add_argument("--delay", default="0.25ms", help="netem delay per hop (two hops a way)")
    run.add_argument("--loopback", action="store_true", help="no namespaces, no shaping")
    run.add_argument("--log-dir", type=Path, default=Path("runs/netem-logs"))
    run.add_argument("--timeout", type=float, default=900.0)
    run.add_argument("train_args", nargs=argparse.REMAINDER,
                     help="-- RECIPE.yaml [key=value ...] passed to torchrun_entry.py")
    sub.add_parser("cleanup", help="delete every lsgd-* namespace (and the veths in them)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.cmd == "cleanup":
            require_root()
            cleanup()
            return 0
        train_args = [a for a in args.train_args if a != "--"]
        if not train_args:
            print("netem: error: give the recipe after --", file=sys.stderr)
            return 2
        # Loopback needs no privileges at all; only the namespace mode checks.
        topo = None if args.loopback else Topology(args.nodes, args.rate, args.delay)
        with Session(topo):
            res = run_job(args.nodes, args.nproc_per_node, train_args, loopback=args.loopback,
                          log_dir=args.log_dir, timeout_s=args.timeout)
    except NotRootError as exc:
        print(f"netem: error: {exc}", file=sys.stderr)
        return 1
    for n in res.nodes:
        wire = ("" if n.tx_bytes is None else
                f" tx {n.tx_bytes} B rx {n.rx_bytes} B, shaper drops {n.qdisc_drops}")
        print(f"node {n.rank}: exit {n.returncode}, max RSS {n.max_rss_kib / 1024:.0f} MiB{wire}")
    print(f"wall {res.wall_s:.1f}s; logs in {args.log_dir}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
