"""Steps/s, on-wire bytes and peak memory of the sync modes over shaped links (root only).

    sudo python benchmarks/multinode/bench_links.py [--rates 1gbit,100mbit,20mbit]

Every variant is a real ``torchrun_entry.py`` job (ResNet-20, synthetic 32x32 data) run across
emulated nodes by ``netem.py``; one topology is built and reshaped between rates. Per run it
keeps the trainer's summary (steps/s, samples/s, ``comm/bytes``), the bytes each node's veth
sent, and the peak RSS per node. Results: ``results/links-<stamp>.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netem  # noqa: E402 - a sibling script, not an installed package

HERE = Path(__file__).resolve().parent
RECIPE = netem.REPO / "recipes" / "tests" / "tiny_synthetic.yaml"
# Ethernet (14) + IPv4 (20) + TCP with timestamps (32) per packet the veth counts; with GSO
# one counted "packet" may carry up to 64 KiB, so this is charged per counted packet.
HEADER_BYTES = 66


SPARSELOCO = netem.REPO / "recipes" / "cifar10" / "resnet20_sparseloco.yaml"
# What tiny_synthetic.yaml sets that a CIFAR-10 recipe does not: in-memory data, no workers.
SYNTHETIC_RECIPE = ("data.num_workers=0", "data.augment=false")
SPARSELOCO_RUNS = {
    "no-comm-sparseloco": ("sync.period=100000",),
    "sparseloco-H4": ("sync.period=4",),
    "sparseloco-H4-o1": ("sync.period=4", "sync.overlap_steps=1"),
    "sparseloco-H4-o2": ("sync.period=4", "sync.overlap_steps=2"),
    "sparseloco-H4-o1-f2": ("sync.period=4", "sync.overlap_steps=1", "sync.fragments=2"),
}
TORCHFT_RUNS = {
    # No sync within the run: torchft's inner loop alone (its DiLoCo hooks, no collective).
    "torchft-no-sync": ("--ft-period=100000",),
    "torchft-H4": ("--ft-period=4", "--ft-bucketize"),
    "torchft-H4-per-tensor": ("--ft-period=4",),
    "torchft-H4-f2-d1": ("--ft-period=4", "--ft-fragments=2", "--ft-delay=1", "--ft-bucketize"),
    "torchft-H4-f2-d1-q": ("--ft-period=4", "--ft-fragments=2", "--ft-delay=1",
                           "--ft-bucketize", "--ft-quantize"),
}
LIGHTHOUSE_PORT = 29510


def lighthouse_argv(replicas: int) -> list[str]:
    """torchft's lighthouse (shipped in its wheel), waiting for every replica group."""
    return [str(Path(sys.executable).with_name("torchft_lighthouse")),
            "--min_replicas", str(replicas), "--bind", f"[::]:{LIGHTHOUSE_PORT}",
            "--join_timeout_ms", "10000"]


def replica_env(replicas: int) -> Callable[[int], dict[str, str]]:
    def env(i: int) -> dict[str, str]:
        return {"TORCHFT_LIGHTHOUSE": f"http://{netem.node_ip(0)}:{LIGHTHOUSE_PORT}",
                "REPLICA_GROUP_ID": str(i), "NUM_REPLICA_GROUPS": str(replicas)}
    return env


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]
    nproc_per_node: int = 1
    entry: Path | None = None
    """Worker script instead of ``torchrun_entry.py`` (same recipe argv)."""
    recipe: Path | None = None
    """Recipe instead of ``tiny_synthetic.yaml`` (data and length overridden alike)."""
    replica_groups: bool = False
    """torchft: each node its own one-node job, joined by a lighthouse on node 0."""


