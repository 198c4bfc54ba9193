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


def _zero(folder: Path, stage: int = 1) -> Path:
    path = folder / f"zero{stage}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return path


@pytest.mark.parametrize("overrides", [
    [], ["sync.replica_group=2", "engine.name=fsdp", "sync.algorithm=local"],
    ["sync.replica_group=node", "sync.algorithm=post_local", "sync.switch_step=4",
     "sync.update=outer", "sync.outer.momentum=0.9"],
    ["sync.replica_group=2", "--nproc-per-node=4", "--nnodes=2"],
    ["engine.name=deepspeed", "engine.deepspeed_config={zero1}", "sync.algorithm=local",
     "sync.replica_group=node"],
    # Every sync part runs across groups on each rank's own shards.
    ["engine.name=fsdp", "sync.algorithm=local", "sync.compression.method=ef_sign"],
    ["engine.name=fsdp", "sync.algorithm=local", "sync.compression.method=chunk_topk",
     "sync.compression.bits=4", "sync.compression.error_feedback=true"],
    ["engine.name=fsdp", "sync.algorithm=local", "sync.topology=ring"],
    ["sync.replica_group=2", "engine.name=fsdp", "sync.algorithm=local",
     "sync.topology=ring", "sync.reducer=choco", "--nproc-per-node=4", "--nnodes=2"],
    ["sync.replica_group=2", "sync.algorithm=local", "sync.overlap_steps=1"],
    ["sync.replica_group=2", "engine.name=fsdp", "sync.algorithm=hierarchical",
     "--nproc-per-node=4", "--nnodes=2"],
])
def test_groups_that_run_are_valid(overrides: list[str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    zero1 = _zero(tmp_path)
    assert _problems(capsys, *(o.format(zero1=zero1) for o in overrides)) == (0, [])


@pytest.mark.parametrize(("overrides", "starts", "says"), [
    (["sync.replica_group=3", "--nproc-per-node=4"], "sync.replica_group:",
     "3 does not divide the 4 workers per node"),
    (["sync.replica_group=half"], "sync.replica_group:", "must be node or an integer"),
    # A gossip graph joins the G = world / S groups: 8 ranks in groups of 2 are 4 workers,
    # no torus (it needs two sides >= 3).
    (["sync.replica_group=2", "engine.name=fsdp", "sync.algorithm=local",
      "sync.topology=torus", "--nproc-per-node=4", "--nnodes=2"], "sync.topology: torus:",
     "a product of two sides >= 3"),
    # Mini-batch gradients across groups travel exact: compressing only the deltas would
    # quietly change what the recipe asks for.
    (["engine.name=fsdp", "sync.algorithm=post_local", "sync.switch_step=4",
      "sync.compression.method=ef_sign"], "sync.compression.method=ef_sign with "
     "engine.name=fsdp:", "use sync.algorithm=local"),
    (["sync.replica_group=2", "sync.algorithm=minibatch", "sync.compression.method=sign"],
     "sync.compression.method=sign with sync.replica_group=2:", "mini-batch steps across"),
    (["engine.name=deepspeed", "engine.deepspeed_config={zero3}", "sync.algorithm=local",
      "sync.replica_group=node"], "engine.deepspeed_config:", "zero_optimization.stage=3"),
    (["engine.name=deepspeed", "engine.deepspeed_config={zero1}", "sync.algorithm=local",
      "sync.replica_group=node", "sync.compression.method=ef_sign"],
     "engine.deepspeed_config:", "use a stage-0 config"),
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
    zero1, zero3 = _zero(tmp_path), _zero(tmp_path, 3)
    code, lines = _problems(capsys, *(o.format(zero1=zero1, zero3=zero3) for o in overrides))
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(starts) and says in lines[0], lines[0]


def test_a_part_that_does_not_declare_shards_is_one_line() -> None:
    """Every registered part runs across groups today; one that does not say so (a new
    update here) is refused by name, with the parts that do."""
    from localsgd.recipe import facts, load_config
    from localsgd.sync.parts import UPDATES
    from localsgd.sync.sharding import replica_problems

    class Unsharded:
        name = "unsharded"

    cfg = load_config(None, ["sync.replica_group=2", "sync.algorithm=local"])
    lines = replica_problems(cfg.sync, facts(cfg, 4, 4), {"update": Unsharded},
                             {"update": UPDATES}, lambda c, key: "unsharded")
    # Other tests may register parts of their own: the offer lists whatever declares shards.
    able = sorted(p.name for p in UPDATES.parts() if getattr(p, "shards", False))
    assert {"copy", "outer"} <= set(able)
    assert lines == ["sync.update=unsharded with sync.replica_group=2: unsharded cannot run "
                     "across replica groups on each rank's own shard yet; use "
                     f"sync.update={'|'.join(able)}, or sync.replica_group=1"]
