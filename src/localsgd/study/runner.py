"""Check every point of a study, run them one after another, then write the comparison.

Each point is one ``localsgd run`` (a subprocess, so one failed job cannot take the study
down) into its own run directory under the study's, in the W&B group named after the study.
A point whose run directory holds ``summary.json`` is complete and skipped; any other
resumes from its checkpoints, so re-running a study picks up where it stopped. Each run
directory records the point it was started for (``folders``); one that holds another
point's run is reported and left alone. A failed point is recorded in ``study.json`` and
the study goes on.
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
from localsgd.study.folders import (
    MAX_NAME_BYTES,
    POINT_FILE,
    folder_problems,
    mismatch,
    write_point,
)
from localsgd.study.spec import Point, Study, load_study


def point_overrides(study: Study, point: Point) -> list[str]:
    """Everything a point's run gets after the base recipe, its run directory included."""
    return [*study.overrides, *point.overrides, f"run.dir={study.dir / point.slug}",
            f"wandb.group={study.name}", f"wandb.name={point.slug}"]


def expected_point(study: Study, point: Point) -> dict[str, Any]:
    """What a point's run folder must record (``folders.POINT_FILE``) to count as its run."""
    return {"label": point.label, "recipe": str(study.recipe.resolve()),
            "overrides": point_overrides(study, point)}


def check_study(study: Study) -> list[str]:
    """Every problem of every point, each once, naming the first point that has it."""
    folders = folder_problems(study.points)
    try:
        args = torchrun_args([*study.launch, str(study.recipe)])
    except ValueError as exc:
        return [*folders, f"launch: {exc} (torchrun options, e.g. [--standalone, "
                          "--nproc-per-node=2])"]
    if args.training_script_args:
        return [*folders, f"launch: {args.training_script_args} follow the recipe; give "
                          "torchrun options only (overrides go under overrides:)"]
    bad = option_problems(args)
    if bad:
        return [*folders, *(f"launch: {problem}" for problem in bad)]
    seen: dict[str, list[Point]] = {}
    for point in study.points:
        if len(point.slug.encode()) > MAX_NAME_BYTES:
            continue  # reported by folder_problems; its W&B run name would be refused too
        for problem in launch_problems(str(study.recipe), point_overrides(study, point),
                                       args.nnodes, str(args.nproc_per_node)):
            seen.setdefault(problem, []).append(point)
    n = len(study.points)
    out = folders
    for problem, points in seen.items():
        more = f" and {len(points) - 1} more" if len(points) > 1 else ""
        out.append(f"point {points[0].index}/{n} ({points[0].label}){more}: {problem}")
    return out


def _legacy_mismatch(study: Study, point: Point, run_dir: Path) -> str | None:
    """For a folder without ``point.json`` (an earlier version's run): compare the recipe
    it saved with this point's; None when they agree or there is nothing to compare."""
    from localsgd.recipe import load_config, to_yaml

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return None
    try:
        mine = to_yaml(load_config(str(study.recipe), point_overrides(study, point)))
    except ConfigError:
        return None  # check_study has vouched for it; a recipe edited since then runs anew
    if saved.read_text(errors="replace") == mine:
        return None
    return (f"run folder {run_dir} holds a run whose config.yaml differs from point "
            f"{point.label!r}'s recipe; move or delete the folder, or give this point "
            "another label")


def run_point(study: Study, point: Point) -> dict[str, Any]:
    run_dir = study.dir / point.slug
    expected = expected_point(study, point)
    record: dict[str, Any] = {"point": point.index, "label": point.label,
                              "variant": point.variant, "seed": point.seed,
                              "overrides": point.overrides, "run_dir": str(run_dir),
                              "recipe": expected["recipe"],
                              "run_overrides": expected["overrides"]}
    legacy = run_dir.is_dir() and not (run_dir / POINT_FILE).is_file()
    foreign = _legacy_mismatch(study, point, run_dir) if legacy else mismatch(run_dir, expected)
    if foreign is not None:
        return {**record, "status": "mismatch", "skipped": False, "error": foreign}
    if legacy and (run_dir / "config.yaml").is_file():
        write_point(run_dir, expected)  # its saved recipe is this point's: adopt it
    if (run_dir / "summary.json").is_file():
        return {**record, "status": "complete", "skipped": True}
    write_point(run_dir, expected)
    log = run_dir / "launch.log"
    cmd = [sys.executable, "-m", "localsgd", "run", *study.launch, str(study.recipe),
           *point_overrides(study, point)]
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"localsgd study: launch {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        out.flush()
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    record.update({"exit_code": code, "seconds": time.perf_counter() - start})
    done = code == 0 and (run_dir / "summary.json").is_file()
    record["status"] = "complete" if done else "failed"
    if not done:
        record["error"] = last_error(log)
    return {**record, "skipped": False}


_LAUNCH_MARK = "localsgd study: launch "
_SUMMARY = "localsgd: error: the job failed ("


def last_error(log: Path) -> str:
    """The worker's whole error from the latest launch in ``log``, on one line.

    A recipe error spans lines (a heading, then one ``  - key: ...`` line per problem);
    they are joined with ``; ``. Without any ``localsgd: error`` from a worker (a crash),
    the last lines before the launcher's summary say what happened.
    """
    if not log.is_file():
        return f"see {log}"
    lines = log.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(_LAUNCH_MARK)]
    lines = lines[starts[-1] + 1:] if starts else lines
    blocks: list[str] = []
    for i, line in enumerate(lines):
        if not line.startswith("localsgd: error"):
            continue
        parts = [line]
        for more in lines[i + 1:]:
            if not more.startswith("  - "):
                break
            parts.append(more[4:])
        blocks.append(parts[0] + " " + "; ".join(parts[1:]) if len(parts) > 1 else parts[0])
    own = [b for b in blocks if not b.startswith(_SUMMARY)]
    if own:
        return own[0]
    end = next((i for i, line in enumerate(lines) if line.startswith(_SUMMARY)), len(lines))
    tail = [line.strip() for line in lines[:end] if line.strip()][-3:]
    summary = blocks[0] if blocks else ""
    text = " | ".join(tail)
    return (f"{summary}: {text}" if summary else text) or f"see {log}"


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
        elif record["status"] == "mismatch":
            print(f"  NOT RUN: {record['error']}", flush=True)
        else:
            print(f"  FAILED (exit code {record['exit_code']}): {record['error']}", flush=True)
        (study.dir / "study.json").write_text(json.dumps(
            {"name": study.name, "source": str(study.source), "points": records}, indent=1))
    written = write_results(study, records)
    failed = [r for r in records if r["status"] != "complete"]
    print(f"study {study.name}: {n - len(failed)}/{n} points complete; wrote "
          + ", ".join(str(p) for p in written), flush=True)
    return 1 if failed else 0