VARIANTS = {v.name: v for v in (
    Variant("minibatch", ("sync.algorithm=minibatch",)),
    Variant("local-H4", ("sync.algorithm=local", "sync.period=4")),
    Variant("local-H16", ("sync.algorithm=local", "sync.period=16")),
    Variant("local-H64", ("sync.algorithm=local", "sync.period=64")),
    Variant("post_local-H16", ("sync.algorithm=post_local", "sync.switch_step=8",
                               "sync.period=16")),
    Variant("hier-2x2-H4-Hb4", ("sync.algorithm=hierarchical", "sync.period=4",
                                "sync.block_period=4"), nproc_per_node=2),
    # One average in 100000 steps is never reached: the job's only traffic is setup and the
    # final evaluation, the ceiling any sync mode can approach.
    Variant("no-comm", ("sync.algorithm=local", "sync.period=100000")),
    # PyTorch's own peer of local-H16: DDP + post_localSGD_hook (no gradient all-reduce) +
    # PostLocalSGDOptimizer(PeriodicModelAverager(16)), local from step 0; same recipe argv.
    Variant("torch-peer-h16", (), entry=HERE / "peer_worker.py"),
    # Overlapped averaging: the average runs behind tau local steps (sync.overlap_steps).
    Variant("local-H16-o2", ("sync.algorithm=local", "sync.period=16", "sync.overlap_steps=2")),
    Variant("local-H16-o4", ("sync.algorithm=local", "sync.period=16", "sync.overlap_steps=4")),
    Variant("local-H16-o4-f4", ("sync.algorithm=local", "sync.period=16", "sync.overlap_steps=4",
                                "sync.fragments=4")),
    Variant("local-H4-o1", ("sync.algorithm=local", "sync.period=4", "sync.overlap_steps=1")),
    Variant("local-H4-o2", ("sync.algorithm=local", "sync.period=4", "sync.overlap_steps=2")),
    Variant("torch-peer-h4", ("--peer-period=4",), entry=HERE / "peer_worker.py"),
    # Gossip on a ring (sync.topology=ring): each sync sends the model to both neighbours.
    Variant("ring-H4", ("sync.algorithm=local", "sync.period=4", "sync.topology=ring")),
    Variant("ring-H16", ("sync.algorithm=local", "sync.period=16", "sync.topology=ring")),
    # Compressed communication (sync.compression) and PyTorch's PowerSGD gradient hook.
    Variant("local-H16-ef_sign", ("sync.algorithm=local", "sync.period=16",
                                  "sync.compression.method=ef_sign")),
    Variant("minibatch-ef_sign", ("sync.algorithm=minibatch", "sync.compression.method=ef_sign")),
    Variant("local-H1-ef_sign", ("sync.algorithm=local", "sync.period=1",
                                 "sync.compression.method=ef_sign")),
    Variant("powersgd-r1", ("--powersgd-rank=1",), entry=netem.REPO / "benchmarks" /
            "powersgd_entry.py"),
    Variant("powersgd-r2", ("--powersgd-rank=2",), entry=netem.REPO / "benchmarks" /
            "powersgd_entry.py"),
    Variant("ring-H4-measured", ("sync.algorithm=local", "sync.period=4", "sync.topology=ring",
                                 "sync.consensus_every=1")),
    # The SparseLoCo recipe at H=4 (inner AdamW, clipping, chunked top-k 2-bit deltas with
    # decayed error feedback, outer SGD), its no-communication bound, and torchft's DiLoCo on
    # the same inner loop (torchft_worker.py) at the same period.
    *(Variant(name, (*SYNTHETIC_RECIPE, *extra), recipe=SPARSELOCO)
      for name, extra in SPARSELOCO_RUNS.items()),
    *(Variant(name, (*SYNTHETIC_RECIPE, *extra), entry=HERE / "torchft_worker.py",
              recipe=SPARSELOCO, replica_groups=True)
      for name, extra in TORCHFT_RUNS.items()),
)}


def train_args(variant: Variant, steps: int, batch: int, workers: int,
               run_dir: Path) -> list[str]:
    # Enough samples that the first epoch outlasts the run: an epoch end evaluates the model
    # (the trainer) or restarts the loader (both), which would land inside the steady window
    # of one engine and not the other's. Every variant evaluates exactly once, at the end.
    samples = max(4096, (steps + 16) * batch * workers)
    return [str(variant.recipe or RECIPE), "data.name=synthetic", "data.image_size=32",
            f"data.synthetic_samples={samples}", f"data.batch_size={batch}",
            "model.name=resnet20", f"train.max_steps={steps}", "train.progress=false",
            "train.log_every_steps=16", "run.checkpoint_every_epochs=0", "run.resume=false",
            f"run.dir={run_dir}", *variant.overrides]


def steady_rate(run_dir: Path, summary: dict[str, Any]) -> float | None:
    """Steps/s from the wall time at step 16 to that at the last multiple of 16: whole sync
    periods (H divides 16) without start-up, the final evaluation or the final average."""
    marks = {int(k): v for k, v in summary.get("time/step_marks", {}).items()}
    metrics = run_dir / "metrics.jsonl"
    if not marks and metrics.exists():
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            if r.get("event") == "step" and r["step"] % 16 == 0:
                marks[r["step"]] = r["time/wall_s"]
    last = max(marks, default=0)
    if 16 not in marks or last <= 16:
        return None
    return (last - 16) / (marks[last] - marks[16])


