"""Local / post-local / hierarchical SGD semantics on real torchrun + gloo workers.

The probe entry (probe_entry.py) runs the real trainer and records, per rank and step, a
hash of the parameters and the gloo collectives the PyTorch profiler saw inside the step.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, free_port, synthetic_args, torchrun

from localsgd.config import load_config
from localsgd.sync.schedule import Action, SyncSchedule

PROBE = REPO / "tests" / "integration" / "probe_entry.py"
STEPS_PER_EPOCH = 512 // 2 // 16  # tiny_synthetic: 512 samples, 2 workers, batch 16


def probe_run(run_dir: Path, *overrides: str, nproc: int = 2) -> list[dict]:
    torchrun(synthetic_args(run_dir, *overrides), nproc=nproc, script=PROBE)
    return [json.loads((run_dir / "probe" / f"rank{r}.json").read_text())
            for r in range(nproc)]


def hashes(probe: dict) -> dict[int, str]:
    return {s["step"]: s["sha"] for s in probe["steps"]}


def model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_local_sgd_h1_equals_minibatch_sgd(tmp_path: Path) -> None:
    # float64: over 24 steps float32 rounding can flip a ReLU/max-pool decision and the two
    # exact-arithmetic-equal runs visibly part; the check is about the algorithm, not rounding.
    common = ["train.max_steps=24", "train.epochs=2", "model.dtype=float64"]
    torchrun(synthetic_args(tmp_path / "mb", *common))
    torchrun(synthetic_args(tmp_path / "local", "sync.algorithm=local", "sync.period=1",
                            *common))
    a, b = model(tmp_path / "mb"), model(tmp_path / "local")
    init = torch.load(tmp_path / "mb" / "model.pt", weights_only=True)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-9, atol=1e-11), key
    # Not vacuous: local SGD without any averaging drifts measurably from mini-batch SGD.
    torchrun(synthetic_args(tmp_path / "noavg", "sync.algorithm=local", "sync.period=1000",
                            *common))
    c = model(tmp_path / "noavg")
    assert any(not torch.allclose(init[k], c[k], rtol=1e-5, atol=1e-6) for k in init)


def test_post_local_is_bitwise_minibatch_before_switch(tmp_path: Path) -> None:
    mb = probe_run(tmp_path / "mb", "train.max_steps=12")
    pl = probe_run(tmp_path / "pl", "train.max_steps=12", "sync.algorithm=post_local",
                   "sync.switch_step=8", "sync.period=2")
    for rank in range(2):
        h_mb, h_pl = hashes(mb[rank]), hashes(pl[rank])
        assert all(h_mb[s] == h_pl[s] for s in range(1, 9))
        assert all(h_mb[s] != h_pl[s] for s in range(10, 13))


def test_params_equal_right_after_sync_and_differ_between(tmp_path: Path) -> None:
    ranks = probe_run(tmp_path / "h4", "sync.algorithm=local", "sync.period=4",
                      "train.max_steps=14")
    h0, h1 = hashes(ranks[0]), hashes(ranks[1])
    assert sorted(h0) == list(range(1, 15))
    for step in h0:
        assert (h0[step] == h1[step]) == (step % 4 == 0), step


@pytest.mark.parametrize("overrides", [
    [],
    ["sync.algorithm=local", "sync.period=4"],
    ["sync.algorithm=post_local", "sync.period=3", "sync.switch_step=5"],
], ids=["minibatch", "local-h4", "post-local"])
def test_collectives_match_schedule(tmp_path: Path, overrides: list[str]) -> None:
    args = [*overrides, "train.max_steps=20", "train.epochs=2", "sync.bucket_mb=0.01"]
    ranks = probe_run(tmp_path, *args)
    cfg = load_config(REPO / "recipes/tests/tiny_synthetic.yaml", args)
    schedule = SyncSchedule.from_config(cfg.sync, STEPS_PER_EPOCH)
    param_bytes = sum(t.numel() * 4 for t in model(tmp_path).values())
    bucket_elems = int(0.01 * 2**20) // 4
    buckets = math.ceil(param_bytes / 4 / bucket_elems)
    grad_steps = [s for s in range(20) if schedule.grad_sync(s)]
    sync_steps = [s for s in range(20) if schedule.action_after(s + 1) == Action.global_]
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


def test_consensus_distance_matches_independent_computation(tmp_path: Path) -> None:
    ranks = probe_run(tmp_path, "sync.algorithm=local", "sync.period=5", "train.max_steps=15")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["sync/consensus_distance"] for r in records
              if r.get("event") == "sync" and "sync/consensus_distance" in r}
    assert sorted(logged) == [5, 10, 15]
    for i, step in enumerate(sorted(logged)):
        thetas = np.array([probe["syncs"][i]["params_before"] for probe in ranks])
        assert all(probe["syncs"][i]["step"] == step for probe in ranks)
        mean = thetas.mean(axis=0)
        expected = np.mean([np.linalg.norm(t - mean) for t in thetas])
        assert expected > 0
        assert logged[step] == pytest.approx(expected, rel=1e-6)


def test_evaluating_averaged_model_leaves_workers_untouched(tmp_path: Path) -> None:
    # Epoch end (step 16) falls between syncs (H=5): models differ when evaluation runs.
    ranks = probe_run(tmp_path, "sync.algorithm=local", "sync.period=5", "train.max_steps=16",
                      "run.checkpoint_every_epochs=1")
    h0, h1 = hashes(ranks[0]), hashes(ranks[1])
    assert h0[16] != h1[16]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if r.get("event") == "epoch"]
    assert epoch[-1]["eval/model"] == "averaged" and "eval/acc" in epoch[-1]
    # The checkpoint is written after evaluation; each rank's weights must be unchanged.
    ckpt = tmp_path / "checkpoints" / "step-00000016"
    for rank, h in ((0, h0), (1, h1)):
        state = torch.load(ckpt / f"rank{rank}.pt", weights_only=True)
        params = state["engine"]["model"]
        flat = torch.cat([params[k].reshape(-1).float() for k in params])
        import hashlib

        assert hashlib.sha256(flat.numpy().tobytes()).hexdigest() == h[16]
    # The saved final model is the consensus: the average of the two workers' weights.
    final = model(tmp_path)
    w0 = torch.load(ckpt / "rank0.pt", weights_only=True)["engine"]["model"]
    w1 = torch.load(ckpt / "rank1.pt", weights_only=True)["engine"]["model"]
    for key in final:
        assert torch.allclose(final[key], (w0[key] + w1[key]) / 2, atol=1e-7)


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


@pytest.mark.parametrize("policy", ["reset", "average", "local"])
def test_momentum_policy_at_sync(tmp_path: Path, policy: str) -> None:
    # Epoch end (step 16) is a sync step for H=4, and the checkpoint is written right after.
    torchrun(synthetic_args(tmp_path, "sync.algorithm=local", "sync.period=4",
                            f"sync.momentum={policy}", "train.max_steps=16",
                            "run.checkpoint_every_epochs=1"))
    ckpt = tmp_path / "checkpoints" / "step-00000016"
    bufs = [[s["momentum_buffer"] for s in torch.load(
        ckpt / f"rank{r}.pt", weights_only=True)["engine"]["optimizer"]["state"].values()]
        for r in range(2)]
    assert len(bufs[0]) == 6
    if policy == "reset":
        assert all(float(b.abs().max()) == 0.0 for b in bufs[0] + bufs[1])
    else:
        same = all(torch.equal(a, b) for a, b in zip(bufs[0], bufs[1], strict=True))
        assert same == (policy == "average")
        assert all(float(b.abs().max()) > 0 for b in bufs[0])
