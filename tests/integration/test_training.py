"""End-to-end training runs: real torchrun workers, real CIFAR-10, the run directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO, synthetic_args, torchrun
from helpers import final_model, summary

from localsgd.report.files import read_metrics


def test_ddp_two_workers_equal_one_process_with_double_batch() -> None:
    proc = torchrun(["12", "8"], script=REPO / "tests/integration/ddp_equivalence_worker.py")
    assert proc.stdout.count("max |ddp - single|") == 2


def test_cifar10_two_workers_learn_and_agree(tmp_path: Path, cifar_root: Path) -> None:
    run = tmp_path / "cifar"
    proc = torchrun(["recipes/quickstart.yaml", f"run.dir={run}", f"data.root={cifar_root}",
                     "sync.algorithm=minibatch", "sync.period=1", "sync.switch_epoch=null",
                     "data.train_subset=4096",
                     "data.test_subset=1000", "data.num_workers=0", "train.epochs=3",
                     "lr_schedule.warmup_epochs=0", "lr_schedule.milestones=[]",
                     "optim.base_lr=0.05", "train.track_time=true",
                     "train.progress=false"], timeout=600)
    assert (run / "config.yaml").is_file() and (run / "model.pt").is_file()
    epochs = [r for r in read_metrics(run) if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"] - 0.1
    result = summary(run)
    assert result["eval/acc"] > 0.25  # chance is 0.10
    assert result["eval/best_acc"] >= result["eval/acc"]
    # Mini-batch SGD averages only once: BatchNorm statistics, at the end (one bucket).
    assert result["comm/grad/calls"] > 0 and result["comm/average/calls"] == 1
    for key in ("time/data", "time/forward", "time/backward", "time/comm_opt"):
        assert epochs[-1][key] > 0
    # Every rank's final checkpoint holds the same parameters (mini-batch SGD).
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    w = [torch.load(ckpt / f"rank{r}.pt", weights_only=True)["engine"]["model"]
         for r in range(2)]
    params = [k for k in w[0] if "running" not in k and "num_batches" not in k]
    assert params and all(torch.equal(w[0][k], w[1][k]) for k in params)
    assert "resolved recipe:" in proc.stdout and "communication:" in proc.stdout


def cut_and_resumed(tmp_path: Path, common: list[str],
                    inspect: Callable[[Path], None] | None = None,
                    nproc: int = 2) -> tuple[dict, dict]:
    """Train to step 40 in one go, and again stopping at step 16 then resuming to 40; the
    final models must be bitwise equal. Returns both summaries."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(synthetic_args(full, *common, "train.max_steps=40"), nproc=nproc)
    torchrun(synthetic_args(cut, *common, "train.max_steps=16"), nproc=nproc)
    if inspect is not None:
        inspect(cut)
    proc = torchrun(synthetic_args(cut, *common, "train.max_steps=40"), nproc=nproc)
    assert "resumed from step 16" in proc.stdout
    a, b = final_model(full), final_model(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    return summary(full), summary(cut)


@pytest.mark.slow
def test_resume_between_syncs_is_bitwise_exact(tmp_path: Path) -> None:
    common = ["sync.algorithm=local", "sync.period=5", "run.checkpoint_every_epochs=1",
              "train.epochs=3"]
    # The interrupted run stops after epoch 1 (step 16, between two syncs), then resumes.
    sa, sb = cut_and_resumed(tmp_path, common)
    assert sa["comm/average/calls"] == sb["comm/average/calls"]
    assert sa["step"] == sb["step"] == 40


@pytest.mark.parametrize(("algorithm", "ignored"), [
    ("minibatch", ["sync.period", "sync.switch_epoch"]),
    pytest.param("local", ["sync.switch_epoch"], marks=pytest.mark.slow)])
def test_paper_recipe_overridden_to_another_algorithm_runs(
        tmp_path: Path, cifar_root: Path, algorithm: str, ignored: list[str]) -> None:
    """Overrides compose: keys the new algorithm does not read are one warning each."""
    run = tmp_path / algorithm
    proc = torchrun(["recipes/cifar10/resnet20_post_local_h16.yaml",
                     f"sync.algorithm={algorithm}", f"run.dir={run}", f"data.root={cifar_root}",
                     "data.train_subset=512", "data.test_subset=256", "data.num_workers=0",
                     "train.max_steps=2", "train.progress=false"], timeout=300)
    warned = [line.split(":")[2].strip() for line in proc.stderr.splitlines()
              if line.startswith("localsgd: warning")]
    assert warned == ignored, proc.stderr[-2000:]
    result = summary(run)
    assert result["step"] == 2 and result["sync/algorithm"] == algorithm
    assert (result["comm/grad/calls"] > 0) == (algorithm == "minibatch")


@pytest.mark.parametrize("extra", [[], pytest.param(
    ["model.channels_last=true", "train.compile=true", "train.compile_backend=aot_eager"],
    marks=pytest.mark.slow)], ids=["default", "channels_last-compile"])
def test_overlapped_resume_with_an_average_in_flight_is_bitwise_exact(
        tmp_path: Path, extra: list[str]) -> None:
    """Real gloo async all-reduces behind local steps; the checkpoint at the end of epoch 1
    (step 16) holds the average started at step 16 (due at 19), which the resumed run
    applies at 19. With channels_last the snapshot in flight is in memory order, and a
    compiled step resumes from the plain module's state_dict."""
    common = ["sync.algorithm=local", "sync.period=4", "sync.overlap_steps=3",
              "run.checkpoint_every_epochs=1", "train.epochs=3", "model.dtype=float64",
              *extra]
    def in_flight(cut: Path) -> None:
        state = torch.load(cut / "checkpoints" / "step-00000016" / "rank0.pt",
                           weights_only=True)
        pending = state["sync"]["parts"]["runner"]["pending"]
        assert [p[:3] for p in pending] == [[16, 19, "global"]]

    sa, sb = cut_and_resumed(tmp_path, common, in_flight)
    assert sa["comm/average/calls"] == sb["comm/average/calls"] == 10 + 1  # + final average
    assert 0 <= sa["comm/average/wait_s"] <= sa["comm/average/seconds"]


@pytest.mark.slow
def test_diloco_with_qsr_resumes_bitwise_and_logs_its_periods(tmp_path: Path) -> None:
    """Inner AdamW, outer Nesterov (DiLoCo), QSR periods under a cosine LR, momentum (Adam's
    moments) averaged: the anchor, outer momentum and period ends live in the checkpoint."""
    common = ["optim.name=adamw", "optim.base_lr=0.002", "lr_schedule.decay=cosine",
              "sync.algorithm=local", "sync.period=2", "sync.period_rule=qsr",
              "sync.qsr_alpha=0.004", "sync.update=outer", "sync.outer.lr=0.7",
              "sync.outer.momentum=0.9", "sync.outer.nesterov=true",
              "sync.outer.scale_by_inner_lr=false", "sync.momentum=average",
              "run.checkpoint_every_epochs=1", "train.epochs=3"]

    def outer_state(cut: Path) -> None:
        state = torch.load(cut / "checkpoints" / "step-00000016" / "rank0.pt",
                           weights_only=True)["sync"]["parts"]
        assert len(state["update"]["anchor"]) == len(state["update"]["velocity"]) > 0
        assert state["period_rule"]["ends"][:3] == [0, 4, 8]

    sa, sb = cut_and_resumed(tmp_path, common, outer_state)
    assert sa["comm/average/calls"] == sb["comm/average/calls"]
    syncs = [r for r in read_metrics(tmp_path / "full") if r.get("event") == "sync"]
    periods = [r["sync/period"] for r in syncs if r["sync/action"] == "global"]
    assert periods[0] == 4 and periods == sorted(periods) and periods[-1] > 4


def test_ring_gossip_sends_to_two_neighbours_ends_in_consensus_and_resumes_bitwise(
        tmp_path: Path) -> None:
    common = ["sync.algorithm=post_local", "sync.switch_step=6", "sync.period=2",
              "sync.topology=ring", "sync.consensus_every=3", "run.checkpoint_every_epochs=1",
              "train.epochs=5"]  # 8 steps per epoch: the cut at step 16 ends epoch 2
    sa, sb = cut_and_resumed(tmp_path, common, nproc=4)
    syncs = [r for r in read_metrics(tmp_path / "full")
             if r.get("event") == "sync" and r["sync/action"] == "global"]
    assert [r["step"] for r in syncs] == list(range(8, 41, 2))
    # Each sync sends the model (parameters and floating buffers) to both ring neighbours,
    # gloo's isend/irecv; no all-reduce averages anything until the final, exact one.
    model = final_model(tmp_path / "full")
    model_bytes = sum(t.numel() * t.element_size() for t in model.values()
                      if t.is_floating_point())
    assert sa["comm/gossip/bytes"] == len(syncs) * 2 * model_bytes
    assert sa["comm/gossip/calls"] == len(syncs)
    assert sa["comm/average/calls"] == 1 and sa["comm/consensus/calls"] == 6  # the final
    measured = [r for r in syncs if "sync/consensus_distance" in r]
    assert [r["step"] for r in measured] == [8, 14, 20, 26, 32, 38]
    assert all(r["sync/consensus_distance"] > 0 for r in measured)
    assert sa["comm/gossip/bytes"] == sb["comm/gossip/bytes"]
    ckpt = sorted((tmp_path / "full" / "checkpoints").iterdir(),
                  key=lambda d: int(d.name.split("-")[1]))[-1]
    ranks = [torch.load(ckpt / f"rank{r}.pt", weights_only=True)["engine"]["model"]
             for r in range(4)]
    # The last checkpoint holds each worker's own model after the last gossip step; the
    # saved final model is their exact average.
    assert not torch.equal(ranks[0]["classifier.weight"], ranks[1]["classifier.weight"])
    for k, v in model.items():
        mean = torch.stack([r[k].double() for r in ranks]).mean(dim=0)
        torch.testing.assert_close(v.double(), mean, rtol=0, atol=1e-6)


EF_SIGN = ["sync.algorithm=post_local", "sync.switch_step=20", "sync.period=4",
           "sync.compression.method=ef_sign", "train.epochs=3"]


def test_ef_sign_sends_under_a_25th_of_the_fp32_bytes(tmp_path: Path) -> None:
    """Post-local SGD with EF-sign: mini-batch gradients through the compressed DDP hook,
    then model deltas at each sync, each about 1/32 of what fp32 would send."""
    run = tmp_path / "ef_sign"
    torchrun(synthetic_args(run, *EF_SIGN, "train.max_steps=40"))
    s = summary(run)
    fp32 = sum(t.numel() * 4 for t in final_model(run).values() if t.is_floating_point())
    # Steps 1-20 all-reduce gradients, steps 24, 28, ..., 40 average models.
    assert 0 < s["comm/grad/bytes"] <= 20 * fp32 / 25
    assert 0 < s["comm/average/bytes"] <= 5 * fp32 / 25
    assert s["comm/grad/calls"] >= 20 and s["eval/acc"] is not None


@pytest.mark.slow
def test_ef_sign_resumes_bitwise_with_both_residuals(tmp_path: Path) -> None:
    """The cut at step 16 falls in the mini-batch phase: the gradient residuals (per
    parameter, whatever DDP's bucket layout) and later the delta residuals must both
    round-trip through checkpoints."""
    sa, sb = cut_and_resumed(tmp_path, [*EF_SIGN, "run.checkpoint_every_epochs=1"])
    assert sa["comm/grad/bytes"] == sb["comm/grad/bytes"]
    assert sa["comm/average/bytes"] == sb["comm/average/bytes"]
