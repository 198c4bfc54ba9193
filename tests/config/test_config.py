"""Recipes load; every class of bad input is reported with its full key, all at once."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import REPO

from localsgd.config import ConfigError, ConfigWarning
from localsgd.recipe import RecipeConfig, load_config, validate_launch

# Study files (recipes/studies/) name recipes; tests/study checks them.
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "studies" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_every_recipe_validates(path: Path) -> None:
    assert isinstance(load_config(path), RecipeConfig)


def test_paper_recipes_hold_the_paper_settings() -> None:
    cfg = load_config(REPO / "recipes/cifar10/resnet20_post_local_h16.yaml")
    assert (cfg.model.name.value, cfg.data.batch_size, cfg.train.epochs) == ("resnet20", 128, 300)
    assert (cfg.optim.base_lr, cfg.optim.base_batch_size, cfg.optim.nesterov) == (0.1, 64, True)
    assert cfg.lr_schedule.milestones == [150, 225] and cfg.lr_schedule.warmup_epochs == 5
    assert (cfg.sync.algorithm, cfg.sync.period, cfg.sync.switch_epoch) == (
        "post_local", 16, 150)
    assert load_config(REPO / "recipes/cifar10/resnet20_post_local_h32.yaml").sync.period == 32


def problems(*overrides: str, path: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return info.value.problems


@pytest.mark.parametrize(("overrides", "key"), [
    (["train.epoch=3"], "train.epoch: unknown key; did you mean 'train.epochs'"),
    (["sync.perod=4"], "sync.perod: unknown key; did you mean 'sync.period'"),
    (["nosuch.section=1"], "nosuch.section: unknown key"),
    (["sync.period=abc"], "sync.period: invalid value"),
    (["model.name=resnet21"], "model.name: invalid value"),
    (["data.batch_size=0"], "data.batch_size: must be >= 1"),
    (["sync.algorithm=local", "sync.period=0"], "sync.period: must be >= 1"),
    (["optim.momentum=1.5"], "optim.momentum: must be in [0, 1)"),
    (["sync.algorithm=post_local"], "sync.switch_epoch: post_local needs a switch point"),
    (["sync.algorithm=post_local", "sync.switch_epoch=5", "train.epochs=3"],
     "sync.switch_epoch: must be in [0, train.epochs=3)"),
    (["sync.algorithm=lcoal"], "sync.algorithm: unknown value 'lcoal'; did you mean 'local'"),
    (["engine.name=deepsped"], "engine.name: unknown value 'deepsped'; did you mean"),
    (["sync.algorithm=post_local", "sync.switch_step=1", "sync.switch_epoch=1"],
     "sync.switch_step: give either"),
    (["optim.base_lr=inf"], "optim.base_lr: must be a finite number"),
    (["sync.bucket_mb=nan"], "sync.bucket_mb: must be a finite number"),
    (["engine.name=deepspeed"], "engine.deepspeed_config: engine deepspeed needs"),
    (["lr_schedule.milestones=[5,2]", "train.epochs=10"], "lr_schedule.milestones: must be"),
    (["train.target_acc=80"], "train.target_acc: must be in (0, 1]"),
    (["dist.backend=nccl", "dist.device=cpu"], "dist.backend: nccl needs CUDA"),
    (["badoverride"], "override 'badoverride' is not of the form"),
])
def test_each_error_names_its_key(overrides: list[str], key: str) -> None:
    found = problems(*overrides)
    assert any(p.startswith(key) for p in found), found


def test_all_problems_reported_at_once() -> None:
    found = problems("train.epoch=3", "sync.period=x", "data.batch_size=-1", "optim.lr=1")
    assert len(found) == 4
    assert {p.split(":")[0] for p in found} == {
        "train.epoch", "sync.period", "data.batch_size", "optim.lr"}


@pytest.mark.parametrize(("overrides", "ignored"), [
    (["sync.period=4"], ["sync.period"]),
    (["sync.algorithm=local", "sync.block_period=4", "sync.switch_step=3"],
     ["sync.block_period", "sync.switch_step"]),
    (["engine.deepspeed_config=deepspeed_configs/zero0_fp32.json"],
     ["engine.deepspeed_config"]),
])
def test_keys_without_effect_are_one_warning_each(overrides: list[str],
                                                  ignored: list[str]) -> None:
    with pytest.warns(ConfigWarning) as caught:
        load_config(None, overrides)
    messages = [str(w.message) for w in caught]
    assert sorted(m.split(":")[0] for m in messages) == sorted(ignored)
    assert all("has no effect" in m and "is ignored" in m for m in messages)


@pytest.mark.parametrize(("algorithm", "ignored"), [
    ("minibatch", {"sync.period", "sync.switch_epoch"}),
    ("local", {"sync.switch_epoch"}),
    ("hierarchical", set()),
])
def test_overrides_compose_with_a_paper_recipe(algorithm: str, ignored: set[str]) -> None:
    """A post-local recipe re-pointed at another algorithm loads; leftovers only warn."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(REPO / "recipes/cifar10/resnet20_post_local_h16.yaml",
                          [f"sync.algorithm={algorithm}"])
    assert cfg.sync.algorithm == algorithm and cfg.sync.period == 16
    assert {str(w.message).split(":")[0] for w in caught
            if issubclass(w.category, ConfigWarning)} == ignored


