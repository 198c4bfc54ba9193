"""Mixed precision (model.precision) on every model and both engines.

In process (one worker, a one-process gloo group): every model of the zoo trains a few
steps in fp32, bf16 and fp16 autocast and keeps fp32 weights and BatchNorm statistics.
Under torchrun: the algorithms on both engines, with the paper's ResNet-20 (BatchNorm).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, synthetic_args, torchrun, worker_env
from helpers import assert_refused, final_model, summary

from localsgd.cli import train_main
from localsgd.config.schema import ModelName

PRECISIONS = ["fp32", "bf16", "fp16"]
BF16_JSON = "deepspeed_configs/zero0_bf16.json"
FP32_JSON = "deepspeed_configs/zero0_fp32.json"


def tiny(run_dir: Path, *extra: str) -> list[str]:
    return [str(REPO / "recipes/tests/tiny_synthetic.yaml"), f"run.dir={run_dir}",
            "data.synthetic_samples=16", "data.batch_size=4", "train.max_steps=2",
            "wandb.mode=disabled", *extra]


def check_fp32_model(run_dir: Path, weights: torch.dtype = torch.float32) -> None:
    """Finite weights of dtype ``weights`` (DeepSpeed bf16 saves its bf16 module; its fp32
    masters are what trained and averaged) and fp32 BatchNorm statistics."""
    model = torch.load(run_dir / "model.pt", weights_only=True)
    floats = {k: t for k, t in model.items() if t.is_floating_point()}
    assert floats and all(torch.isfinite(t).all() for t in floats.values())
    assert all(t.dtype == (torch.float32 if "running" in k else weights)
               for k, t in floats.items())


# The large models take seconds a step on CPU: the default suite trains the small ones, the
# slow tier every one.
QUICK = {"simplecnn", "resnet20", "densenet40_12"}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", [m.value if m.value in QUICK else
                                   pytest.param(m.value, marks=pytest.mark.slow)
                                   for m in ModelName])
def test_every_model_trains_in_every_precision(tmp_path: Path, model: str,
                                               precision: str) -> None:
    size = 32 if model == "vgg16" else 8
    assert train_main(tiny(tmp_path, f"model.name={model}", f"model.precision={precision}",
                           f"data.image_size={size}")) == 0
    check_fp32_model(tmp_path)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.precision=bf16", "model.dtype=float64"],
     "model.precision: bf16 mixed precision keeps float32 weights"),
    (["engine.name=deepspeed", f"engine.deepspeed_config={BF16_JSON}"],
     "model.precision: fp32, but"),
    (["engine.name=deepspeed", f"engine.deepspeed_config={FP32_JSON}", "model.precision=fp16"],
     "model.precision: fp16 is not supported by the deepspeed engine"),
    (["model.precision=fp8"], "model.precision: invalid value 'fp8'"),
])
def test_precisions_the_config_refuses_are_one_line_each(overrides: list[str],
                                                         message: str) -> None:
    pytest.importorskip("deepspeed")
    assert_refused(overrides, message)


def test_deepspeed_bf16_trains_the_paper_model_with_batchnorm(tmp_path: Path) -> None:
    """The shipped bf16 JSON on ResNet-20: BatchNorm computes in fp32 on fp32 statistics,
    the masters are averaged, and the final model agrees on every rank's checkpoint."""
    pytest.importorskip("deepspeed")
    torchrun(synthetic_args(tmp_path / "ds", "model.name=resnet20", "model.precision=bf16",
                            "engine.name=deepspeed", f"engine.deepspeed_config={BF16_JSON}",
                            "sync.algorithm=local", "sync.period=4", "train.max_steps=8"))
    model = final_model(tmp_path / "ds")
    stats = {k: t for k, t in model.items() if "running" in k}
    assert stats and all(t.dtype == torch.float32 and torch.isfinite(t).all()
                         for t in stats.values())
    assert summary(tmp_path / "ds")["comm/average/calls"] == 2 + 1  # + final buffers


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=pytest.mark.slow),
                                       pytest.param("fp16", marks=pytest.mark.slow)])
def test_ddp_mixed_precision_local_sgd_resumes_bitwise(tmp_path: Path, precision: str) -> None:
    """Autocast on DDP with ResNet-20 under local SGD; the fp16 gradient scaler's state is
    in the checkpoint, so a stop and resume gives the same model."""
    common = ["model.name=resnet20", f"model.precision={precision}", "sync.algorithm=local",
              "sync.period=4", "run.checkpoint_every_epochs=1", "train.epochs=2"]
    torchrun(synthetic_args(tmp_path / "full", *common))
    torchrun(synthetic_args(tmp_path / "cut", *common, "train.max_steps=16"))
    torchrun(synthetic_args(tmp_path / "cut", *common))
    a, b = final_model(tmp_path / "full"), final_model(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    check_fp32_model(tmp_path / "full")
    state = torch.load(sorted((tmp_path / "full" / "checkpoints").iterdir())[-1] / "rank0.pt",
                       weights_only=True)["engine"]
    assert bool(state["scaler"]) == (precision == "fp16")


ALGORITHMS = {"minibatch": [], "local": ["sync.algorithm=local", "sync.period=2"],
              "post_local": ["sync.algorithm=post_local", "sync.period=2", "sync.switch_step=2"],
              "hierarchical": ["sync.algorithm=hierarchical", "sync.period=2"]}
ENGINES = {"ddp": ["fp32", "bf16", "fp16"], "deepspeed": ["fp32", "bf16"]}


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_algorithm_engine_precision_matrix(tmp_path: Path, engine: str, algorithm: str,
                                           precision: str) -> None:
    if precision not in ENGINES[engine]:
        pytest.skip("refused by the config (test_precisions_the_config_refuses_are_one_line)")
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    run = tmp_path / "r"
    extra = ["model.name=resnet20", f"model.precision={precision}", "train.max_steps=4",
             *ALGORITHMS[algorithm]]
    if engine == "deepspeed":
        json_file = BF16_JSON if precision == "bf16" else FP32_JSON
        extra += ["engine.name=deepspeed", f"engine.deepspeed_config={json_file}"]
    if algorithm == "hierarchical":  # two nodes of two workers, as two agents
        import subprocess
        import sys
        port = free_port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}"]
        procs = [subprocess.Popen([*cmd, f"--node-rank={n}", str(REPO / "torchrun_entry.py"),
                                   *synthetic_args(run, *extra)], cwd=REPO, env=worker_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for n in range(2)]
        errs = [p.communicate(timeout=300)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:]
    else:
        torchrun(synthetic_args(run, *extra))
    assert summary(run)["step"] == 4
    bf16_module = engine == "deepspeed" and precision == "bf16"
    check_fp32_model(run, torch.bfloat16 if bf16_module else torch.float32)
