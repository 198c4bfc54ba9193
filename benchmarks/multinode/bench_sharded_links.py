"""Cross-node veth bytes per global sync: sharded replica groups against today's runs (root).

    python benchmarks/multinode/bench_sharded_links.py [--prefix NAME] [--steps 32]

Two emulated nodes of two ranks each (``netem.py`` namespaces named ``<prefix>-*``, one real
torchrun agent per node, gloo over the veths, ResNet-20 on synthetic 32x32 data). Three
layouts, each run twice with a different number of global syncs and otherwise the same job:

- ``hier-g1``: today's hierarchical SGD, every rank a worker; node averages every 2 steps
  (over lo, never on the veth), a global all-reduce of the whole model by all 4 ranks;
- ``ddp-node``: ``sync.replica_group=node``, ``engine.name=ddp``: one unsharded worker per
  node, local SGD across the two groups (each rank averages the whole model with its peer);
- ``fsdp-node``: the same with ``engine.name=fsdp``: each rank averages only its half.

The difference between the two runs of a layout, divided by the difference in global syncs,
is what one global sync puts on each node's veth; set-up, rendezvous, the final average and
evaluation cancel. Results: ``results/sharded-links-<stamp>.json`` and a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_links  # noqa: E402 - sibling scripts, not an installed package
import netem  # noqa: E402

from localsgd.report.files import read_metrics  # noqa: E402

HERE = Path(__file__).resolve().parent
NODES = 2
NPROC = 2

# name -> (overrides, the key that sets the global-sync interval in steps as a function of
# the interval). Hierarchical syncs globally every period * block_period steps.
LAYOUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "hier-g1": (("sync.algorithm=hierarchical", "sync.period=2"), "sync.block_period"),
    "ddp-node": (("sync.algorithm=local", "sync.replica_group=node", "engine.name=ddp"),
                 "sync.period"),
    "fsdp-node": (("sync.algorithm=local", "sync.replica_group=node", "engine.name=fsdp"),
                  "sync.period"),
}


def interval_value(layout: str, every: int) -> int:
    """The override value that makes a global sync every ``every`` steps."""
    overrides, _ = LAYOUTS[layout]
    if layout == "hier-g1":
        period = int(next(o for o in overrides if o.startswith("sync.period=")).split("=")[1])
        return every // period
    return every


def run_one(layout: str, every: int, steps: int, batch: int, work: Path) -> dict[str, Any]:
    overrides, key = LAYOUTS[layout]
    variant = bench_links.Variant(f"{layout}-every{every}",
                                  (*overrides, f"{key}={interval_value(layout, every)}"), NPROC)
    run_dir = work / variant.name
    args = bench_links.train_args(variant, steps, batch, NODES * NPROC, run_dir)
    job = netem.run_job(NODES, NPROC, args, loopback=False, log_dir=run_dir / "logs")
    row: dict[str, Any] = {"layout": layout, "global_every": every, "ok": job.ok,
                           "job_wall_s": job.wall_s,
                           "node_results": [asdict(n) for n in job.nodes]}
    summary = run_dir / "summary.json"
    if job.ok and summary.exists():
        s = json.loads(summary.read_text())
        row["comm"] = {k: v for k, v in s.items() if k.startswith("comm/")}
        row["wall_s"] = s["time/wall_s"]
        # Syncs that cross nodes, as the trainer logged them (hierarchical: its global ones).
        actions = [r.get("sync/action") for r in read_metrics(run_dir) if r["event"] == "sync"]
        row["syncs"] = len(actions)
        row["global_syncs"] = sum(1 for a in actions if layout != "hier-g1" or a == "global")
    return row


def per_sync(many: dict[str, Any], few: dict[str, Any]) -> dict[str, Any]:
    """What one global sync adds: (many - few) / (their difference in global syncs)."""
    d = many["global_syncs"] - few["global_syncs"]

    def delta(key: str) -> float:
        return sum(m[key] - f[key] for m, f in zip(many["node_results"], few["node_results"],
                                                   strict=True)) / NODES / d

    engine = (many["comm"]["comm/bytes"] - few["comm"]["comm/bytes"]) / d
    if engine == 0:
        # Hierarchical: node and global averages hand the engine the same payload, so the
        # runs' counts agree; one average's payload (the final average of BatchNorm
        # statistics alone, 5.5 kB, is spread over the others: +0.03 %).
        engine = many["comm"]["comm/average/bytes"] / many["syncs"]
    tx, rx = delta("tx_bytes"), delta("rx_bytes")
    packets = delta("tx_packets")
    return {"syncs_apart": d, "engine_bytes_per_rank": engine,
            "veth_tx_per_node": tx, "veth_rx_per_node": rx, "veth_txrx_per_node": tx + rx,
            "tx_packets_per_node": packets,
            "tx_minus_headers_per_node": tx - packets * bench_links.HEADER_BYTES}


def expected_tx(layout: str, engine_per_rank: float) -> float:
    """Bytes a node should send per sync by gloo's ring all-reduce (reduce-scatter then
    all-gather, each rank sending 2(K-1)/K of its payload to the next rank).

    hier-g1: one ring of the 4 ranks; ranks 0,1 on node 0, so exactly one ring edge (1 -> 2)
    leaves node 0: 2 * 3/4 of the model. Groups: two rings of 2 ranks (one per shard column
    or rank pair), both crossing: each of the node's 2 ranks sends 2 * 1/2 of its payload.
    """
    if layout == "hier-g1":
        return engine_per_rank * bench_links.ring_factor(NODES * NPROC)
    return NPROC * engine_per_rank * bench_links.ring_factor(NODES)


def table(results: dict[str, dict[str, Any]]) -> str:
    base = results.get("hier-g1", {}).get("veth_txrx_per_node")
    lines = ["| layout | engine bytes / rank / sync | veth tx+rx / node / sync | "
             "vs hier-g1 | expected tx (ring) | tx / expected | tx minus headers / expected |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        exp = r["expected_tx_per_node"]
        ratio = f"{r['veth_txrx_per_node'] / base:.3f}" if base else "-"
        lines.append(f"| {name} | {r['engine_bytes_per_rank']:,.0f} | "
                     f"{r['veth_txrx_per_node']:,.0f} | {ratio} | {exp:,.0f} | "
                     f"{r['veth_tx_per_node'] / exp:.3f} | "
                     f"{r['tx_minus_headers_per_node'] / exp:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefix", default=netem.PREFIX, help="namespace, veth and bridge name prefix")
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--many", type=int, default=2, help="global sync every N steps (run 1)")
    ap.add_argument("--few", type=int, default=16, help="global sync every N steps (run 2)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rate", default="1gbit", help="generous: bytes, not time, are measured")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    layouts = [n for n in args.layouts.split(",") if n]
    if unknown := set(layouts) - set(LAYOUTS):
        ap.error(f"unknown layouts {sorted(unknown)}; choose from {list(LAYOUTS)}")
    if args.steps % args.many or args.steps % args.few or args.many % 2 or args.few % 2:
        ap.error("--many and --few must be even and divide --steps (both runs end on a sync)")
    netem.use_prefix(args.prefix)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path("/tmp") / f"{args.prefix}-sharded-links-{stamp}"
    rows: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    topo = netem.Topology(NODES, args.rate)
    try:
        with netem.Session(topo):
            for name in layouts:
                pair = [run_one(name, every, args.steps, args.batch, work)
                        for every in (args.many, args.few)]
                rows += pair
                print(f"{name}: ok={[r['ok'] for r in pair]}", flush=True)
                if all("comm" in r for r in pair):
                    results[name] = per_sync(*pair)
                    results[name]["expected_tx_per_node"] = expected_tx(
                        name, results[name]["engine_bytes_per_rank"])
    except netem.NotRootError as exc:
        print(f"bench_sharded_links: error: {exc}", file=sys.stderr)
        return 1
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sharded-links-{stamp}.json"
    meta = {"host": platform.node(), "cpus": netem.os.cpu_count(),
            "kernel": platform.release(), "shaper": topo.shaper, "rate": args.rate,
            "nodes": NODES, "nproc_per_node": NPROC, "steps": args.steps,
            "batch": args.batch, "many": args.many, "few": args.few,
            "model": "resnet20", "data": "synthetic 32x32", "work_dir": str(work)}
    path.write_text(json.dumps({"meta": meta, "per_sync": results, "rows": rows,
                                "table": text}, indent=1))
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
