"""model.channels_last and train.compile, in process (one worker, a one-process gloo group).

Each trains ResNet-20 (BatchNorm, strided and 1x1 convolutions) like the default layout and
eager mode, to float rounding, and saves the plain module. A test backend that counts the
graphs it is handed shows that the step really was compiled. Under torchrun the settings
join the equivalence tests: tests/integration (local H=1 = mini-batch, bitwise resume) and
tests/engines/test_deepspeed.py (DeepSpeed = DDP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO
from helpers import assert_refused, final_model

from localsgd.cli import train_main
from localsgd.config.schema import ModelConfig, ModelName
from localsgd.models import build_model

GRAPHS: list[int] = []
"""Nodes of every graph the counting backend compiled."""


def fresh_graphs() -> None:
    """Forget earlier compilations, whose cached graphs a later run could reuse uncounted."""
    torch._dynamo.reset()
    GRAPHS.clear()


def _counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    from torch._dynamo.backends.registry import lookup_backend

    GRAPHS.append(len(gm.graph.nodes))
    return lookup_backend("aot_eager")(gm, example_inputs)


torch._dynamo.register_backend(_counting_backend, name="localsgd_test_counting")
COUNTING = ["train.compile=true", "train.compile_backend=localsgd_test_counting"]
FP32_JSON = "deepspeed_configs/zero0_fp32.json"


def train(run_dir: Path, *extra: str) -> dict[str, torch.Tensor]:
    """Three steps of ResNet-20 on 32 synthetic images; returns the saved model."""
    args = [str(REPO / "recipes/tests/tiny_synthetic.yaml"), f"run.dir={run_dir}",
            "model.name=resnet20", "data.synthetic_samples=32", "data.batch_size=8",
            "train.max_steps=3", "wandb.mode=disabled", *extra]
    assert train_main(args) == 0
    return final_model(run_dir)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= tol, worst


@pytest.fixture(scope="module")
def eager(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return train(tmp_path_factory.mktemp("eager") / "r")


def test_channels_last_trains_like_the_default_layout(tmp_path: Path,
                                                      eager: dict[str, torch.Tensor]) -> None:
    model = train(tmp_path, "model.channels_last=true")
    assert_close(model, eager, 1e-5)
    # Not vacuous: the saved weights are channels_last, the run moved them from the start.
    conv = model["layer1.0.conv1.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.manual_seed(1)  # the recipe's seed: the initial weights
    start = build_model(ModelConfig(name=ModelName.resnet20), 10).state_dict()
    assert not torch.allclose(start["layer1.0.conv1.weight"], conv, atol=1e-4)


def test_compiled_step_trains_like_eager_and_saves_the_plain_module(
        tmp_path: Path, eager: dict[str, torch.Tensor]) -> None:
    fresh_graphs()
    model = train(tmp_path, *COUNTING)
    assert GRAPHS and sum(GRAPHS) > 50  # the whole forward, not a stub
    assert not any("_orig_mod" in k or k.startswith("module.") for k in model)
    assert_close(model, eager, 1e-6)


def test_deepspeed_compiles_its_module_in_place(tmp_path: Path,
                                                eager: dict[str, torch.Tensor]) -> None:
    pytest.importorskip("deepspeed")
    fresh_graphs()
    model = train(tmp_path, "engine.name=deepspeed", f"engine.deepspeed_config={FP32_JSON}",
                  *COUNTING)
    assert GRAPHS
    assert not any("_orig_mod" in k for k in model)
    assert_close(model, eager, 1e-6)


@pytest.mark.parametrize(("overrides", "message"), [
    (["engine.name=deepspeed", f"engine.deepspeed_config={FP32_JSON}",
      "model.channels_last=true"], "model.channels_last: the deepspeed engine cannot train"),
    (["train.compile=true", "train.compile_backend=nope"],
     "train.compile_backend: torch.compile has no backend 'nope'"),
])
def test_layout_and_compile_settings_the_config_refuses(overrides: list[str],
                                                        message: str) -> None:
    assert_refused(overrides, message)
