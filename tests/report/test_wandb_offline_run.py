"""Real torchrun runs with the W&B sink: the offline run read back with W&B's own reader.

Two 2-process runs of the tiny synthetic recipe share this module:

* ``local``: local SGD (H=4) with W&B offline, a planted fake WANDB_API_KEY and a planted
  secret environment variable. Its ``.wandb`` transaction log is decoded by
  ``wandb leet inspect --json`` (the reader shipped with wandb) and compared with
  metrics.jsonl, config.yaml and summary.json.
* ``minibatch``: W&B forced online with no credentials anywhere, so ``wandb.init`` fails for
  real (no mock); training must finish with one warning and complete local records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import synthetic_args, torchrun, worker_env
from helpers import summary, wandb_records

from localsgd.report.files import read_metrics
from localsgd.report.plots import PLOTS, collect_series, draw, plot_runs
from localsgd.report.wandb_sink import AXES, GLOB_AXES, to_row

FAKE_KEY = "local-fakekey0123456789abcdef0123456789abcdef"
SECRET = "envsecret-9f8e7d6c5b4a"
GROUP = "report-test"


def _env_without_wandb(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in worker_env().items() if not k.startswith("WANDB_")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("wandb_runs")
    local, minibatch = root / "local-h4", root / "minibatch"
    local_proc = torchrun(
        synthetic_args(local, "train.epochs=2", "sync.algorithm=local", "sync.period=4",
                       "train.target_acc=0.1", "wandb.mode=offline", f"wandb.group={GROUP}",
                       "wandb.tags=[smoke,h4]", "wandb.notes=report test"),
        env=_env_without_wandb(WANDB_MODE="offline", WANDB_API_KEY=FAKE_KEY,
                               LOCALSGD_TEST_SECRET=SECRET))
    # No key in the environment, none in a netrc (HOME is empty), stderr not a terminal:
    # wandb.init raises at once instead of prompting.
    home = root / "home"
    home.mkdir()
    mb_proc = torchrun(
        synthetic_args(minibatch, "train.epochs=2", "sync.algorithm=minibatch",
                       "wandb.mode=online"),
        env=_env_without_wandb(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config")),
        check=False)
    return {"root": root, "local": local, "minibatch": minibatch, "local_proc": local_proc,
            "mb_proc": mb_proc}


@pytest.fixture(scope="module")
def wandb_log(runs: dict[str, Any]) -> list[dict[str, Any]]:
    return wandb_records(runs["local"])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return b == pytest.approx(a, rel=1e-12, abs=1e-15)
    return a == b


def test_history_rows_mirror_metrics_jsonl(runs: dict[str, Any],
                                           wandb_log: list[dict[str, Any]]) -> None:
    records = read_metrics(runs["local"])
    history = [{k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
               for r in wandb_log if r["type"] == "history"]
    # One row per record, in logging order, even though sync records go back in step.
    assert len(history) == len(records)
    assert any(b["step"] < a["step"] for a, b in zip(history, history[1:], strict=False))
    for row, record in zip(history, records, strict=True):
        expected = to_row(record)
        assert set(row) == set(expected), (row, record)
        assert all(_same(expected[k], row[k]) for k in expected), (row, record)
    epochs = [r for r in records if r["event"] == "epoch"]
    eval_rows = [h for h in history if "eval/acc" in h]
    assert [h["epoch"] for h in eval_rows] == [1, 2]
    assert [h["eval/acc"] for h in eval_rows] == pytest.approx([r["eval/acc"] for r in epochs])
    assert [h["comm/bytes"] for h in eval_rows] == [r["comm/bytes"] for r in epochs]
    syncs = [h for h in history if "sync/action" in h]
    assert [h["step"] for h in syncs] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert "sync/consensus_distance_epoch_mean" in eval_rows[0]


def test_run_identity_and_config(runs: dict[str, Any], wandb_log: list[dict[str, Any]]) -> None:
    (run,) = [r["run"] for r in wandb_log if r["type"] == "run"]
    assert run["run_group"] == GROUP
    assert run["job_type"] == "local"
    assert run["display_name"] == "local-h4"
    assert run["project"] == "localsgd"
    assert run["tags"] == ["smoke", "h4"]
    assert run["notes"] == "report test"
    config = run["config"]["update"]
    saved = yaml.safe_load((runs["local"] / "config.yaml").read_text())
    for section in ("model", "data", "optim", "train", "sync", "run", "wandb"):
        assert config[section] == saved[section], section
    assert config["sync"]["algorithm"] == "local" and config["sync"]["period"] == 4
    assert config["launch"]["world_size"] == 2
    assert [r["exit"]["exit_code"] for r in wandb_log if r["type"] == "exit"] == [0]


def test_metric_axes_declared(wandb_log: list[dict[str, Any]]) -> None:
    defined = {m.get("name") or m.get("glob_name"): m.get("step_metric")
               for m in (r["metric"] for r in wandb_log if r["type"] == "metric")}
    assert defined["step"] is None
    assert all(defined[axis] == "step" for axis in AXES[1:])
    assert defined["eval/*"] == "epoch"
    assert all(defined[glob] == axis for glob, axis in GLOB_AXES.items())


def test_summary_has_final_values(runs: dict[str, Any], wandb_log: list[dict[str, Any]]) -> None:
    logged: dict[str, Any] = {}
    for r in wandb_log:
        if r["type"] == "summary":
            logged.update(r["summary"]["update"])
    local = summary(runs["local"])
    for key in ("eval/acc", "eval/best_acc", "comm/bytes", "time/wall_s", "time/to_target_s"):
        assert local[key] is not None, key
        assert _same(local[key], logged[key]), key


def test_no_secret_in_any_file(runs: dict[str, Any]) -> None:
    assert "WANDB_API_KEY" not in runs["local_proc"].stdout + runs["local_proc"].stderr
    files = [p for p in runs["root"].rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in (FAKE_KEY, FAKE_KEY[6:], SECRET):
            assert secret.encode() not in data, f"{secret} found in {path}"


def test_failed_wandb_init_warns_once_and_training_finishes(runs: dict[str, Any]) -> None:
    proc = runs["mb_proc"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("WandbSinkWarning") == 1, proc.stderr[-4000:]
    assert "local records" in proc.stderr
    records = read_metrics(runs["minibatch"])
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [1, 2]
    assert summary(runs["minibatch"])["eval/acc"] is not None
    assert not list(runs["minibatch"].glob("wandb/*/run-*.wandb"))


def test_plots_show_both_runs(runs: dict[str, Any], tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    dirs = [str(runs["local"]), str(runs["minibatch"])]
    assert plot_runs(dirs, str(tmp_path)) == 0
    printed = capsys.readouterr().out.split()
    # Image runs have no token counts: the language-model plots (validation loss against
    # tokens, time and bytes) are left out.
    assert sorted(printed) == sorted(str(tmp_path / f"{s.name}.png") for s in PLOTS
                                     if s.event != "eval")
    assert all(os.path.getsize(p) > 1000 for p in printed)

    series = collect_series(dirs)
    local_label, mb_label = "local-h4 (local)", "minibatch (minibatch)"
    for name in ("acc_vs_epoch", "acc_vs_time", "acc_vs_bytes", "loss_vs_epoch"):
        assert set(series[name]) == {local_label, mb_label}, name
    for label, run_dir in ((local_label, runs["local"]), (mb_label, runs["minibatch"])):
        epochs = [r for r in read_metrics(run_dir) if r["event"] == "epoch"]
        acc = [r["eval/acc"] for r in epochs]
        assert series["acc_vs_epoch"][label] == ([1.0, 2.0], acc)
        assert series["acc_vs_time"][label] == ([r["time/wall_s"] for r in epochs], acc)
        assert series["acc_vs_bytes"][label] == ([float(r["comm/bytes"]) for r in epochs], acc)
        assert series["loss_vs_epoch"][label][1] == [r["train/loss"] for r in epochs]
    # Mini-batch SGD never averages models, so only the local run has a consensus series.
    syncs = [r for r in read_metrics(runs["local"]) if r["event"] == "sync"]
    assert series["consensus_vs_step"] == {
        local_label: ([float(r["step"]) for r in syncs],
                      [r["sync/consensus_distance"] for r in syncs])}

    # The figure draws exactly these series (bytes shown in MiB).
    spec = next(s for s in PLOTS if s.name == "acc_vs_bytes")
    (ax,) = draw(spec, series[spec.name]).axes
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in ax.get_lines()}
    for label, (xs, ys) in series[spec.name].items():
        assert drawn[label][0] == pytest.approx([x / 2**20 for x in xs])
        assert drawn[label][1] == ys
