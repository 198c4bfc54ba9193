"""A study's comparison: one row per variant (mean and spread over its seeds), as
``study.csv`` and ``study.md``, and frontier plots of the headline metric against bytes and
time: test accuracy, or validation bits per byte where every run reports them (language
models, where next-byte accuracy says little)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

from localsgd.study.folders import POINT_FILE, mismatch
from localsgd.study.spec import Study

COLUMNS = ("variant", "runs", "failed", "final_acc_mean", "final_acc_std", "best_acc_mean",
           "best_acc_std", "final_loss_mean", "final_loss_std", "final_bpb_mean",
           "final_bpb_std", "mib_per_worker_mean", "wall_s_mean", "wall_s_std",
           "time_to_target_s_mean", "reached_target")


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def foreign_runs(records: list[dict[str, Any]]) -> dict[int, str]:
    """{point: why} for complete points whose folder does not hold their own run."""
    out: dict[int, str] = {}
    for r in records:
        if r["status"] != "complete":
            continue
        why = mismatch(Path(r["run_dir"]), {
            "label": r["label"], "recipe": r.get("recipe"), "overrides": r.get("run_overrides")})
        if why is None and not (Path(r["run_dir"]) / POINT_FILE).is_file():
            why = f"run folder {r['run_dir']} does not record which point it holds"
        if why is not None:
            out[r["point"]] = why
    return out


def variant_rows(records: list[dict[str, Any]],
                 foreign: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """One row per variant, in the order the variants first appear; the points in
    ``foreign`` (see ``foreign_runs``) count as failed."""
    foreign = foreign or {}
    order: list[str] = []
    runs: dict[str, list[dict[str, Any]]] = {}
    failed: dict[str, int] = {}
    for r in records:
        v = r["variant"]
        if v not in order:
            order.append(v)
        if r["status"] != "complete" or r["point"] in foreign:
            failed[v] = failed.get(v, 0) + 1
            continue
        runs.setdefault(v, []).append(
            json.loads((Path(r["run_dir"]) / "summary.json").read_text()))
    rows = []
    for v in order:
        got = runs.get(v, [])
        acc = _mean_std([s["eval/acc"] for s in got if s.get("eval/acc") is not None])
        best = _mean_std([s["eval/best_acc"] for s in got])
        loss = _mean_std([s["eval/loss"] for s in got if s.get("eval/loss") is not None])
        bpb = _mean_std([s["eval/bpb"] for s in got if s.get("eval/bpb") is not None])
        wall = _mean_std([s["time/wall_s"] for s in got])
        reached = [s["time/to_target_s"] for s in got if s.get("time/to_target_s") is not None]
        rows.append({
            "variant": v, "runs": len(got), "failed": failed.get(v, 0),
            "final_acc_mean": acc[0], "final_acc_std": acc[1],
            "best_acc_mean": best[0], "best_acc_std": best[1],
            "final_loss_mean": loss[0], "final_loss_std": loss[1],
            "final_bpb_mean": bpb[0], "final_bpb_std": bpb[1],
            "mib_per_worker_mean": _mean_std([s["comm/bytes"] / 2**20 for s in got])[0],
            "wall_s_mean": wall[0], "wall_s_std": wall[1],
            "time_to_target_s_mean": _mean_std(reached)[0],
            "reached_target": f"{len(reached)}/{len(got)}"})
    return rows


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _bpb(rows: list[dict[str, Any]]) -> bool:
    """Whether the rows are a language model's: every row with runs reports bits per byte."""
    ran = [r for r in rows if r["runs"]]
    return bool(ran) and all(r["final_bpb_mean"] is not None for r in ran)


def markdown(rows: list[dict[str, Any]]) -> str:
    bpb = _bpb(rows)
    lines = ["| variant | runs | final acc | best acc | final eval loss | "
             + ("final eval bits/byte | " if bpb else "")
             + "MiB sent / worker | wall s | time to target s (reached) |",
             "|---|---|---|---|---|" + ("---|" if bpb else "") + "---|---|---|"]
    for r in rows:
        runs = f"{r['runs']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        lines.append(
            f"| {r['variant']} | {runs} | {_fmt(r['final_acc_mean'])} +- "
            f"{_fmt(r['final_acc_std'])} | {_fmt(r['best_acc_mean'])} +- "
            f"{_fmt(r['best_acc_std'])} | {_fmt(r['final_loss_mean'])} +- "
            f"{_fmt(r['final_loss_std'])} | "
            + (f"{_fmt(r['final_bpb_mean'])} +- {_fmt(r['final_bpb_std'])} | " if bpb else "")
            + f"{_fmt(r['mib_per_worker_mean'], 1)} | "
            f"{_fmt(r['wall_s_mean'], 1)} +- {_fmt(r['wall_s_std'], 1)} | "
            f"{_fmt(r['time_to_target_s_mean'], 1)} ({r['reached_target']}) |")
    return "\n".join(lines) + "\n"


def _frontier(rows: list[dict[str, Any]], x: str, xerr: str | None, xlabel: str,
              title: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y = "final_bpb" if _bpb(rows) else "final_acc"
    plotted = [r for r in rows if r[f"{y}_mean"] is not None and r[x] is not None]
    for r in plotted:
        ax.errorbar(r[x], r[f"{y}_mean"], yerr=r[f"{y}_std"],
                    xerr=r[xerr] if xerr else None, fmt="o", capsize=3, label=r["variant"])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(("final validation bits per byte" if y == "final_bpb" else
                   "final test accuracy") + " (mean +- std over seeds)")
    ax.grid(True, alpha=0.3)
    if plotted:  # every point failed: an empty plot, without legend
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def write_results(study: Study, records: list[dict[str, Any]]) -> list[Path]:
    """study.csv, study.md and (with matplotlib) the two frontier plots; returns the paths."""
    foreign = foreign_runs(records)
    rows = variant_rows(records, foreign)
    out = study.dir
    with (out / "study.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    notes = "".join(f"\n- point {k} not counted: {why}\n" for k, why in foreign.items())
    (out / "study.md").write_text(f"# Study {study.name}\n\n{markdown(rows)}{notes}")
    written = [out / "study.csv", out / "study.md"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written
    metric = "bits per byte" if _bpb(rows) else "accuracy"
    _frontier(rows, "mib_per_worker_mean", None, "data sent per worker (MiB)",
              f"{study.name}: {metric} vs communication", out / "frontier_bytes.png")
    _frontier(rows, "wall_s_mean", "wall_s_std", "wall-clock training time (s)",
              f"{study.name}: {metric} vs time", out / "frontier_time.png")
    return [*written, out / "frontier_bytes.png", out / "frontier_time.png"]
