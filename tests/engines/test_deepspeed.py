"""The DeepSpeed engine under real 2-process torchrun on CPU (DS_ACCELERATOR=cpu, gloo).

Each DeepSpeed run is compared with a DDP run of the same recipe: mini-batch training must
give the same model and gradient traffic, local SGD the same averaging traffic and no
gradient traffic at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, synthetic_args, torchrun
from helpers import TINY_STEPS_PER_EPOCH, final_model, summary

from localsgd.report.files import read_metrics
from localsgd.sync.config import SyncConfig
from localsgd.sync.controller import SyncController

pytest.importorskip("deepspeed")

FP32 = "deepspeed_configs/zero0_fp32.json"
BF16 = "deepspeed_configs/zero0_bf16.json"
QUIET = ["wandb.mode=disabled"]
MINIBATCH = ["train.max_steps=8", "lr_schedule.decay=cosine"]  # the LR moves every step
LOCAL = ["train.max_steps=8", "sync.algorithm=local", "sync.period=4"]
POST_LOCAL = ["train.max_steps=11", "train.grad_accum=2", "sync.algorithm=post_local",
              "sync.switch_step=2", "sync.period=3"]


def deepspeed(config: str | Path) -> list[str]:
    return ["engine.name=deepspeed", f"engine.deepspeed_config={config}"]


def train(run_dir: Path, *overrides: str) -> dict[str, Any]:
    torchrun(synthetic_args(run_dir, *QUIET, *overrides), timeout=240)
    return summary(run_dir)


def expected_averages(sync: SyncConfig, steps: int, steps_per_epoch: int) -> int:
    """Averages the schedule asks for in ``steps`` steps (the tiny model fits one bucket)."""
    schedule = SyncController.schedule_for(sync, steps_per_epoch)
    return sum(schedule.action_after(s) is not None for s in range(1, steps + 1))


def comm(summary: dict[str, Any], kind: str) -> tuple[int, int]:
    return summary[f"comm/{kind}/calls"], summary[f"comm/{kind}/bytes"]


@pytest.fixture(scope="module")
def ddp_minibatch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "minibatch"
    train(run, *MINIBATCH)
    return run


@pytest.fixture(scope="module")
def ddp_local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "local"
    train(run, *LOCAL)
    return run


@pytest.mark.parametrize("extra", [[], pytest.param(
    ["train.compile=true", "train.compile_backend=aot_eager"], marks=pytest.mark.slow)],
    ids=["eager", "compile"])
def test_minibatch_equals_ddp(tmp_path: Path, ddp_minibatch: Path, extra: list[str]) -> None:
    """DeepSpeed, eager or compiled (``DeepSpeedEngine.compile``), against eager DDP."""
    ds = train(tmp_path / "ds", *MINIBATCH, *deepspeed(FP32), *extra)
    ref = summary(ddp_minibatch)
    a, b = final_model(ddp_minibatch), final_model(tmp_path / "ds")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
    assert ds["step"] == ref["step"] == 8
    # DeepSpeed's own all-reduce, counted: the same gradient bytes as DDP's bucketed hook.
    assert comm(ds, "grad") == comm(ref, "grad") and ds["comm/grad/calls"] == 8
    assert comm(ds, "average") == (0, 0)
    # The trainer's LR schedule (warmup) drives DeepSpeed's wrapped optimizer.
    lrs = [[r["lr"] for r in read_metrics(d) if r["event"] == "step"]
           for d in (ddp_minibatch, tmp_path / "ds")]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) == 8


def test_zero1_minibatch_matches_ddp(tmp_path: Path, ddp_minibatch: Path) -> None:
    config = tmp_path / "zero1.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    ds = train(tmp_path / "ds", *MINIBATCH, *deepspeed(config))
    a, b = final_model(ddp_minibatch), final_model(tmp_path / "ds")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # ZeRO's gradient reduction and parameter all-gather are all counted as gradient traffic.
    ref = summary(ddp_minibatch)
    assert ds["comm/grad/calls"] > ref["comm/grad/calls"] and ds["comm/average/calls"] == 0


@pytest.mark.slow
def test_local_sgd_accounting_equals_ddp(tmp_path: Path, ddp_local: Path) -> None:
    ds = train(tmp_path / "ds", *LOCAL, *deepspeed(FP32))
    ref = summary(ddp_local)
    sync = SyncConfig(algorithm="local", period=4)
    assert comm(ds, "grad") == comm(ref, "grad") == (0, 0)
    assert ds["comm/average/calls"] == expected_averages(sync, 8, TINY_STEPS_PER_EPOCH) == 2
    assert comm(ds, "average") == comm(ref, "average")
    a, b = final_model(ddp_local), final_model(tmp_path / "ds")
    assert all(torch.allclose(a[k], b[k]) for k in a)


def test_bf16_local_sgd_averages_fp32_masters(tmp_path: Path, ddp_local: Path) -> None:
    ds = train(tmp_path / "ds", *LOCAL, "model.precision=bf16", *deepspeed(BF16))
    ref = summary(ddp_local)
    assert comm(ds, "grad") == (0, 0)
    # The masters are fp32, so averaging moves exactly what the fp32 DDP run moves.
    assert comm(ds, "average") == comm(ref, "average")
    a, b = final_model(ddp_local), final_model(tmp_path / "ds")
    assert all(b[k].dtype == torch.bfloat16 for k in b)
    assert all(torch.allclose(a[k], b[k].float(), atol=2e-2) for k in a)
    assert ds["eval/acc"] is not None


@pytest.mark.slow
def test_overlapped_averaging_on_bf16_masters(tmp_path: Path, ddp_local: Path) -> None:
    """tau=2 behind local steps on DeepSpeed: the fp32 masters travel, the counts match the
    blocking run plus the final exact average (models differ when training ends)."""
    ds = train(tmp_path / "ds", *LOCAL, "sync.overlap_steps=2", "model.precision=bf16",
               *deepspeed(BF16))
    ref = summary(ddp_local)
    assert comm(ds, "grad") == (0, 0)
    per_average = ref["comm/average/bytes"] // ref["comm/average/calls"]
    assert ds["comm/average/calls"] == ref["comm/average/calls"] + 1
    assert ds["comm/average/bytes"] == ref["comm/average/bytes"] + per_average
    assert 0 <= ds["comm/average/wait_s"] <= ds["comm/average/seconds"]
    syncs = [(r["step"], r["sync/action"]) for r in read_metrics(tmp_path / "ds")
             if r["event"] == "sync"]
    assert syncs == [(4, "global"), (8, "global"), (8, "final")]
    assert all(torch.isfinite(t.float()).all() for t in final_model(tmp_path / "ds").values())


def test_mixed_precision_worker(tmp_path: Path) -> None:
    autocast = tmp_path / "autocast.json"
    autocast.write_text(json.dumps({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}))
    proc = torchrun([BF16, str(autocast)], script=REPO / "tests/engines/deepspeed_worker.py",
                    timeout=240)
    assert proc.stdout.count("worker ok") == 2


@pytest.mark.slow
def test_post_local_grad_accum_counts_optimizer_steps(tmp_path: Path) -> None:
    ref = train(tmp_path / "ddp", *POST_LOCAL)
    ds = train(tmp_path / "ds", *POST_LOCAL, *deepspeed(FP32))
    sync = SyncConfig(algorithm="post_local", period=3, switch_step=2)
    assert ds["step"] == ref["step"] == 11
    assert ds["comm/average/calls"] == expected_averages(sync, 11, TINY_STEPS_PER_EPOCH // 2) == 3
    syncs = [r["step"] for r in read_metrics(tmp_path / "ds") if r["event"] == "sync"]
    assert syncs == [5, 8, 11]
    # Two mini-batch steps of two micro-batches each: one all-reduce per optimizer step.
    assert comm(ds, "grad") == comm(ref, "grad") and ds["comm/grad/calls"] == 2
    assert comm(ds, "average") == comm(ref, "average")
    a, b = final_model(tmp_path / "ddp"), final_model(tmp_path / "ds")
    assert all(torch.allclose(a[k], b[k]) for k in a)


def assert_config_failure(tmp_path: Path, config: Path, *extra: str,
                          needles: list[str]) -> None:
    run = tmp_path / "run"
    proc = torchrun(synthetic_args(run, *QUIET, *deepspeed(config), *extra), check=False,
                    timeout=240)
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr  # every worker exits 2 (torchrun itself says 1)
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    message = proc.stderr[proc.stderr.index("localsgd: error:"):]
    assert proc.stderr.count("localsgd: error:") == 1  # rank 0 speaks for all
    for needle in needles:
        assert needle in message, message
    assert not (run / "summary.json").exists()


def test_zero1_with_local_sgd_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "zero1.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert_config_failure(tmp_path, config, *LOCAL, needles=[
        "engine.deepspeed_config", str(config), "zero_optimization.stage=1",
        "sync.algorithm=minibatch"])


def test_contradicting_micro_batch_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "micro7.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 7}))
    assert_config_failure(tmp_path, config, "train.max_steps=2", needles=[
        "engine.deepspeed_config", str(config), "train_micro_batch_size_per_gpu=7",
        "data.batch_size=16"])


@pytest.mark.slow
def test_outer_nesterov_with_inner_adamw_equals_ddp(tmp_path: Path) -> None:
    """The DiLoCo combination on both engines: the outer step runs on DeepSpeed's masters
    and Adam's moments are averaged with the parameters."""
    diloco = [*LOCAL, "optim.name=adamw", "optim.base_lr=0.002", "sync.update=outer",
              "sync.outer.lr=0.7", "sync.outer.momentum=0.9", "sync.outer.nesterov=true",
              "sync.momentum=average"]
    ref = train(tmp_path / "ddp", *diloco)
    ds = train(tmp_path / "ds", *diloco, *deepspeed(FP32))
    assert comm(ds, "grad") == comm(ref, "grad") == (0, 0)
    assert comm(ds, "average") == comm(ref, "average")
    a, b = final_model(tmp_path / "ddp"), final_model(tmp_path / "ds")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.slow
def test_ring_gossip_equals_ddp(tmp_path: Path) -> None:
    """Gossip moves DeepSpeed's masters point to point, as DDP's parameters: the same bytes
    (one neighbour at K=2, weight 2/3) and the same model."""
    ring = [*LOCAL, "sync.topology=ring", "sync.period=2"]
    ref = train(tmp_path / "ddp", *ring)
    ds = train(tmp_path / "ds", *ring, *deepspeed(FP32))
    assert comm(ds, "grad") == comm(ref, "grad") == (0, 0)
    assert comm(ds, "gossip") == comm(ref, "gossip") and ds["comm/gossip/calls"] == 4
    a, b = final_model(tmp_path / "ddp"), final_model(tmp_path / "ds")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
