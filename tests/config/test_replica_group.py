"""``sync.replica_group``: its domain, its launch rule and what cannot run across groups,
each one line naming the key, through ``localsgd check`` (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localsgd import cli

RECIPE = "recipes/tests/tiny_synthetic.yaml"


def _problems(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = cli.main(["check", RECIPE, *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line.removeprefix("  - ") for line in err.splitlines()
                  if line.startswith("  - ")]


def _zero1(folder: Path) -> Path:
    path = folder / "zero1.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    return path


@pytest.mark.parametrize("overrides", [
    [], ["sync.replica_group=2", "engine.name=fsdp", "sync.algorithm=local"],
    ["sync.replica_group=node", "sync.algorithm=post_local", "sync.switch_step=4",
     "sync.update=outer", "sync.outer.momentum=0.9"],
    ["sync.replica_group=2", "--nproc-per-node=4", "--nnodes=2"],
    ["engine.name=deepspeed", "engine.deepspeed_config={zero1}", "sync.algorithm=local",
     "sync.replica_group=node"],
])
def test_groups_that_run_are_valid(overrides: list[str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    zero1 = _zero1(tmp_path)
    assert _problems(capsys, *(o.format(zero1=zero1) for o in overrides)) == (0, [])


@pytest.mark.parametrize(("overrides", "starts", "says"), [
    (["sync.replica_group=3", "--nproc-per-node=4"], "sync.replica_group:",
     "3 does not divide the 4 workers per node"),
    (["sync.replica_group=half"], "sync.replica_group:", "must be node or an integer"),
    (["engine.name=fsdp", "sync.algorithm=local", "sync.compression.method=ef_sign"],
     "sync.reducer=compressed with engine.name=fsdp:", "use sync.compression.method=none"),
    (["engine.name=fsdp", "sync.algorithm=local", "sync.topology=ring"],
     "sync.topology=ring with engine.name=fsdp:", "use sync.topology=complete"),
    (["sync.replica_group=2", "sync.algorithm=local", "sync.overlap_steps=1"],
     "sync.runner=overlapped with sync.replica_group=2:", "use sync.overlap_steps=0"),
    (["sync.replica_group=node", "sync.algorithm=hierarchical"],
     "sync.algorithm=hierarchical with sync.replica_group=node:",
     "use sync.algorithm=local|minibatch|post_local"),
    (["engine.name=fsdp", "model.precision=bf16"], "model.precision:", "model.precision=fp32"),
    (["engine.name=deepspeed", "engine.deepspeed_config=deepspeed_configs/zero0_fp32.json",
      "sync.replica_group=2", "sync.algorithm=minibatch"], "sync.algorithm:",
     "use sync.algorithm=local, or engine.name=fsdp"),
    (["engine.name=deepspeed", "engine.deepspeed_config={zero1}", "sync.algorithm=local"],
     "", "shard inside replica groups with sync.replica_group=node"),
])
def test_what_cannot_run_is_one_line_naming_the_key(
        overrides: list[str], starts: str, says: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    zero1 = _zero1(tmp_path)
    code, lines = _problems(capsys, *(o.format(zero1=zero1) for o in overrides))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(starts) and says in lines[0], lines[0]
