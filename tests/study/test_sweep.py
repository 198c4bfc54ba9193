"""The shipped W&B sweep: the command the W&B agent builds is a valid ``localsgd run``.

The agent itself needs the W&B server (not reachable here); its argument builder is W&B's
own (``create_sweep_command_args``), and the macro expansion below follows the agent's rule
(an item that is exactly ``${name}`` is replaced by that list).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from localsgd.launch.run import launch_problems, torchrun_args
from localsgd.recipe import load_config

sweeps = pytest.importorskip("wandb.sdk.launch.sweeps.utils")
SWEEPS = sorted((REPO / "recipes" / "studies").glob("*.sweep.yaml"))


def agent_command(command: list[str], values: dict[str, object]) -> list[str]:
    built = sweeps.create_sweep_command_args({"args": {k: {"value": v}
                                                        for k, v in values.items()}})
    out: list[str] = []
    for item in command:
        if item.startswith("${") and item.endswith("}"):
            out += built[item[2:-1]]
        else:
            out.append(item)
    return out


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_sweep_point_is_a_valid_run_with_its_own_directory(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = yaml.safe_load(path.read_text())
    assert spec["program"] == "localsgd" and spec["command"][:2] == ["localsgd", "run"]
    params = spec["parameters"]
    dirs = set()
    monkeypatch.chdir(REPO)
    for i, combo in enumerate(itertools.product(*(p["values"] for p in params.values()))):
        monkeypatch.setenv("WANDB_RUN_ID", f"run{i}")
        cmd = agent_command(spec["command"], dict(zip(params, combo, strict=True)))
        args = torchrun_args(cmd[2:])
        overrides = list(args.training_script_args)
        assert launch_problems(args.training_script, overrides, args.nnodes,
                               str(args.nproc_per_node)) == []
        cfg = load_config(args.training_script, overrides)
        for key, value in zip(params, combo, strict=True):
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value
        dirs.add(cfg.run.dir)
    assert len(dirs) == len(list(itertools.product(*(p["values"] for p in params.values()))))
