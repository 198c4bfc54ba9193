"""Paired per-seed table of a language-model study whose variants are named ``KIND_seedN``
(``recipes/studies/shakespeare_diloco_seeds.yaml``): final validation bits per byte, MiB
sent per worker, wall time and tokens/s of each run, the median of each kind over seeds,
and the median of the per-seed differences (the other kind minus ``--baseline``).

    python benchmarks/lm_seed_pairs.py runs/studies/shakespeare_diloco_seeds \
        --baseline minibatch --out benchmarks/results/lm_diloco_seeds_cpu

writes OUT.json (the raw numbers) and OUT.md (the tables). Only complete runs (those with
``summary.json``) count; a seed is paired only when both kinds finished it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

METRICS = ("bpb", "mib_per_worker", "wall_s", "tokens_per_s")
NAME = re.compile(r"^(?P<kind>.+)_seed(?P<seed>\d+)$")


def run_record(run_dir: Path) -> dict[str, Any] | None:
    """One finished run's numbers, or None when it has no summary yet."""
    summary_file = run_dir / "summary.json"
    match = NAME.match(run_dir.name)
    if match is None or not summary_file.is_file():
        return None
    s = json.loads(summary_file.read_text())
    curve = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("eval/bpb") is not None:
            curve[row["step"]] = row["eval/bpb"]
    return {"kind": match["kind"], "seed": int(match["seed"]), "run_dir": str(run_dir),
            "steps": s["step"], "tokens": s["tokens"], "loss": s["eval/loss"],
            "bpb": s["eval/bpb"], "bpb_by_step": curve,
            "mib_per_worker": s["comm/bytes"] / 2**20,
            "grad_mib": s["comm/grad/bytes"] / 2**20,
            "average_mib": s["comm/average/bytes"] / 2**20,
            "wall_s": s["time/wall_s"], "tokens_per_s": s["throughput/tokens_per_s"],
            "to_target_s": s["time/to_target_s"]}


def compare(runs: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Medians per kind and the median paired difference (the other kind minus baseline)."""
    kinds = sorted(dict.fromkeys(r["kind"] for r in runs), key=lambda k: k != baseline)
    by = {(r["kind"], r["seed"]): r for r in runs}
    out: dict[str, Any] = {"kinds": kinds, "median": {}, "paired": {}}
    for kind in kinds:
        mine = [r for r in runs if r["kind"] == kind]
        out["median"][kind] = {m: statistics.median(r[m] for r in mine) for m in METRICS}
        out["median"][kind]["runs"] = len(mine)
    if len(kinds) == 2 and kinds[0] == baseline:
        a, b = kinds
        seeds = sorted(s for k, s in by if k == a and (b, s) in by)
        diffs = {m: [by[(b, s)][m] - by[(a, s)][m] for s in seeds] for m in METRICS}
        out["paired"] = {"difference": f"{b} minus {a}", "seeds": seeds,
                         "per_seed": diffs,
                         "median": {m: statistics.median(d) if d else None
                                    for m, d in diffs.items()}}
    return out


def markdown(runs: list[dict[str, Any]], result: dict[str, Any]) -> str:
    steps = sorted({s for r in runs for s in r["bpb_by_step"]})
    lines = ["| run | seed | final val loss (nats) | val bpb | val bpb at steps "
             + " / ".join(map(str, steps)) + " | MiB sent per worker | wall s | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(runs, key=lambda r: (r["seed"], r["kind"])):
        curve = " / ".join(f"{r['bpb_by_step'].get(s, float('nan')):.3f}" for s in steps)
        lines.append(f"| {r['kind']} | {r['seed']} | {r['loss']:.4f} | {r['bpb']:.3f} | "
                     f"{curve} | {r['mib_per_worker']:.1f} | {r['wall_s']:.0f} | "
                     f"{r['tokens_per_s']:.0f} |")
    lines += ["", "| | runs | val bpb | MiB sent per worker | wall s | tokens/s |",
              "| --- | --- | --- | --- | --- | --- |"]
    for kind, med in result["median"].items():
        lines.append(f"| median {kind} | {med['runs']} | {med['bpb']:.3f} | "
                     f"{med['mib_per_worker']:.1f} | {med['wall_s']:.0f} | "
                     f"{med['tokens_per_s']:.0f} |")
    paired = result["paired"]
    if paired and paired["seeds"]:
        med = paired["median"]
        lines.append(f"| median paired difference ({paired['difference']}, seeds "
                     f"{', '.join(map(str, paired['seeds']))}) | {len(paired['seeds'])} | "
                     f"{med['bpb']:+.3f} | {med['mib_per_worker']:+.1f} | "
                     f"{med['wall_s']:+.0f} | {med['tokens_per_s']:+.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", type=Path, help="the study's run folder")
    parser.add_argument("--baseline", default="minibatch",
                        help="the kind the differences are taken against")
    parser.add_argument("--out", type=Path, required=True,
                        help="output path without suffix (.json and .md are written)")
    args = parser.parse_args()
    runs = [r for d in sorted(args.study_dir.iterdir()) if d.is_dir()
            if (r := run_record(d)) is not None]
    if not runs:
        raise SystemExit(f"{args.study_dir}: no finished run (KIND_seedN/summary.json)")
    result = compare(runs, args.baseline)
    args.out.with_suffix(".json").write_text(
        json.dumps({"runs": runs, **result}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(runs, result))
    print(markdown(runs, result), end="")


if __name__ == "__main__":
    main()
