"""Check every point of a study, run them one after another, then write the comparison.

Each point is one ``localsgd run`` (a subprocess, so one failed job cannot take the study
down) into its own run directory under the study's, in the W&B group named after the study.
A point whose run directory holds ``summary.json`` is complete and skipped; any other
resumes from its checkpoints, so re-running a study picks up where it stopped. A failed
point is recorded in ``study.json`` and the study goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from localsgd.config.errors import ConfigError
from localsgd.launch.options import option_problems
from localsgd.launch.run import launch_problems, torchrun_args
from localsgd.study.spec import Point, Study, load_study


def point_overrides(study: Study, point: Point) -> list[str]:
    """Everything a point's run gets after the base recipe, its run directory included."""
    return [*study.overrides, *point.overrides, f"run.dir={study.dir / point.slug}",
            f"wandb.group={study.name}", f"wandb.name={point.slug}"]


def check_study(study: Study) -> list[str]:
    """Every problem of every point, each once, naming the first point that has it."""
    try:
        args = torchrun_args([*study.launch, str(study.recipe)])
    except ValueError as exc:
        return [f"launch: {exc} (torchrun options, e.g. [--standalone, --nproc-per-node=2])"]
    if args.training_script_args:
        return [f"launch: {args.training_script_args} follow the recipe; give torchrun "
                "options only (overrides go under overrides:)"]
    bad = option_problems(args)
    if bad:
        return [f"launch: {problem}" for problem in bad]
    seen: dict[str, list[Point]] = {}
    for point in study.points:
        for problem in launch_problems(str(study.recipe), point_overrides(study, point),
                                       args.nnodes, str(args.nproc_per_node)):
            seen.setdefault(problem, []).append(point)
    n = len(study.points)
    out = []
    for problem, points in seen.items():
        more = f" and {len(points) - 1} more" if len(points) > 1 else ""
        out.append(f"point {points[0].index}/{n} ({points[0].label}){more}: {problem}")
    return out


def run_point(study: Study, point: Point) -> dict[str, Any]:
    run_dir = study.dir / point.slug
    record: dict[str, Any] = {"point": point.index, "label": point.label,
                              "variant": point.variant, "seed": point.seed,
                              "overrides": point.overrides, "run_dir": str(run_dir)}
    if (run_dir / "summary.json").is_file():
        return {**record, "status": "complete", "skipped": True}
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "launch.log"
    cmd = [sys.executable, "-m", "localsgd", "run", *study.launch, str(study.recipe),
           *point_overrides(study, point)]
    start = time.perf_counter()
    with log.open("a") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    record.update({"exit_code": code, "seconds": time.perf_counter() - start})
    done = code == 0 and (run_dir / "summary.json").is_file()
    return {**record, "status": "complete" if done else "failed", "skipped": False}


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if line.startswith("localsgd: error")] if log.is_file() else []
    return lines[0] if lines else f"see {log}"


def study_main(path: str) -> int:
    from localsgd.study.table import write_results

    try:
        study = load_study(path)
        problems = check_study(study)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        text = str(exc).replace("Recipe is not valid", f"Study {path} is not valid")
        print(f"localsgd: error: {text}", file=sys.stderr, flush=True)
        return 2
    study.dir.mkdir(parents=True, exist_ok=True)
    n = len(study.points)
    records = []
    for point in study.points:
        print(f"study {study.name}: point {point.index}/{n}: {point.label} "
              f"[{' '.join(point.overrides)}]", flush=True)
        record = run_point(study, point)
        records.append(record)
        if record["skipped"]:
            print("  complete already, skipped", flush=True)
        elif record["status"] == "complete":
            acc = json.loads((Path(record["run_dir"]) / "summary.json").read_text())["eval/acc"]
            print(f"  done in {record['seconds']:.0f} s, final eval/acc {acc:.4f}", flush=True)
        else:
            print(f"  FAILED (exit code {record['exit_code']}): "
                  f"{_last_error(Path(record['run_dir']) / 'launch.log')}", flush=True)
        (study.dir / "study.json").write_text(json.dumps(
            {"name": study.name, "source": str(study.source), "points": records}, indent=1))
    written = write_results(study, records)
    failed = [r for r in records if r["status"] == "failed"]
    print(f"study {study.name}: {n - len(failed)}/{n} points complete; wrote "
          + ", ".join(str(p) for p in written), flush=True)
    return 1 if failed else 0
