"""The DeepSpeed JSON policy: recipe-owned keys filled or rejected, unsupported set-ups named."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from localsgd.config.errors import ConfigError
from localsgd.engines import EngineConfig, EngineContext, check_engine
from localsgd.engines.deepspeed_config import check_deepspeed_config, resolve_deepspeed_config
from localsgd.launch.env import DistInfo
from localsgd.recipe import facts, load_config
from localsgd.registry import Facts

SHIPPED = sorted((REPO / "deepspeed_configs").glob("*.json"))


def at(micro: int, accum: int, world: int | None = None, local: bool = True) -> Facts:
    """What the engine's check knows: batch, accumulation, world size, local steps or not."""
    return Facts(epochs=1, micro_batch=micro, grad_accum=accum, local_steps=local,
                 algorithm="local" if local else "minibatch", world_size=world)


def engine(tmp_path: Path, ds: dict) -> str:
    """A JSON file holding ``ds``; each call writes a new file (files are read once)."""
    path = tmp_path / f"ds{len(list(tmp_path.glob('ds*.json')))}.json"
    path.write_text(json.dumps(ds))
    return str(path)


def test_shipped_configs_exist_and_are_plain_deepspeed_json() -> None:
    names = {p.name for p in SHIPPED}
    assert {"zero0_fp32.json", "zero0_bf16.json"} <= names
    for p in SHIPPED:
        ds = json.loads(p.read_text())
        assert isinstance(ds, dict) and "zero_optimization" in ds


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
@pytest.mark.parametrize("overrides", [[], ["sync.algorithm=local", "sync.period=4"], [
    "sync.algorithm=post_local", "sync.period=4", "sync.switch_step=3"]],
    ids=["minibatch", "local", "post_local"])
def test_shipped_configs_pass_for_every_algorithm(path: Path, overrides: list[str]) -> None:
    precision = "bf16" if "bf16" in path.name else "fp32"
    cfg = load_config(None, ["engine.name=deepspeed", f"engine.deepspeed_config={path}",
                             "data.batch_size=16", "train.grad_accum=2",
                             f"model.precision={precision}", *overrides])
    assert check_engine(cfg.engine, facts(cfg, world_size=4)) == ([], [])


def test_every_recipe_naming_a_config_agrees_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # recipes name their JSON relative to the repository root
    shipped = {p.resolve() for p in SHIPPED}
    for recipe in sorted(p for p in (REPO / "recipes").rglob("*.yaml")
                         if "studies" not in p.parts):
        cfg = load_config(recipe)
        path = cfg.engine.deepspeed_config
        if cfg.engine.name != "deepspeed" or path is None:
            continue
        assert Path(path).resolve() in shipped, (recipe, path)
        problems = check_deepspeed_config(path, facts(cfg))
        assert problems == [], (recipe, problems)


def test_recipe_owned_keys_are_filled() -> None:
    ds = resolve_deepspeed_config(str(REPO / "deepspeed_configs/zero0_fp32.json"), at(16, 2, 4))
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 128
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed's own default is 1.0
    assert "optimizer" not in ds and "scheduler" not in ds


def test_matching_and_auto_values_are_accepted(tmp_path: Path) -> None:
    cfg = engine(tmp_path, {"train_micro_batch_size_per_gpu": 16,
                            "gradient_accumulation_steps": "auto", "train_batch_size": 64,
                            "gradient_clipping": 0.0, "zero_optimization": {"stage": 0}})
    assert check_deepspeed_config(cfg, at(16, 2, 2)) == []
    assert resolve_deepspeed_config(cfg, at(16, 2, 2))["gradient_accumulation_steps"] == 2