@pytest.mark.parametrize(("content", "expected"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not UTF-8 text"),
    ("name: caf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
    (b"name: a\x00b\n", "is not valid YAML"),
    (b"train:\n  epochs: 3\n  epochs: 4\n", "key 'epochs' appears twice"),
    (b"name: a\nname: b\n", "key 'name' appears twice"),
    (b"? [a, b]\n: 1\n", "a key must be a plain value"),
], ids=["binary", "latin-1", "nul-byte", "duplicate-nested", "duplicate-top", "list-key"])
def test_unreadable_recipe_files_are_one_line_naming_the_file(
        tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    found = problems(path=path)
    assert len(found) == 1 and expected in found[0] and str(path) in found[0], found
    assert "\n" not in found[0]


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    # A mapping may override what it merges in (<<); only its own keys may not repeat.
    (tmp_path / "merge.yaml").write_text("train:\n  <<: {epochs: 3, max_steps: 5}\n"
                                         "  epochs: 4\n")
    cfg = load_config(tmp_path / "merge.yaml")
    assert (cfg.train.epochs, cfg.train.max_steps) == (4, 5)


def test_a_non_finite_value_is_one_message() -> None:
    assert problems("optim.base_lr=nan") == ["optim.base_lr: must be a finite number, got nan"]


def test_importing_a_part_first_keeps_every_key() -> None:
    code = ("import localsgd.sync.schedules.hierarchical, localsgd.engines.deepspeed\n"
            "from localsgd.recipe import load_config\n"
            "cfg = load_config(None, ['sync.algorithm=hierarchical', 'sync.block_period=2'])\n"
            "print(cfg.sync.block_period, cfg.engine.deepspeed_config)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["2", "None"], proc.stderr


def test_cli_check_rejects_an_infinite_learning_rate() -> None:
    proc = subprocess.run([sys.executable, "-m", "localsgd.cli", "check",
                           "recipes/quickstart.yaml", "optim.base_lr=inf"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "optim.base_lr: must be a finite number, got inf" in proc.stderr


def test_overrides_and_interpolation() -> None:
    cfg = load_config(REPO / "recipes/quickstart.yaml",
                      ["data.batch_size=${optim.base_batch_size}", "optim.base_batch_size=32",
                       "lr_schedule.milestones=[2,3]", "optim.weight_decay=5e-4"])
    assert cfg.data.batch_size == 32
    assert cfg.lr_schedule.milestones == [2, 3]
    assert cfg.optim.weight_decay == 5e-4
    assert cfg.run.dir == "runs/quickstart"


def test_base_recipe_is_merged_underneath(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("name: a\ntrain:\n  epochs: 7\n  max_steps: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nname: b\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.name, cfg.train.epochs, cfg.train.max_steps) == ("b", 9, 3)
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    assert "missing.yaml" in problems(path=tmp_path / "c.yaml")[0]


def test_hierarchical_launch_layout() -> None:
    cfg = load_config(None, ["sync.algorithm=hierarchical", "sync.period=2"])
    validate_launch(cfg, 4, 2)
    with pytest.raises(ConfigError, match="not a multiple of LOCAL_WORLD_SIZE"):
        validate_launch(cfg, 6, 4)
    with pytest.raises(ConfigError, match="at least 2 nodes"):
        validate_launch(cfg, 2, 2)


@pytest.mark.parametrize("args", [
    ["check", "recipes/quickstart.yaml", "train.epoch=3", "sync.period=0"],
    ["check", "recipes/nope.yaml"],
])
def test_cli_check_exits_2_with_one_message_and_no_traceback(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "localsgd.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("localsgd: error:")


def test_torchrun_launch_with_bad_recipe_fails_before_training(tmp_path: Path) -> None:
    from conftest import torchrun

    proc = torchrun(["recipes/quickstart.yaml", "sync.algorithm=post_local",
                     "sync.switch_epoch=99", f"run.dir={tmp_path}/r"], check=False, timeout=120)
    assert proc.returncode != 0
    # One message (rank 0 speaks for all) and no worker traceback; torchrun's own agent
    # still prints its failure summary, which is outside the workers' control.
    assert proc.stderr.count("sync.switch_epoch: must be in [0, train.epochs=4)") == 1
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_check_prints_resolved_config() -> None:
    proc = subprocess.run([sys.executable, "-m", "localsgd.cli", "check",
                           "recipes/cifar10/resnet20_local_h16.yaml", "train.epochs=10",
                           "lr_schedule.milestones=[5]"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "period: 16" in proc.stdout and "epochs: 10" in proc.stdout
