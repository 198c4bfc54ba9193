"""``localsgd study``: the study file, its checks, and a real study of torchrun jobs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_group, worker_env

from localsgd.config import ConfigError
from localsgd.study.runner import check_study
from localsgd.study.spec import load_study

TINY = REPO / "recipes" / "tests" / "tiny_synthetic.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"name: s\nrecipe: {TINY}\ndir: {tmp_path / 'out'}\n{text}")
    return path


def test_points_are_variants_times_grid_in_order(tmp_path: Path) -> None:
    study = load_study(write(tmp_path, "variants:\n  a: [sync.algorithm=local]\n  b: []\n"
                                      "grid:\n  sync.period: [2, 4]\n  seed: [0, 1]\n"))
    assert [p.label for p in study.points] == [
        "a,sync.period=2 seed=0", "a,sync.period=2 seed=1", "a,sync.period=4 seed=0",
        "a,sync.period=4 seed=1", "b,sync.period=2 seed=0", "b,sync.period=2 seed=1",
        "b,sync.period=4 seed=0", "b,sync.period=4 seed=1"]
    assert study.points[1].overrides == ["sync.algorithm=local", "sync.period=2", "seed=1"]
    assert study.points[1].variant == "a,sync.period=2" and study.points[1].seed == 1
    assert study.points[1].slug == "a,sync.period=2_seed=1"
    assert study.launch == ["--standalone", "--nproc-per-node=2"]


@pytest.mark.parametrize(("text", "message"), [
    ("grid:\n  sync.algoritm: [local]\n",
     "point 1/1 (sync.algoritm=local): sync.algoritm: unknown key; did you mean "
     "'sync.algorithm'?"),
    ("overrides: [sync.algorithm=local]\ngrid:\n  sync.period: [0, 2, 3]\n  seed: [0, 1]\n",
     "point 1/6 (sync.period=0 seed=0) and 1 more: sync.period: must be >= 1, got 0"),
    ("grid: {}\n", "grid: the study has no points"),
    ("grid:\n  seed: []\n", "grid.seed: must be a non-empty list of values"),
    ("gird:\n  seed: [0]\n", "gird: unknown study key; did you mean 'grid'?"),
    ("launch: [--nprocs=2]\ngrid:\n  seed: [0]\n", "launch: unrecognized arguments"),
])
def test_bad_studies_name_the_entry(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        study = load_study(write(tmp_path, text))
        problems = check_study(study)
        if problems:
            raise ConfigError(problems)
    assert any(p.startswith(message) for p in err.value.problems), err.value.problems


def test_bad_study_exits_2_before_running_anything(tmp_path: Path) -> None:
    path = write(tmp_path, "grid:\n  sync.algorithm: [local, localsgd]\n")
    proc = subprocess.run([sys.executable, "-m", "localsgd", "study", str(path)], cwd=REPO,
                          env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"localsgd: error: Study {path} is not valid (1 problem)")
    assert "point 2/2 (sync.algorithm=localsgd): sync.algorithm: unknown value" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_study_runs_records_failures_skips_and_resumes(tmp_path: Path) -> None:
    path = write(tmp_path, (
        # One worker and one short epoch: the test is about the study's bookkeeping.
        "launch: [--standalone, --nproc-per-node=1]\n"
        "overrides: [run.checkpoint_every_epochs=1, train.epochs=1, data.synthetic_samples=64]\n"
        "variants:\n"
        "  local: [sync.algorithm=local, sync.period=4]\n"
        "  broken: [data.name=cifar10, data.root=/nonexistent, data.download=false]\n"
        "grid:\n  seed: [0, 1]\n"))
    cmd = [sys.executable, "-m", "localsgd", "study", str(path)]
    first = run_group(cmd, env=worker_env(), timeout=600)
    assert first.returncode == 1, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    broken = "data.name=cifar10 data.root=/nonexistent data.download=false"
    assert [line for line in lines if line.startswith("study s: point")] == [
        "study s: point 1/4: local seed=0 [sync.algorithm=local sync.period=4 seed=0]",
        "study s: point 2/4: local seed=1 [sync.algorithm=local sync.period=4 seed=1]",
        f"study s: point 3/4: broken seed=0 [{broken} seed=0]",
        f"study s: point 4/4: broken seed=1 [{broken} seed=1]"]
    assert sum("FAILED (exit code 2): localsgd: error: CIFAR-10 not found" in line
               for line in lines) == 2
    out = tmp_path / "out"
    records = json.loads((out / "study.json").read_text())["points"]
    assert [r["status"] for r in records] == ["complete"] * 2 + ["failed"] * 2
    rows = list(csv.DictReader((out / "study.csv").open()))
    assert [(r["variant"], r["runs"], r["failed"]) for r in rows] == [
        ("local", "2", "0"), ("broken", "0", "2")]
    accs = [json.loads((out / f"local_seed={s}" / "summary.json").read_text())["eval/acc"]
            for s in (0, 1)]
    assert float(rows[0]["final_acc_mean"]) == pytest.approx(sum(accs) / 2)
    assert all((out / f).stat().st_size > 0 for f in ("study.md", "frontier_bytes.png",
                                                       "frontier_time.png"))
    # An interrupted point: its checkpoints stay, its summary is gone.
    (out / "local_seed=1" / "summary.json").unlink()
    again = run_group(cmd, env=worker_env(), timeout=600)
    assert again.stdout.count("complete already, skipped") == 1
    assert "localsgd: " + str(out / "local_seed=1") not in again.stdout
    assert json.loads((out / "local_seed=1" / "summary.json").read_text())["eval/acc"] == \
        pytest.approx(accs[1])


STUDIES = sorted(p for p in (REPO / "recipes" / "studies").glob("*.yaml")
                 if not p.name.endswith(".sweep.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_studies_check_clean(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALSGD_DATA", str(REPO.parent / "shared" / "data" / "cifar10"))
    study = load_study(path)
    assert study.points and check_study(study) == []
