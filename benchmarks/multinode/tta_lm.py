"""Time to a target validation loss for the tiny GPT over a slow link (root only).

    python benchmarks/multinode/tta_lm.py [--rate 20mbit --target-bpb 3.0 --seeds 0,1,2]

The Shakespeare recipes ``gpt_tiny_minibatch``, ``gpt_tiny_diloco`` and
``gpt_tiny_sparseloco`` on ``--nodes`` emulated nodes x 1 worker (``netem.py``: network
namespaces named ``<prefix>-*``, veths shaped to ``--rate``), run one after the other, seed
by seed. All share one learning-rate schedule of ``--schedule-steps`` steps (the cosine ends
there) and evaluate every ``--eval-every`` steps on the same validation windows; each variant
stops at its own step cap, which only cuts the run short after the target: mini-batch costs
a gradient all-reduce per step, so it is capped lower to keep a run within minutes. Reports,
per run: the wall time, step, tokens and bytes per worker at the first evaluation at or below
the target, the final bits per byte, and the veth bytes. Writes
``results/tta-lm-<stamp>.json`` and ``.md`` and the plots of ``localsgd plot`` into
``results/tta-lm-<stamp>/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netem  # noqa: E402 - a sibling script, not an installed package
from tta_cifar import plot_runs, run_recorded, sync_figures, time_to  # noqa: E402

HERE = Path(__file__).resolve().parent
RECIPES = netem.REPO / "recipes" / "shakespeare"
TEXT = netem.REPO.parent / "shared" / "data" / "shakespeare"
VARIANTS = ("minibatch", "diloco", "sparseloco")


def train_args(args: argparse.Namespace, variant: str, seed: int, run_dir: Path) -> list[str]:
    cap = args.minibatch_steps if variant == "minibatch" else args.steps
    return [str(RECIPES / f"gpt_tiny_{variant}.yaml"), f"run.dir={run_dir}", f"seed={seed}",
            f"data.root={args.data}", f"data.cache_dir={args.cache}",
            f"data.test_subset={args.test_subset}", f"train.max_steps={cap}",
            f"lr_schedule.total_steps={args.schedule_steps}",
            f"train.eval_every_steps={args.eval_every}",
            f"train.target_loss={args.target_bpb * math.log(2)}", "train.progress=false",
            "run.checkpoint_every_steps=0", "run.checkpoint_every_epochs=0", "run.resume=false"]


def at_target(records: list[dict[str, Any]], target_bpb: float) -> dict[str, Any] | None:
    """Step, tokens, bytes per worker and wall time of the first evaluation at or below the
    target (the one whose time ``time_to`` returns)."""
    evals = [r for r in records if r.get("eval/bpb") is not None]
    when = time_to(evals, target_bpb, key="eval/bpb", below=True)
    hit = next((r for r in evals if r["time/wall_s"] == when), None) if when is not None else None
    if hit is None:
        return None
    return {"wall_s": when, "step": hit["step"], "tokens": hit["tokens"],
            "mib_per_worker": hit["comm/bytes"] / 2**20, "bpb": hit["eval/bpb"]}


def row(variant: str, seed: int, run_dir: Path, job: netem.JobResult, summary: dict[str, Any],
        records: list[dict[str, Any]], target_bpb: float) -> dict[str, Any]:
    evals = [r for r in records if r.get("eval/bpb") is not None]
    return {"variant": variant, "seed": seed, "ok": job.ok, "run_dir": str(run_dir),
            "target": at_target(records, target_bpb),
            "trainer_to_target_s": summary.get("time/to_target_s"),
            "steps": summary.get("step"), "tokens": summary.get("tokens"),
            "final_bpb": summary.get("eval/bpb"), "wall_s": summary.get("time/wall_s"),
            "mib_per_worker": summary.get("comm/bytes", 0) / 2**20,
            "wire_tx_mib": [(n.tx_bytes or 0) / 2**20 for n in job.nodes],
            "qdisc_drops": [n.qdisc_drops for n in job.nodes],
            "max_rss_kib": [n.max_rss_kib for n in job.nodes],
            "curve": [[r["step"], r["time/wall_s"], r["comm/bytes"] / 2**20, r["eval/bpb"]]
                      for r in evals],
            **sync_figures(records, summary)}


def table(rows: list[dict[str, Any]], target_bpb: float) -> str:
    lines = [f"| run | seed | s to {target_bpb} bpb | step | M tokens | MiB per worker there "
             "| final bpb (step) | run MiB per worker | veth tx MiB (node 0) | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        t = r["target"] or {}
        lines.append(
            f"| {r['variant']} | {r['seed']} | {_f(t.get('wall_s'), 1)} | {t.get('step', '-')} "
            f"| {_f(t['tokens'] / 1e6 if t else None, 3)} | {_f(t.get('mib_per_worker'), 1)} "
            f"| {_f(r['final_bpb'], 3)} ({r['steps']}) | {r['mib_per_worker']:.1f} "
            f"| {r['wire_tx_mib'][0]:.1f} | {_f(r['wall_s'], 0)} |")
    reached = {v: [r["target"]["wall_s"] for r in rows if r["variant"] == v and r["target"]]
               for v in dict.fromkeys(r["variant"] for r in rows)}
    lines.append("")
    lines.append("median s to target: " + ", ".join(
        f"{v} {statistics.median(ts):.1f} ({len(ts)} runs)" if ts else f"{v} not reached"
        for v, ts in reached.items()))
    return "\n".join(lines)


def _f(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="20mbit")
    ap.add_argument("--nodes", type=int, default=2, help="emulated nodes, one worker each")
    ap.add_argument("--prefix", default=netem.PREFIX, help="namespace, veth and bridge name prefix")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--target-bpb", type=float, default=3.0)
    ap.add_argument("--schedule-steps", type=int, default=256)
    ap.add_argument("--steps", type=int, default=256, help="step cap of the local variants")
    ap.add_argument("--minibatch-steps", type=int, default=160, help="mini-batch's step cap")
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--test-subset", type=int, default=512, help="validation windows")
    ap.add_argument("--data", type=Path, default=TEXT)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/localsgd-text-cache"))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--report", type=Path, default=None, metavar="JSON",
                    help="only write the table and plots of an earlier (or stopped) sweep")
    args = ap.parse_args(argv)
    if args.report is not None:
        return report(args.report, json.loads(args.report.read_text())["runs"],
                      args.target_bpb)
    netem.use_prefix(args.prefix)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        print(f"tta_lm: error: --variants: unknown {unknown}; choose from {VARIANTS}",
              file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path("/tmp") / f"{args.prefix}-tta-lm-{stamp}"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tta-lm-{stamp}.json"
    rows: list[dict[str, Any]] = []
    try:
        with netem.Session(netem.Topology(args.nodes, args.rate)):
            for seed in (int(s) for s in args.seeds.split(",")):
                for variant in variants:
                    run_dir = work / f"{variant}_seed{seed}"
                    job, summary, records = run_recorded(
                        args.nodes, train_args(args, variant, seed, run_dir), run_dir,
                        args.timeout)
                    rows.append(row(variant, seed, run_dir, job, summary, records,
                                    args.target_bpb))
                    print(f"{variant} seed {seed}: ok={job.ok} at target={rows[-1]['target']} "
                          f"final bpb={summary.get('eval/bpb')}", flush=True)
                    # Written after every run, so a stopped sweep keeps what it measured.
                    path.write_text(json.dumps(
                        {"args": {k: str(v) for k, v in vars(args).items()}, "runs": rows},
                        indent=1))
    except netem.NotRootError as exc:
        print(f"tta_lm: error: {exc}", file=sys.stderr)
        return 1
    return report(path, rows, args.target_bpb)


def report(path: Path, rows: list[dict[str, Any]], target_bpb: float) -> int:
    """PATH's sweep as PATH.md (the table) and the plots of its runs in PATH without .json."""
    plot_runs([r["run_dir"] for r in rows if r["ok"]], path.with_suffix(""))
    text = table(rows, target_bpb)
    path.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {path.with_suffix('.md')} and plots in {path.with_suffix('')}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
