"""WandbReporter in-process: mode resolution, record mapping, and the failure paths.

The failure tests replace wandb.init / run.log with functions that raise. That is a mock on
purpose: it is the only way to make W&B fail on demand at a chosen call; the real,
unmocked failure (online without credentials) runs in test_wandb_offline_run.py.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
from conftest import REPO

from localsgd.config.schema import WandbMode
from localsgd.launch.env import DistInfo
from localsgd.recipe import RecipeConfig, load_config
from localsgd.report.build import build_reporters
from localsgd.report.wandb_sink import (
    EPOCH_MEAN_DISTANCE,
    WandbReporter,
    WandbSinkWarning,
    resolve_mode,
    run_config,
    to_row,
)

RECIPE = REPO / "recipes" / "tests" / "tiny_synthetic.yaml"


def _cfg(*overrides: str) -> RecipeConfig:
    return load_config(RECIPE, list(overrides))


def _info(rank: int = 0) -> DistInfo:
    return DistInfo(rank=rank, world_size=2, local_rank=rank, local_world_size=2,
                    device=torch.device("cpu"), backend="gloo")


def _sink_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, WandbSinkWarning)]


def test_mode_recipe_then_env_then_offline() -> None:
    cfg = _cfg()
    assert resolve_mode(cfg, {}) == "offline"
    assert resolve_mode(cfg, {"WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode(cfg, {"WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_mode(cfg, {"WANDB_MODE": "Online"}) == "online"
    cfg.wandb.mode = WandbMode.offline
    assert resolve_mode(cfg, {"WANDB_MODE": "online"}) == "offline"


def test_rows_drop_event_and_split_epoch_mean_distance() -> None:
    sync = {"event": "sync", "step": 4, "sync/consensus_distance": 0.5, "sync/action": "global"}
    epoch = {"event": "epoch", "step": 16, "epoch": 1, "sync/consensus_distance": 0.4}
    assert to_row(sync) == {"step": 4, "sync/consensus_distance": 0.5, "sync/action": "global"}
    assert to_row(epoch) == {"step": 16, "epoch": 1, EPOCH_MEAN_DISTANCE: 0.4}


def test_config_is_plain_resolved_recipe() -> None:
    config = run_config(_cfg("sync.algorithm=local", "sync.period=4"), _info())
    assert config["sync"]["algorithm"] == "local"  # enum as its string
    assert config["model"]["name"] == "simplecnn"
    assert config["launch"] == {"world_size": 2, "local_world_size": 2, "num_nodes": 1,
                                "backend": "gloo", "device": "cpu"}


def test_build_adds_wandb_only_on_rank0_and_when_enabled(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    made: list[Any] = []
    monkeypatch.setattr("localsgd.report.build.WandbReporter",
                        lambda *a, **k: made.append(k["mode"]) or object())

    def names(reporters: Any) -> list[str]:
        for s in reporters.sinks:
            if hasattr(s, "close") and hasattr(s, "_file"):
                s.close()  # the JSONL file handle
        return [type(s).__name__ for s in reporters.sinks]

    assert len(names(build_reporters(_cfg(), tmp_path, _info(0)))) == 3
    assert made == ["offline"]
    assert len(names(build_reporters(_cfg(), tmp_path, _info(1)))) == 2
    assert len(names(build_reporters(_cfg("wandb.mode=disabled"), tmp_path, _info(0)))) == 2
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert len(names(build_reporters(_cfg(), tmp_path, _info(0)))) == 2
    assert made == ["offline"]


def test_init_failure_warns_once_and_sink_goes_quiet(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_init(**kwargs: Any) -> Any:
        raise wandb.errors.CommError("network unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink = WandbReporter(_cfg(), tmp_path, _info(), mode="online")
        for step in range(3):
            sink.log({"event": "step", "step": step, "train/loss_rank0": 1.0})
        sink.summary({"eval/acc": 0.5})
        sink.close()
    messages = _sink_warnings(caught)
    assert len(messages) == 1
    assert "network unreachable" in messages[0] and "metrics.jsonl" in messages[0]
    assert not sink.active


def test_missing_package_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink = WandbReporter(_cfg(), tmp_path, _info())
        sink.log({"event": "step", "step": 1})
        sink.close()
    assert len(_sink_warnings(caught)) == 1


def test_log_failure_mid_run_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    sink = WandbReporter(_cfg(), tmp_path, _info())  # a real offline run
    assert sink.active and sink.mode == "offline"
    sink.log({"event": "step", "step": 1, "train/loss_rank0": 2.0})
    calls = []

    def broken_log(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise ConnectionError("service went away")

    monkeypatch.setattr(sink._run, "log", broken_log)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2, 5):
            sink.log({"event": "step", "step": step, "train/loss_rank0": 2.0})
        sink.summary({"eval/acc": 0.5})
        sink.close()
    assert len(_sink_warnings(caught)) == 1
    assert len(calls) == 1  # disabled after the first failure
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