def ring_factor(ranks: int) -> float:
    """Share of the payload each rank sends in a ring all-reduce (reduce-scatter+all-gather)."""
    return 2 * (ranks - 1) / ranks if ranks > 1 else 0.0


def measure(variant: Variant, rate: str, nodes: int, steps: int, batch: int,
            out: Path) -> dict[str, Any]:
    run_dir = out / "runs" / rate / variant.name
    loopback = rate == "loopback"
    args = train_args(variant, steps, batch, nodes * variant.nproc_per_node, run_dir)
    torchft = variant.replica_groups
    load_before = netem.os.getloadavg()[0]
    job = netem.run_job(nodes, variant.nproc_per_node, args,
                        loopback=loopback, log_dir=run_dir / "logs", entry=variant.entry,
                        own_job=torchft, node_extra_env=replica_env(nodes) if torchft else None,
                        sidecar=lighthouse_argv(nodes) if torchft else None)
    row: dict[str, Any] = {"variant": variant.name, "rate": rate, "nodes": nodes,
                           "nproc_per_node": variant.nproc_per_node, "ok": job.ok,
                           "job_wall_s": job.wall_s, "node_results": [asdict(n) for n in job.nodes],
                           # 1-minute load average before and after: the 2 cores are shared.
                           "loadavg": [load_before, netem.os.getloadavg()[0]]}
    summary_path = run_dir / "summary.json"
    if not job.ok or not summary_path.exists():
        return row
    s = json.loads(summary_path.read_text())
    ranks = int(s["world_size"])
    row.update({
        "step": s["step"], "wall_s": s["time/wall_s"], "steps_per_s": s["step"] / s["time/wall_s"],
        "samples_per_s": s["throughput/samples_per_s"],
        "comm": {k: v for k, v in s.items() if k.startswith("comm/")},
        "peer": {k: v for k, v in s.items() if k.startswith("peer/")},
        "max_rss_mib": max(n.max_rss_kib for n in job.nodes) / 1024,
        "sync_extra_bytes": s.get("sync/extra_bytes"),
        "steady_steps_per_s": steady_rate(run_dir, s),
    })
    if loopback:
        return row
    # The engine counts the payload one rank hands to collectives; in a flat ring every rank
    # puts 2(K-1)/K of it on its link. Gossip's point-to-point sends go out as counted.
    # Hierarchical runs keep intra-node averages off the wire (same-namespace peers talk over
    # lo), so this expectation does not apply to them.
    gossip = s.get("comm/gossip/bytes", 0)
    expected = (s["comm/bytes"] - gossip) * ring_factor(ranks) + gossip
    tx = [n.tx_bytes or 0 for n in job.nodes]
    headers = [(n.tx_packets or 0) * HEADER_BYTES for n in job.nodes]
    mean_tx = sum(tx) / len(tx)
    mean_l4 = (sum(tx) - sum(headers)) / len(tx)
    row.update({
        "engine_bytes_per_rank": s["comm/bytes"], "ring_factor": ring_factor(ranks),
        "expected_wire_bytes_per_node": expected, "wire_tx_bytes_per_node": tx,
        "wire_tx_mean": mean_tx, "wire_tx_mean_minus_headers": mean_l4,
        "wire_ratio": mean_tx / expected if expected else None,
        "wire_ratio_minus_headers": mean_l4 / expected if expected else None,
        "qdisc_drops": sum(n.qdisc_drops or 0 for n in job.nodes),
        "flat_ring": variant.nproc_per_node == 1,
    })
    return row


def add_marginal(rows: list[dict[str, Any]], bounds: dict[str, str] | None = None) -> None:
    """Wire-vs-engine ratio of the bytes a variant adds over its bound at the same rate.

    Rendezvous, DDP's initial broadcast (rank 0 sends, the others do not, yet each rank counts
    the payload) and the final evaluation are the same in every run; subtracting the no-comm
    run cancels them and leaves the all-reduces that the sync mode itself adds. ``bounds``
    names each variant's own bound (default ``no-comm``); rows with a ``round`` are compared
    with the bound of the same round.
    """
    bounds = bounds or {}
    base = {(r["rate"], r["variant"], r.get("round")): r for r in rows
            if "wire_tx_mean" in r}
    for r in rows:
        b = base.get((r["rate"], bounds.get(r["variant"], "no-comm"), r.get("round")))
        if b is None or not r.get("flat_ring") or r is b or "wire_tx_mean" not in r:
            continue
        extra_engine = _expected(r) - _expected(b)
        if extra_engine <= 0:
            continue
        r["marginal_wire_ratio"] = (r["wire_tx_mean"] - b["wire_tx_mean"]) / extra_engine
        r["marginal_wire_ratio_minus_headers"] = (
            (r["wire_tx_mean_minus_headers"] - b["wire_tx_mean_minus_headers"]) / extra_engine)


