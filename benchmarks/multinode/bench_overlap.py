"""Overlapped vs blocking averaging over slow links, median of interleaved repeats (root only).

    sudo python benchmarks/multinode/bench_overlap.py [--rates 20mbit,100mbit --repeats 3]

2 emulated nodes x 1 worker (``netem.py``), ResNet-20, batch 64 per worker, synthetic 32x32
data, 64 steps. Speed is the steady rate from the wall time after step 16 to that after the
last step (whole sync periods for H in {4, 16}), which leaves out start-up, the final
evaluation and the final average, so that it measures what a long run sees. For each rate
it runs the no-communication bound (``no-comm``: no average in that window), local SGD with
H=16 and H=4 blocking and overlapped (``sync.overlap_steps`` tau, and in 4 fragments), and
PyTorch's ``PostLocalSGDOptimizer`` peer at the same H. Repeats are interleaved (every
variant once per round, rates inside rounds), and each ratio is the median over rounds of
that round's steady steps/s ratio. Writes ``results/overlap-<stamp>.json``, a Markdown table
and a plot of steps/s against link rate.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_links  # noqa: E402 - a sibling script
import netem  # noqa: E402
import peer_table  # noqa: E402

HERE = Path(__file__).resolve().parent
BOUND = "no-comm"


@dataclass(frozen=True)
class Group:
    """Variants compared with one bound (the same run without syncs), one blocking run and
    one peer; ``bound`` runs first in each round and is one of ``names``."""

    bound: str
    blocking: str
    peer: str
    names: tuple[str, ...]


GROUPS = {
    "16": Group(BOUND, "local-H16", "torch-peer-h16",
                (BOUND, "local-H16", "local-H16-o2", "local-H16-o4", "local-H16-o4-f4",
                 "torch-peer-h16")),
    "4": Group(BOUND, "local-H4", "torch-peer-h4",
               (BOUND, "local-H4", "local-H4-o1", "local-H4-o2", "torch-peer-h4")),
    # SparseLoCo at H=4 against torchft's DiLoCo (blocking, per-tensor, streaming), each
    # against its own recipe's no-sync run; the peer column is torchft's streaming DiLoCo.
    "sparse4": Group("no-comm-sparseloco", "sparseloco-H4", "torchft-H4-f2-d1",
                     ("no-comm-sparseloco", "sparseloco-H4", "sparseloco-H4-o1",
                      "sparseloco-H4-o1-f2", "torchft-no-sync", "torchft-H4",
                      "torchft-H4-f2-d1", "torchft-H4-f2-d1-q")),
}


def ratios(rows: list[dict[str, Any]], rate: str, a: str, b: str) -> list[float]:
    """Per round: steps/s of ``a`` over ``b`` at ``rate``."""
    out = []
    for rnd in sorted({r["round"] for r in rows}):
        got = {r["variant"]: r.get("steady_steps_per_s") for r in rows
               if r["round"] == rnd and r["rate"] == rate}
        if got.get(a) and got.get(b):
            out.append(got[a] / got[b])
    return out


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def table(rows: list[dict[str, Any]], rates: Sequence[str],
          groups: Sequence[str] = tuple(GROUPS)) -> str:
    lines = ["| rate | variant | steps/s (median) | / bound | / blocking | / peer | "
             "average wait s / transfer s | sync extra MiB | peak RSS MiB |", "|---" * 9 + "|"]
    done: set[tuple[str, str]] = set()
    for rate in rates:
        for key in groups:
            g = GROUPS[key]
            for name in g.names:
                mine = [r for r in rows if r["rate"] == rate and r["variant"] == name
                        and r.get("steady_steps_per_s")]
                if not mine or (rate, name) in done:
                    continue
                done.add((rate, name))
                sps = statistics.median(r["steady_steps_per_s"] for r in mine)
                wait = statistics.median(r["comm"].get("comm/average/wait_s", 0) for r in mine)
                total = statistics.median(r["comm"].get("comm/average/seconds", 0)
                                          for r in mine)
                rss = statistics.median(r["max_rss_mib"] for r in mine)
                extra_bytes = mine[0].get("sync_extra_bytes")
                extra = "-" if extra_bytes is None else f"{extra_bytes / 2**20:.2f}"

                def fmt(x: float | None) -> str:
                    return "-" if x is None else f"{x:.2f}"

                lines.append(
                    f"| {rate} | {name} | {sps:.2f} | "
                    f"{fmt(median(ratios(rows, rate, name, g.bound)))} | "
                    f"{fmt(median(ratios(rows, rate, name, g.blocking)))} | "
                    f"{fmt(median(ratios(rows, rate, name, g.peer)))} | "
                    f"{wait:.2f} / {total:.2f} | {extra} | {rss:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], rates: Sequence[str], path: Path,
         groups: Sequence[str] = tuple(GROUPS)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mbit(rate: str) -> float:
        return float(rate.replace("gbit", "000").replace("mbit", ""))

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = sorted(rates, key=mbit)
    names = dict.fromkeys(n for g in groups for n in GROUPS[g].names)
    for name in names:
        ys = []
        for rate in xs:
            vals = [r["steady_steps_per_s"] for r in rows if r["rate"] == rate
                    and r["variant"] == name and r.get("steady_steps_per_s")]
            ys.append(statistics.median(vals) if vals else float("nan"))
        style = "k--" if name.startswith("no-") else ("-o" if "-o" in name else
                                             (":s" if "peer" in name else "-^"))
        ax.plot([mbit(r) for r in xs], ys, style, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("link rate per node (Mbit/s)")
    ax.set_ylabel("optimizer steps/s (median)")
    ax.set_title("ResNet-20, 2 nodes x 1 CPU worker, batch 64")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="20mbit,100mbit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64, help="a multiple of 16, at least 32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--groups", default="16,4", help=f"which groups to run: {list(GROUPS)}")
    ap.add_argument("--variants", default="", help="only these of the groups' variants")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    rates = [r for r in args.rates.split(",") if r]
    groups = [g for g in args.groups.split(",") if g]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        ap.error(f"unknown groups {sorted(unknown)}; choose from {list(GROUPS)}")
    names = list(dict.fromkeys(n for g in groups for n in GROUPS[g].names))
    if args.variants:
        names = [n for n in names if n in args.variants.split(",")]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path("/tmp") / f"lsgd-overlap-{stamp}"
    rows: list[dict[str, Any]] = []
    topo = netem.Topology(2, rates[0])
    try:
        with netem.Session(topo):
            for rnd in range(args.repeats):
                for rate in rates:
                    netem.set_rate(topo, rate)
                    for name in names:
                        row = bench_links.measure(bench_links.VARIANTS[name], rate, 2,
                                                  args.steps, args.batch,
                                                  work / f"round{rnd}")
                        row["round"] = rnd
                        rows.append(row)
                        steady = row.get("steady_steps_per_s") or float("nan")
                        print(f"round {rnd} {rate:>8} {name:<15} ok={row['ok']} steady "
                              f"steps/s={steady:.3f}", flush=True)
    except netem.NotRootError as exc:
        print(f"bench_overlap: error: {exc}", file=sys.stderr)
        return 1
    bench_links.add_marginal(rows, {n: GROUPS[g].bound for g in groups for n in GROUPS[g].names})
    text = table(rows, rates, groups)
    if "sparse4" in groups:
        text += "\n\n" + "\n\n".join(peer_table.table(rows, rate) for rate in rates)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"cpus": netem.os.cpu_count(), "shaper": topo.shaper, "steps": args.steps,
            "batch": args.batch, "nodes": 2, "repeats": args.repeats, "model": "resnet20"}
    (args.out / f"overlap-{stamp}.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "table": text}, indent=1))
    plot(rows, rates, args.out / f"overlap-{stamp}.png", groups)
    print(f"wrote {args.out}/overlap-{stamp}.json and .png")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
