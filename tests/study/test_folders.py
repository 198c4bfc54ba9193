"""A study's run folders: one per point, checked before anything runs; a folder holding
another point's run is reported, never reported as this point's result; a failed point's
line carries the worker's whole error."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_group, worker_env

from localsgd.cli import main
from localsgd.study.runner import check_study, last_error
from localsgd.study.spec import load_study
from localsgd.study.table import write_results

TINY = REPO / "recipes" / "tests" / "tiny_synthetic.yaml"


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(f"name: s\nrecipe: {TINY}\ndir: {tmp_path / 'out'}\n{text}")
    return path


@pytest.mark.parametrize(("text", "expected"), [
    ("variants:\n  'a b': [seed=1]\n  a_b: [seed=2]\n",
     "points 1/2 (a b) and 2/2 (a_b) would share the run folder 'a_b'; give the variants "
     "names that differ in more than spaces, '/', punctuation and case"),
    ("variants:\n  'x/y': []\n  x-y: []\n", "points 1/2 (x/y) and 2/2 (x-y) would share"),
    ("variants:\n  Local: []\n  local: []\n",
     "points 1/2 (Local) and 2/2 (local) would share the run folder 'local' (names "
     "differing only in case are one folder on case-insensitive file systems)"),
    ("grid:\n  seed: [0, 0]\n", "points 1/2 (base seed=0) and 2/2 (base seed=0) would share"),
    ("variants:\n  '..': []\n", "point 1/1 ('..'): its run folder name would be '..', which "
                                "is not a folder of its own"),
    ("variants:\n  '.': []\n", "point 1/1 ('.'): its run folder name would be '.'"),
    (f"variants:\n  {'v' * 300}: []\n", "point 1/1 (vvvvvvvvvv"),
])
def test_labels_map_one_to_one_to_folders(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                          text: str, expected: str) -> None:
    path = write(tmp_path, text)
    problems = check_study(load_study(path))
    assert len(problems) == 1 and problems[0].startswith(expected), problems
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"localsgd: error: Study {path} is not valid (1 problem):\n  - ")
    assert len(err.splitlines()) == 2 and expected in err
    assert not (tmp_path / "out").exists()


def test_every_clash_is_named_once(tmp_path: Path) -> None:
    problems = check_study(load_study(write(
        tmp_path, "variants:\n  'a b': []\n  a_b: []\n  A_B: []\n  'c d': []\n  c_d: []\n"
                  "  e: []\n")))
    assert [p.split(" would")[0] for p in problems] == [
        "points 1/6 (a b) and 2/6 (a_b)",
        "points 1/6 (a b) and 3/6 (A_B)", "points 4/6 (c d) and 5/6 (c_d)"]
    # Reported with the points' other problems, all at once.
    problems = check_study(load_study(write(
        tmp_path, "variants:\n  'a b': []\n  a_b: [sync.perod=2]\n")))
    assert [p.split(":")[0].split(" would")[0] for p in problems] == [
        "points 1/2 (a b) and 2/2 (a_b)", "point 2/2 (a_b)"], problems


def test_the_failed_line_carries_every_problem(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    # The launcher's own output for a recipe with two problems, as a study's log holds it.
    assert main(["run", "--standalone", "--nproc-per-node=1", str(TINY), "train.epoch=3",
                 "sync.perod=4"]) == 2
    log = tmp_path / "launch.log"
    log.write_text("localsgd study: launch 2026-01-01 00:00:00\nearlier output\n"
                   + capsys.readouterr().err + "trailing output\n")
    assert last_error(log) == (
        "localsgd: error: Recipe is not valid (2 problems): train.epoch: unknown key; did you "
        "mean 'train.epochs'?; sync.perod: unknown key; did you mean 'sync.period'?")
    # Only the latest launch counts; a crash without a message of ours is its last lines.
    log.write_text(log.read_text() + "localsgd study: launch 2026-01-01 00:01:00\n"
                   "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "MemoryError: out of memory\n"
                   "localsgd: error: the job failed (rank 0 exit code 1); the workers' "
                   "messages are above\n")
    assert last_error(log) == (
        "localsgd: error: the job failed (rank 0 exit code 1); the workers' messages are "
        "above: Traceback (most recent call last): | File \"x.py\", line 1 | "
        "MemoryError: out of memory")


def rows(out: Path) -> list[tuple[str, str, str]]:
    return [(r["variant"], r["runs"], r["failed"])
            for r in csv.DictReader((out / "study.csv").open())]


def test_a_folder_holding_another_points_run_is_reported(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    common = ("launch: [--standalone, --nproc-per-node=1]\n"
              "overrides: [train.epochs=1, data.synthetic_samples=64]\n")
    first = write(tmp_path, common + "variants:\n  ok: [sync.algorithm=local, sync.period=4]\n"
                                     "  gpu: [dist.device=cuda]\n")
    cmd = [sys.executable, "-m", "localsgd", "study", str(first)]
    proc = run_group(cmd, env=worker_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    out, ok = tmp_path / "out", tmp_path / "out" / "ok"
    # The worker's whole error, key and fix included.
    assert ("  FAILED (exit code 2): localsgd: error: Recipe is not valid (1 problem): "
            "dist.device: cuda was asked for but no CUDA device is visible; use "
            "dist.device=cpu or dist.device=auto") in proc.stdout.splitlines()
    recorded = json.loads((ok / "point.json").read_text())
    assert recorded["label"] == "ok" and recorded["recipe"] == str(TINY)
    assert recorded["overrides"][:4] == ["train.epochs=1", "data.synthetic_samples=64",
                                         "sync.algorithm=local", "sync.period=4"]
    acc = json.loads((ok / "summary.json").read_text())["eval/acc"]
    assert rows(out) == [("ok", "1", "0"), ("gpu", "0", "1")]

    # The same label with other overrides: the folder is not this point's result. (The
    # rest runs in this process: none of it launches a job.)
    second = write(tmp_path, common + "variants:\n  ok: [sync.algorithm=local, sync.period=2]\n",
                   "second.yaml")
    assert main(["study", str(second)]) == 1
    stdout = capsys.readouterr().out
    line = next(x for x in stdout.splitlines() if x.startswith("  NOT RUN: "))
    assert line.startswith(f"  NOT RUN: run folder {ok} holds the run of point 'ok' [")
    assert "sync.period=4" in line and "not of 'ok' [" in line and "sync.period=2" in line
    assert "complete already" not in stdout
    assert rows(out) == [("ok", "0", "1")]
    assert "| ok | 0 (1 failed) | - +- -" in (out / "study.md").read_text()
    assert json.loads((ok / "summary.json").read_text())["eval/acc"] == acc  # untouched

    # A folder from before point.json existed: its saved config.yaml decides.
    (ok / "point.json").unlink()
    assert main(["study", str(second)]) == 1
    stdout = capsys.readouterr().out
    assert "NOT RUN: run folder" in stdout and "config.yaml differs" in stdout
    assert not (ok / "point.json").exists()
    same = write(tmp_path, common + "variants:\n  ok: [sync.algorithm=local, sync.period=4]\n",
                 "same.yaml")
    assert main(["study", str(same)]) == 0
    assert capsys.readouterr().out.count("complete already, skipped") == 1
    assert json.loads((ok / "point.json").read_text()) == recorded  # adopted

    # The table checks too: a record whose folder holds another label's run is not counted.
    records = json.loads((out / "study.json").read_text())["points"]
    twin = out / "twin"
    shutil.copytree(ok, twin)
    records = [{**records[0], "point": 3, "label": "twin", "variant": "twin",
                "run_dir": str(twin)}, *records]
    write_results(load_study(same), records)
    assert rows(out) == [("twin", "0", "1"), ("ok", "1", "0")]
    md = (out / "study.md").read_text()
    assert f"- point 3 not counted: run folder {twin} holds the run of point 'ok'" in md