def _expected(row: dict[str, Any]) -> float:
    """Bytes a node should put on the wire by the engine's accounting."""
    if "expected_wire_bytes_per_node" in row:
        return float(row["expected_wire_bytes_per_node"])
    return row["engine_bytes_per_rank"] * row["ring_factor"]


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def tables(rows: list[dict[str, Any]], rates: Sequence[str]) -> str:
    by = {(r["rate"], r["variant"]): r for r in rows if "steps_per_s" in r}
    lines = ["| rate | variant | steps/s | samples/s | engine MiB/rank | wire MiB/node (tx) | "
             "wire/expected | minus headers | marginal | marginal minus headers | peak RSS MiB |",
             "|---" * 11 + "|"]
    for rate in rates:
        for name in VARIANTS:
            r = by.get((rate, name))
            if r is None:
                continue
            flat = r.get("flat_ring", False)
            lines.append(
                f"| {rate} | {name} | {r['steps_per_s']:.2f} | {r['samples_per_s']:.1f} | "
                f"{r['comm']['comm/bytes'] / 2**20:.2f} | "
                f"{_fmt(r.get('wire_tx_mean', 0) / 2**20 if 'wire_tx_mean' in r else None)} | "
                f"{_fmt(r.get('wire_ratio') if flat else None, '.3f')} | "
                f"{_fmt(r.get('wire_ratio_minus_headers') if flat else None, '.3f')} | "
                f"{_fmt(r.get('marginal_wire_ratio'), '.3f')} | "
                f"{_fmt(r.get('marginal_wire_ratio_minus_headers'), '.3f')} | "
                f"{r['max_rss_mib']:.0f} |")
    lines += ["", "| rate | H16 / no-comm | H16 / minibatch | H16 / torch peer H16 | "
              "torch peer / no-comm | post_local / minibatch | no-comm / minibatch |",
              "|---|---|---|---|---|---|---|"]
    for rate in rates:
        def sps(name: str, rate: str = rate) -> float | None:
            r = by.get((rate, name))
            return None if r is None else r["steps_per_s"]

        def ratio(a: str, b: str) -> str:
            x, y = sps(a), sps(b)
            return "-" if x is None or y is None else f"{x / y:.2f}"

        lines.append(f"| {rate} | {ratio('local-H16', 'no-comm')} | "
                     f"{ratio('local-H16', 'minibatch')} | "
                     f"{ratio('local-H16', 'torch-peer-h16')} | "
                     f"{ratio('torch-peer-h16', 'no-comm')} | "
                     f"{ratio('post_local-H16', 'minibatch')} | {ratio('no-comm', 'minibatch')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1gbit,100mbit,20mbit",
                    help="comma list of tc rates; 'loopback' runs without namespaces")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64, help="multiple of every H (and H*H_b)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    rates = [r for r in args.rates.split(",") if r]
    names = [v for v in args.variants.split(",") if v]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path("/tmp") / f"lsgd-links-{stamp}"  # run dirs: large, not worth keeping
    rows: list[dict[str, Any]] = []
    shaped = [r for r in rates if r != "loopback"]
    topo = netem.Topology(args.nodes, shaped[0]) if shaped else None
    try:
        with netem.Session(topo):
            for rate in rates:
                if rate != "loopback" and topo is not None:
                    netem.set_rate(topo, rate)
                for name in names:
                    row = measure(VARIANTS[name], rate, args.nodes, args.steps, args.batch, work)
                    rows.append(row)
                    print(f"{rate:>9} {name:<16} ok={row['ok']} "
                          f"steps/s={_fmt(row.get('steps_per_s'))} "
                          f"wire/expected={_fmt(row.get('wire_ratio'), '.3f')}", flush=True)
    except netem.NotRootError as exc:
        print(f"bench_links: error: {exc}", file=sys.stderr)
        return 1
    add_marginal(rows)
    table = tables(rows, rates)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"links-{stamp}.json"
    meta = {"host": platform.node(), "cpus": netem.os.cpu_count(), "kernel": platform.release(),
            "shaper": topo.shaper if topo else None,
            "delay": topo.delay if topo and topo.shaper == "netem" else None,
            "steps": args.steps, "batch": args.batch, "nodes": args.nodes,
            "model": "resnet20", "data": "synthetic 32x32"}
    path.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
