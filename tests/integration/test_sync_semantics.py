"""Local / post-local / hierarchical SGD semantics on real torchrun + gloo workers.

The probe entry (probe_entry.py) runs the real trainer and records, per rank and step, a
hash of the parameters and the gloo collectives the PyTorch profiler saw inside the step.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, synthetic_args, torchrun
from helpers import TINY_STEPS_PER_EPOCH, final_model, summary

from localsgd.recipe import load_config
from localsgd.report.files import read_metrics
from localsgd.report.plots import collect_series
from localsgd.sync.controller import SyncController
from localsgd.sync.schedules.base import GLOBAL

PROBE = REPO / "tests" / "integration" / "probe_entry.py"


def probe_run(run_dir: Path, *overrides: str, nproc: int = 2) -> list[dict]:
    torchrun(synthetic_args(run_dir, *overrides), nproc=nproc, script=PROBE)
    return [json.loads((run_dir / "probe" / f"rank{r}.json").read_text())
            for r in range(nproc)]


def hashes(probe: dict) -> dict[int, str]:
    return {s["step"]: s["sha"] for s in probe["steps"]}


LAYOUT_COMPILE = ["model.channels_last=true", "train.compile=true",
                  "train.compile_backend=aot_eager"]
"""channels_last weights and batches, and a compiled step (aot_eager: no C++ toolchain)."""


@pytest.mark.parametrize("extra", [[], pytest.param(LAYOUT_COMPILE, marks=pytest.mark.slow)],
                         ids=["default", "channels_last-compile"])
def test_local_sgd_h1_equals_minibatch_sgd(tmp_path: Path, extra: list[str]) -> None:
    # float64: over 24 steps float32 rounding can flip a ReLU/max-pool decision and the two
    # exact-arithmetic-equal runs visibly part; the check is about the algorithm, not rounding.
    common = ["train.max_steps=24", "train.epochs=2", "model.dtype=float64", *extra]
    torchrun(synthetic_args(tmp_path / "mb", *common))
    torchrun(synthetic_args(tmp_path / "local", "sync.algorithm=local", "sync.period=1",
                            *common))
    a, b = final_model(tmp_path / "mb"), final_model(tmp_path / "local")
    init = torch.load(tmp_path / "mb" / "model.pt", weights_only=True)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-9, atol=1e-11), key
    if extra:
        return  # the check below is about local SGD, whatever the layout
    # Not vacuous: local SGD without any averaging drifts measurably from mini-batch SGD.
    torchrun(synthetic_args(tmp_path / "noavg", "sync.algorithm=local", "sync.period=1000",
                            *common))
    c = final_model(tmp_path / "noavg")
    assert any(not torch.allclose(init[k], c[k], rtol=1e-5, atol=1e-6) for k in init)


def test_post_local_is_bitwise_minibatch_before_switch(tmp_path: Path) -> None:
    mb = probe_run(tmp_path / "mb", "train.max_steps=12")
    pl = probe_run(tmp_path / "pl", "train.max_steps=12", "sync.algorithm=post_local",
                   "sync.switch_step=8", "sync.period=2")
    for rank in range(2):
        h_mb, h_pl = hashes(mb[rank]), hashes(pl[rank])
        assert all(h_mb[s] == h_pl[s] for s in range(1, 9))
        assert all(h_mb[s] != h_pl[s] for s in range(10, 13))


# One real launch covers gradient steps, DDP's bucket agreement and averages; every other
# combination is counted in process (tests/sync) and by the reference runs.
@pytest.mark.parametrize("overrides", [
    ["sync.algorithm=post_local", "sync.period=3", "sync.switch_step=5"],
], ids=["post-local"])
def test_collectives_match_schedule(tmp_path: Path, overrides: list[str]) -> None:
    args = [*overrides, "train.max_steps=20", "train.epochs=2", "sync.bucket_mb=0.01"]
    ranks = probe_run(tmp_path, *args)
    cfg = load_config(REPO / "recipes/tests/tiny_synthetic.yaml", args)
    schedule = SyncController.schedule_for(cfg.sync, TINY_STEPS_PER_EPOCH)
    param_bytes = sum(t.numel() * 4 for t in final_model(tmp_path).values())
    bucket_elems = int(0.01 * 2**20) // 4
    buckets = math.ceil(param_bytes / 4 / bucket_elems)
    grad_steps = [s for s in range(20) if schedule.grad_sync(s)]
    sync_steps = [s for s in range(20) if schedule.action_after(s + 1) == GLOBAL]
    for probe in ranks:
        seen = {int(k): v for k, v in probe["collectives"].items() if int(k) >= 0}
        assert sorted(seen) == list(range(20))
        for step, names in seen.items():
            # The tiny model fits one DDP gradient bucket; DDP agrees on its bucket order
            # with two broadcasts on the step after the first all-reduced one.
            expected = {}
            if step in grad_steps:
                expected["gloo:all_reduce"] = 1
            if step in sync_steps:
                expected["gloo:all_reduce"] = expected.get("gloo:all_reduce", 0) + buckets
            if grad_steps and step == grad_steps[0] + 1 and step in grad_steps:
                expected["gloo:broadcast"] = 2
            assert names == expected, (step, names, expected)
        total_seen = sum(sum(v.values()) for v in probe["collectives"].values())
        s = summary(tmp_path)
        assert s["comm/calls"] == total_seen
    s = summary(tmp_path)
    final = 0 if schedule.in_consensus(20) else 1
    assert s["comm/grad/calls"] == len(grad_steps)
    assert s["comm/grad/bytes"] == len(grad_steps) * param_bytes
    assert s["comm/average/calls"] == (len(sync_steps) + final) * buckets
    assert s["comm/average/bytes"] == (len(sync_steps) + final) * param_bytes


def test_evaluating_averaged_model_leaves_workers_untouched(tmp_path: Path) -> None:
    # Epoch end (step 16) falls between syncs (H=5): models differ when evaluation runs.
    ranks = probe_run(tmp_path, "sync.algorithm=local", "sync.period=5", "train.max_steps=16",
                      "run.checkpoint_every_epochs=1")
    h0, h1 = hashes(ranks[0]), hashes(ranks[1])
    assert h0[16] != h1[16]
    records = read_metrics(tmp_path)
    epoch = [r for r in records if r.get("event") == "epoch"]
    assert epoch[-1]["eval/model"] == "averaged" and "eval/acc" in epoch[-1]
    # The checkpoint is written after evaluation; each rank's weights must be unchanged.
    ckpt = tmp_path / "checkpoints" / "step-00000016"
    for rank, h in ((0, h0), (1, h1)):
        state = torch.load(ckpt / f"rank{rank}.pt", weights_only=True)
        params = state["engine"]["model"]
        flat = torch.cat([params[k].reshape(-1).float() for k in params])
        assert hashlib.sha256(flat.numpy().tobytes()).hexdigest() == h[16]
    # The saved final model is the consensus: the average of the two workers' weights.
    final = final_model(tmp_path)
    w0 = torch.load(ckpt / "rank0.pt", weights_only=True)["engine"]["model"]
    w1 = torch.load(ckpt / "rank1.pt", weights_only=True)["engine"]["model"]
    for key in final:
        assert torch.allclose(final[key], (w0[key] + w1[key]) / 2, atol=1e-7)
    # That final average is a sync like the others: logged with the mean consensus distance
    # of the workers (from the probe's own parameter copies) and drawn on the plot.
    final_syncs = [r for r in records
                   if r.get("event") == "sync" and r["sync/action"] == "final"]
    assert [r["step"] for r in final_syncs] == [16]
    before = [np.array(p["syncs"][-1]["params_before"]) for p in ranks]
    mean = (before[0] + before[1]) / 2
    expected = np.mean([np.linalg.norm(b - mean) for b in before])
    assert final_syncs[0]["sync/consensus_distance"] == pytest.approx(expected, rel=1e-6)
    steps, _ = collect_series([tmp_path])["consensus_vs_step"][f"{tmp_path.name} (local)"]
    assert steps == [5.0, 10.0, 15.0, 16.0]


@pytest.mark.slow
def test_hierarchical_two_nodes_two_workers(tmp_path: Path) -> None:
    """Two torchrun agents (--nnodes=2) on localhost, 2 workers each."""
    port = free_port()
    run_dir = tmp_path / "hier"
    args = synthetic_args(run_dir, "sync.algorithm=hierarchical", "sync.period=2",
                          "sync.block_period=3", "train.max_steps=13",
                          "data.synthetic_samples=1024")
    # Both agents share one static rendezvous endpoint; each runs in a thread.
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda n: torchrun(args, nnodes=2, node_rank=n, port=port,
                                                  script=PROBE), range(2)))
    assert all(p.returncode == 0 for p in procs)
    probes = [json.loads((run_dir / "probe" / f"rank{r}.json").read_text()) for r in range(4)]
    h = [hashes(p) for p in probes]
    for step in range(1, 14):
        same_node = [h[0][step] == h[1][step], h[2][step] == h[3][step]]
        across = h[0][step] == h[2][step]
        if step % 6 == 0:
            assert all(same_node) and across, step
        elif step % 2 == 0:
            assert all(same_node) and not across, step
        else:
            assert not any(same_node) and not across, step
    s = summary(run_dir)
    assert s["world_size"] == 4


