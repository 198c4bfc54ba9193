"""Gossip on a ring against all-reduce local SGD over slow links, interleaved repeats (root only).

    sudo python benchmarks/multinode/bench_gossip.py [--nodes 4 --rates 20mbit --repeats 3]

``--nodes`` emulated nodes x 1 worker (``netem.py``), ResNet-20, batch 64 per worker,
synthetic 32x32 data, 64 steps (``bench_links.py``'s runs). Per rate and round it runs the
no-communication bound, local SGD with H = 4 and 16 (all-reduce averages) and the same with
``sync.topology=ring`` (each sync sends the model to both ring neighbours), and ring H=4
with ``sync.consensus_every=1`` (one exact all-reduce per sync to measure the consensus
distance). Speed is the steady rate from step 16 to the last step; each ratio is the median
over rounds of that round's ratio. It reports the bytes each rank sends per sync (engine
accounting), the bytes each node's veth sent against what the accounting predicts, and the
consensus distance at each sync. Writes ``results/gossip-<stamp>.json``, a Markdown table
and a plot (consensus distance against step; steady steps/s per variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_links  # noqa: E402 - a sibling script
import netem  # noqa: E402

HERE = Path(__file__).resolve().parent
BOUND = "no-comm"
PAIRS = {4: ("local-H4", "ring-H4"), 16: ("local-H16", "ring-H16")}
NAMES = [BOUND, "local-H4", "ring-H4", "local-H16", "ring-H16", "ring-H4-measured"]


def sync_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == "sync" and r.get("sync/action") == "global"]


def per_sync_bytes(row: dict[str, Any]) -> float | None:
    """What rank 0 sent per sync: gossip bytes, or averaging bytes (these include one
    closing average of the BatchNorm statistics, about 0.5% of a sync). For compressed
    syncs, the payloads plus the exact average of the BatchNorm statistics."""
    syncs = row.get("syncs")
    if not syncs:
        return None
    comm = row["comm"]
    # Gossip runs end with one exact average (recorded as average): not a sync.
    sent = comm.get("comm/gossip/bytes", 0) or comm.get("comm/average/bytes", 0)
    return sent / syncs


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ratio_by_round(rows: list[dict[str, Any]], rate: str, a: str, b: str) -> float | None:
    by = {(r["round"], r["variant"]): r.get("steady_steps_per_s")
          for r in rows if r["rate"] == rate}
    out = [by[(rnd, a)] / by[(rnd, b)] for rnd in {r["round"] for r in rows}
           if by.get((rnd, a)) and by.get((rnd, b))]
    return median(out)


def _f(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]], rates: Sequence[str], names: Sequence[str] = NAMES,
          pairs: dict[int, tuple[str, str]] = PAIRS, vs: str = "ring / all-reduce") -> str:
    lines = [f"| rate | variant | steady steps/s | / no-comm | {vs} | syncs | "
             "MiB sent per sync (rank 0) | wire MiB per node / expected | beyond no-comm: "
             "wire / expected, minus headers | consensus at the last sync |", "|---" * 10 + "|"]
    for rate in rates:
        for name in names:
            mine = [r for r in rows if r["rate"] == rate and r["variant"] == name and r["ok"]]
            if not mine:
                continue
            steady = median([r["steady_steps_per_s"] for r in mine if r.get("steady_steps_per_s")])
            pair = next((p for p in pairs.values() if name == p[1]), None)
            against = _f(ratio_by_round(rows, rate, name, pair[0])) if pair else "-"
            first = mine[0]
            wire = median([r["wire_tx_mean"] for r in mine if "wire_tx_mean" in r])
            expected = median([r["expected_wire_bytes_per_node"] for r in mine
                               if "expected_wire_bytes_per_node" in r])
            per = per_sync_bytes(first)
            marginal = [r["marginal_wire_ratio_minus_headers"] for r in mine
                        if "marginal_wire_ratio_minus_headers" in r]
            last = first["consensus"][-1][1] if first["consensus"] else None
            lines.append(
                f"| {rate} | {name} | {_f(steady, '.3f')} | "
                f"{_f(ratio_by_round(rows, rate, name, BOUND))} | {against} | {first['syncs']} | "
                f"{_f(per / 2**20 if per else None, '.3f')} | "
                f"{_f(wire / 2**20 if wire else None, '.1f')} / "
                f"{_f(expected / 2**20 if expected else None, '.1f')} | "
                f"{_f(median(marginal), '.3f')} | "
                f"{_f(last, '.3f')} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], rates: Sequence[str], path: Path,
         names: Sequence[str] = NAMES) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    first = [r for r in rows if r["round"] == 0 and r["rate"] == rates[0] and r["ok"]]
    for r in first:
        if r["consensus"]:
            steps, dist = zip(*r["consensus"], strict=True)
            left.plot(steps, dist, marker="o", label=r["variant"])
    left.set(xlabel="optimizer step", ylabel="consensus distance (mean over workers)",
             title=f"Consensus distance at each sync ({rates[0]}, round 0)")
    left.legend()
    for rate in rates:
        values = [median([r["steady_steps_per_s"] for r in rows if r["rate"] == rate
                          and r["variant"] == n and r.get("steady_steps_per_s")]) or 0.0
                  for n in names]
        right.bar([f"{n}\n{rate}" if len(rates) > 1 else n for n in names], values)
    right.set(ylabel="steady steps/s (median)", title="Speed over the shaped links")
    right.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def variant(name: str, args: argparse.Namespace) -> Any:
    """The ``bench_links`` variant with one epoch for the whole run: no evaluation (which
    gossip pays an exact all-reduce for) before the last step."""
    samples = args.steps * args.nodes * args.batch
    base = bench_links.VARIANTS[name]
    return dataclasses.replace(base, overrides=(*base.overrides,
                                                f"data.synthetic_samples={samples}"))


def main(argv: Sequence[str] | None = None, names: Sequence[str] = NAMES,
         pairs: dict[int, tuple[str, str]] = PAIRS, vs: str = "ring / all-reduce",
         stem: str = "gossip", nodes: int = 4, doc: str | None = None) -> int:
    ap = argparse.ArgumentParser(description=doc or __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=nodes)
    ap.add_argument("--rates", default="20mbit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64, help="a multiple of 16, at least 32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    rates = [r for r in args.rates.split(",") if r]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path("/tmp") / f"lsgd-{stem}-{stamp}"
    rows: list[dict[str, Any]] = []
    topo = netem.Topology(args.nodes, rates[0])
    try:
        with netem.Session(topo):
            for rnd in range(args.repeats):
                for rate in rates:
                    netem.set_rate(topo, rate)
                    for name in names:
                        out = work / f"round{rnd}"
                        row = bench_links.measure(variant(name, args), rate, args.nodes,
                                                  args.steps, args.batch, out)
                        syncs = sync_records(out / "runs" / rate / name)
                        row.update(round=rnd, syncs=len(syncs), consensus=[
                            [r["step"], r["sync/consensus_distance"]] for r in syncs
                            if "sync/consensus_distance" in r])
                        rows.append(row)
                        print(f"round {rnd} {rate:>8} {name:<17} ok={row['ok']} steady "
                              f"steps/s={_f(row.get('steady_steps_per_s'), '.3f')} "
                              f"wire/expected={_f(row.get('wire_ratio'), '.3f')}", flush=True)
    except netem.NotRootError as exc:
        print(f"bench_{stem}: error: {exc}", file=sys.stderr)
        return 1
    bench_links.add_marginal(rows)
    text = table(rows, rates, names, pairs, vs)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": netem.os.cpu_count(), "shaper": topo.shaper, "steps": args.steps,
            "batch": args.batch, "nodes": args.nodes, "repeats": args.repeats,
            "model": "resnet20", "data": "synthetic 32x32"}
    (args.out / f"{stem}-{stamp}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "table": text}, indent=1))
    plot(rows, rates, args.out / f"{stem}-{stamp}.png", names)
    print(f"wrote {args.out}/{stem}-{stamp}.json and .png")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