@pytest.mark.parametrize(("ds", "needles"), [
    ({"train_micro_batch_size_per_gpu": 7},
     ["train_micro_batch_size_per_gpu=7", "data.batch_size=16", "remove"]),
    ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps=4", "train.grad_accum=2"]),
    ({"train_batch_size": 100}, ["train_batch_size=100", "world size 2"]),
    ({"gradient_clipping": 1.0}, ["gradient_clipping=1.0", "set it to 0.0"]),
    ({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, ["'optimizer'", "optim.*"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["'scheduler'", "lr_schedule.*"]),
    ({"fp16": {"enabled": True}}, ["fp16", "CPU accelerator", "bf16"]),
    ({"torch_autocast": {"enabled": True, "dtype": "float16"}}, ["torch_autocast.dtype"]),
    ({"amp": {"enabled": True}}, ["amp"]),
    ({"zero_optimization": {"stage": 1}},
     ["zero_optimization.stage=1", "sync.algorithm=local", "minibatch", "stage-0"]),
    ({"zero_optimization": {"stage": 2}}, ["zero_optimization.stage=2", "sync.algorithm=local"]),
    ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage=3"]),
    ({"zero_optimization": {"stage": "two"}}, ["zero_optimization.stage=\"two\""]),
    ({"managed_gradient_accumulation": False}, ["managed_gradient_accumulation=false"]),
])
def test_contradictions_name_file_key_and_fix(tmp_path: Path, ds: dict,
                                              needles: list[str]) -> None:
    cfg = engine(tmp_path, ds)
    problems = check_deepspeed_config(cfg, at(16, 2, 2))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"engine.deepspeed_config: '{cfg}'")
    for needle in needles:
        assert needle in problems[0]
    with pytest.raises(ConfigError) as err:
        resolve_deepspeed_config(cfg, at(16, 2, 2))
    assert err.value.problems == problems


def test_zero_is_allowed_for_minibatch_and_untested_optimizer_filled(tmp_path: Path) -> None:
    cfg = engine(tmp_path, {"zero_optimization": {"stage": 2}})
    assert check_deepspeed_config(cfg, at(16, 1, local=False)) == []
    assert resolve_deepspeed_config(cfg, at(16, 1, 2, local=False))[
        "zero_allow_untested_optimizer"]
    refused = engine(tmp_path, {"zero_optimization": {"stage": 1},
                                "zero_allow_untested_optimizer": False})
    assert "zero_allow_untested_optimizer=false" in check_deepspeed_config(
        refused, at(16, 1, local=False))[0]


def test_train_batch_size_without_world_size_is_checked_for_divisibility(
        tmp_path: Path) -> None:
    assert check_deepspeed_config(engine(tmp_path, {"train_batch_size": 96}), at(16, 2)) == []
    assert "not a multiple" in check_deepspeed_config(
        engine(tmp_path, {"train_batch_size": 40}), at(16, 2))[0]


def test_the_json_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = engine(tmp_path, {"zero_optimization": {"stage": 0}})
    reads: list[Path] = []
    original = Path.read_text

    def counting(self: Path, *args: object, **kwargs: object) -> str:
        reads.append(self)
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", counting)
    cfg = load_config(None, ["engine.name=deepspeed", f"engine.deepspeed_config={path}",
                             "data.batch_size=16"])
    check_engine(cfg.engine, facts(cfg, world_size=2))
    resolve_deepspeed_config(path, facts(cfg, world_size=2))
    assert [str(p) for p in reads].count(path) == 1


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    cfg = engine(tmp_path, {"train_micro_batch_size_per_gpu": 7, "fp16": {"enabled": True},
                            "zero_optimization": {"stage": 1}})
    assert len(check_deepspeed_config(cfg, at(16, 1, 2))) == 3


@pytest.mark.parametrize(("text", "needle"), [
    (None, "does not exist"), ("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_unreadable_json(tmp_path: Path, text: str | None, needle: str) -> None:
    path = tmp_path / "bad.json"
    if text is not None:
        path.write_text(text)
    problems = check_deepspeed_config(str(path), at(16, 1))
    assert len(problems) == 1 and needle in problems[0] and str(path) in problems[0]


def test_other_engines_are_not_checked() -> None:
    assert check_engine(EngineConfig(), at(16, 1)) == ([], [])


def test_missing_deepspeed_is_a_config_error_with_install_hint(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from localsgd.engines.deepspeed import DeepSpeedEngine
    from localsgd.sync.accounting import CommMeter

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    model = torch.nn.Linear(2, 2)
    cfg = EngineConfig(name="deepspeed",
                       deepspeed_config=str(REPO / "deepspeed_configs/zero0_fp32.json"))
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[deepspeed\]'") as err:
        DeepSpeedEngine(cfg, EngineContext(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                           info, CommMeter(), at(16, 1, 1)))
    assert err.value.problems[0].startswith("engine.name: deepspeed needs DeepSpeed")


@pytest.mark.parametrize(("json_ds", "precision", "message"), [
    ({"bf16": {"enabled": True}}, "fp32", "model.precision: fp32, but"),
    ({"torch_autocast": {"enabled": True}}, "fp32", "model.precision: fp32, but"),
    ({"bf16": {"enabled": False}}, "bf16", "model.precision: bf16, but"),
    ({}, "fp16", "model.precision: fp16 is not supported by the deepspeed engine"),
])
def test_json_precision_must_follow_the_recipe(tmp_path: Path, json_ds: dict, precision: str,
                                               message: str) -> None:
    facts = dataclasses.replace(at(8, 1), precision=precision)
    problems = check_deepspeed_config(engine(tmp_path, json_ds), facts)
    assert [p for p in problems if p.startswith(message)], problems


def test_bf16_precision_fills_a_json_without_a_bf16_section(tmp_path: Path) -> None:
    facts = dataclasses.replace(at(8, 1), precision="bf16")
    resolved = resolve_deepspeed_config(engine(tmp_path, {"zero_optimization": {"stage": 0}}),
                                        facts)
    assert resolved["bf16"] == {"enabled": True}
