"""Time-to-accuracy on real CIFAR-10 over a slow link: sync variants side by side (root only).

    sudo python benchmarks/multinode/tta_cifar.py [--rate 20mbit --target 0.30]
    sudo python benchmarks/multinode/tta_cifar.py --preset outer
    sudo python benchmarks/multinode/tta_cifar.py --preset gossip --nodes 4

ResNet-20, ``--nodes`` emulated nodes (default 2) x 1 worker (``netem.py``), a short
schedule that fits a 2-core machine. The runs are the preset's variants
(``benchmarks/variants.py``: ``paper`` is mini-batch against post-local SGD, ``outer`` adds
SlowMo, DiLoCo and QSR); all share seed, data subset and LR schedule, and post-local
variants switch after the first epoch. Writes
``results/tta-<stamp>.json`` and the plots of ``localsgd plot`` (accuracy vs epoch / wall
time / bytes) into ``results/tta-<stamp>/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import netem  # noqa: E402 - a sibling script, not an installed package
from variants import PRESETS  # noqa: E402 - likewise

HERE = Path(__file__).resolve().parent
RECIPE = netem.REPO / "recipes" / "quickstart.yaml"
DATA = netem.REPO.parent / "shared" / "data" / "cifar10"


def common_args(args: argparse.Namespace, run_dir: Path) -> list[str]:
    return [str(RECIPE), f"data.root={args.data}", "data.download=false",
            f"data.train_subset={args.train_subset}", f"data.test_subset={args.test_subset}",
            "data.num_workers=0", f"train.epochs={args.epochs}", f"train.target_acc={args.target}",
            # Warm up over the first epoch, decay before the last: the quickstart's shape,
            # compressed to this schedule.
            "lr_schedule.warmup_epochs=1", f"lr_schedule.milestones=[{args.epochs - 1}]",
            "train.progress=false", "run.checkpoint_every_epochs=0", "run.resume=false",
            f"run.dir={run_dir}"]


def time_to(records: list[dict[str, Any]], target: float, key: str = "eval/acc",
            below: bool = False) -> float | None:
    """First wall time at which an evaluation reached ``target`` in ``key`` (at least it, or
    at most it with ``below``: a loss); the trainer's rule."""
    for rec in records:
        value = rec.get(key)
        if value is not None and (value <= target if below else value >= target):
            return float(rec["time/wall_s"])
    return None


def run_recorded(nodes: int, train_args: list[str], run_dir: Path, timeout_s: float
                 ) -> tuple[netem.JobResult, dict[str, Any], list[dict[str, Any]]]:
    """One job across the (already built) nodes, one worker each: its result, its
    ``summary.json`` (empty when it failed) and its metrics records."""
    job = netem.run_job(nodes, 1, train_args, loopback=False, log_dir=run_dir / "logs",
                        timeout_s=timeout_s)
    summary = json.loads((run_dir / "summary.json").read_text()) if job.ok else {}
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    return job, summary, [json.loads(line) for line in text.splitlines() if line.strip()]


def plot_runs(run_dirs: list[str], plot_dir: Path) -> None:
    """``localsgd plot`` of the runs (curves against epochs, tokens, wall time, bytes)."""
    subprocess.run([str(Path(sys.executable).with_name("localsgd")), "plot", *run_dirs,
                    "--out", str(plot_dir)], check=False)


def sync_figures(records: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """Model syncs (averages or gossip steps), rank 0's bytes per sync, steps per second
    and the logged consensus distances, from a run's records and summary."""
    epochs = [r for r in records if r.get("event") == "epoch"]
    last = epochs[-1] if epochs else {}
    # The last epoch record's totals stop before the run's closing exact average.
    syncs = [r for r in records if r.get("event") == "sync" and r.get("sync/action") == "global"
             and r["step"] <= last.get("step", 0)]
    sent = last.get("comm/average/bytes", 0) + last.get("comm/gossip/bytes", 0)
    wall = summary.get("time/wall_s") or 0.0
    return {"syncs": len(syncs), "bytes_per_sync": sent / len(syncs) if syncs else 0.0,
            "steps_per_s": summary.get("step", 0) / wall if wall else 0.0,
            "consensus": [[r["step"], r["sync/consensus_distance"]] for r in syncs
                          if "sync/consensus_distance" in r]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="20mbit")
    ap.add_argument("--nodes", type=int, default=2, help="emulated nodes, one worker each")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--train-subset", type=int, default=5000)
    ap.add_argument("--test-subset", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    ap.add_argument("--target", type=float, default=0.30)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs = {name: [*overrides, *(["sync.switch_epoch=1"]
                                 if "sync.algorithm=post_local" in overrides else [])]
            for name, overrides in PRESETS[args.preset].items()}
    work = Path("/tmp") / f"lsgd-tta-{stamp}"
    rows: dict[str, dict[str, Any]] = {}
    try:
        with netem.Session(netem.Topology(args.nodes, args.rate)):
            for name, overrides in runs.items():
                run_dir = work / name
                job, summary, records = run_recorded(
                    args.nodes, [*common_args(args, run_dir), *overrides], run_dir, 1200)
                evals = [{"epoch": r.get("epoch"), "eval/acc": r["eval/acc"],
                          "time/wall_s": r.get("time/wall_s")}
                         for r in records if "eval/acc" in r]
                rows[name] = {"ok": job.ok, "run_dir": str(run_dir), "summary": summary,
                              "evals": evals, "wire_tx": [n.tx_bytes for n in job.nodes],
                              "max_rss_kib": [n.max_rss_kib for n in job.nodes],
                              **sync_figures(records, summary)}
                print(f"{name}: ok={job.ok} final acc={summary.get('eval/acc')} "
                      f"to_target={summary.get('time/to_target_s')} "
                      f"wall={summary.get('time/wall_s')}", flush=True)
    except netem.NotRootError as exc:
        print(f"tta_cifar: error: {exc}", file=sys.stderr)
        return 1
    # A fixed target may be missed by one run on a schedule this short; the highest accuracy
    # both runs reached gives a comparison that always exists, read from the same records.
    common = min(max((e["eval/acc"] for e in r["evals"]), default=0.0) for r in rows.values())
    for r in rows.values():
        r["time_to_common_best_s"] = time_to(r["evals"], common)
    plot_dir = args.out / f"tta-{stamp}"
    plot_runs([r["run_dir"] for r in rows.values()], plot_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tta-{stamp}.json"
    path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                "common_best_acc": common, "runs": rows}, indent=1))
    print("| variant | final acc | steps/s | syncs | MiB per sync (rank 0) | wire MiB (node 0) |")
    print("|---|---|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['summary'].get('eval/acc')} | {v['steps_per_s']:.3f} | {v['syncs']} "
              f"| {v['bytes_per_sync'] / 2**20:.3f} | {(v['wire_tx'][0] or 0) / 2**20:.1f} |")
    print(f"common best acc {common:.4f}: " + ", ".join(
        f"{k} {_s(v['time_to_common_best_s'])}" for k, v in rows.items()))
    print(f"wrote {path} and plots in {plot_dir}")
    return 0 if all(r["ok"] for r in rows.values()) else 1


def _s(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.1f}s"


if __name__ == "__main__":
    sys.exit(main())
