"""Replica groups (``sync.replica_group``) on real torchrun + gloo workers: FSDP2 shards and
DDP replicas inside a group, local / post-local / outer sync across the groups."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, synthetic_args, torchrun, worker_env

from localsgd.report.files import read_metrics

WORKER = REPO / "tests/integration/sharded_equivalence_worker.py"


BASE = ("local", "post_local", "outer")
SHARD_CASES = ("overlap", "bf16_outer", "ef_sign", "chunk_topk_4bit", "ring", "choco")
"""Overlapped, compressed and gossip syncs across groups (the worker's ``CASES``)."""


def _check_worker(size: int, nproc: int, engines: str = "fsdp,ddp",
                  cases: tuple[str, ...] = BASE, nnodes: int = 1) -> None:
    args = [str(size), "8", engines, ",".join(cases)]
    port = free_port()
    # One agent per node, sharing a static rendezvous endpoint, each in a thread.
    with ThreadPoolExecutor(nnodes) as pool:
        procs = list(pool.map(lambda n: torchrun(
            args, nproc=nproc, nnodes=nnodes, node_rank=n, port=port, script=WORKER,
            timeout=600), range(nnodes)))
    stdout = "".join(p.stdout for p in procs)
    # Every rank, for each algorithm, for each engine (the worker exits 1 on a difference
    # above round-off, a model that did not move, or residuals of the wrong size). Ranks
    # share stdout, so their lines may interleave: count the reports, not lines.
    nproc *= nnodes
    reports = f"{nproc // size}x{size}: max |engine - simulation|"
    runs = sum(1 for engine in engines.split(",") for case in cases
               if not engine.startswith("zero") or case in ("local", "outer", "overlap"))
    assert stdout.count(reports) == nproc * runs, stdout[-2000:]


def test_two_groups_of_two_shards_equal_the_simulated_algorithm() -> None:
    """K = 4 ranks as 2 groups x 2 shards (fsdp) and 2 groups x 2 replicas (ddp) both equal a
    float64 simulation of 2 workers, each stepping on its group's union batch: local,
    post-local, outer, an overlapped average of shards, and chunked top-k with 4-bit values
    and error feedback, which compresses each rank's shards (the simulation compresses each
    dim-0 shard of a tensor on its own, which differs from whole tensors) and keeps
    residuals for those only (half the ddp rank's bytes); ring gossip between the groups,
    each rank's neighbour the rank holding its shard in the other group."""
    _check_worker(2, 4, cases=(*BASE, "overlap", "chunk_topk_4bit", "ring"))


@pytest.mark.slow
def test_codecs_across_groups_per_shard_or_elementwise() -> None:
    """bf16 works element by element: the sharded run equals the unsharded ddp groups;
    ef_sign's scale is per shard (equal to the per-shard simulation)."""
    _check_worker(2, 4, cases=("bf16_outer", "ef_sign"))


@pytest.mark.slow
@pytest.mark.parametrize(("size", "nproc"), [(4, 8), (2, 8)])
def test_eight_ranks_as_groups_equal_the_simulated_algorithm(size: int, nproc: int) -> None:
    _check_worker(size, nproc, cases=BASE + SHARD_CASES)


@pytest.mark.slow
def test_hierarchical_and_gossip_between_groups_on_two_nodes() -> None:
    """2 nodes x 4 ranks as 4 groups of 2 shards, 2 groups per node: hierarchical SGD
    averages each shard over the node's ranks holding it, then across nodes; ring gossip
    and CHOCO mix each shard with the ranks holding it in the neighbouring groups."""
    _check_worker(2, 4, cases=("hierarchical", "ring", "choco"), nnodes=2)


@pytest.mark.slow
def test_deepspeed_zero_inside_groups_equals_the_simulated_algorithm() -> None:
    """ZeRO-1 and ZeRO-2 partitioned over each group (``deepspeed.initialize(mpu=...)``),
    local, outer and overlapped sync across groups on each rank's fp32 partitions."""
    _check_worker(2, 4, "zero1,zero2", cases=("local", "outer", "overlap"))


def _summary(run: Path) -> dict[str, object]:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_fsdp_run_equals_ddp_groups_and_saves_a_plain_model(tmp_path: Path) -> None:
    """Through the trainer (averaged evaluation, final average, model.pt) with BatchNorm
    (ResNet-20): fsdp and ddp groups give the same model and the same evaluation; model.pt
    is a plain state dict that torch alone loads; each fsdp rank sends half the parameter
    bytes of a sync (every weight has an even first dimension: the two shards are equal)."""
    common = ["model.name=resnet20", "sync.replica_group=2", "sync.algorithm=local",
              "sync.period=3", "sync.update=outer", "sync.outer.momentum=0.9",
              "sync.outer.nesterov=true", "sync.outer.lr=0.7", "model.dtype=float64",
              "train.epochs=2"]
    runs = {e: tmp_path / e for e in ("fsdp", "ddp")}
    for engine, run in runs.items():
        torchrun(synthetic_args(run, f"engine.name={engine}", *common), nproc=4)
    load = ("import sys, torch; sd = torch.load(sys.argv[1], weights_only=True); "
            "assert all(type(v) is torch.Tensor for v in sd.values()); "
            "assert 'localsgd' not in sys.modules; print(len(sd))")
    out = subprocess.run([sys.executable, "-I", "-c", load, str(runs["fsdp"] / "model.pt")],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    fsdp = torch.load(runs["fsdp"] / "model.pt", weights_only=True)
    ddp = torch.load(runs["ddp"] / "model.pt", weights_only=True)
    assert fsdp.keys() == ddp.keys() and int(out.stdout) == len(ddp) > 60
    assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in fsdp) < 1e-10
    sharded, whole = _summary(runs["fsdp"]), _summary(runs["ddp"])
    # Half the parameters; the BatchNorm statistics (688 channels x mean and variance, not
    # sharded) travel whole from every rank.
    syncs = sum(1 for r in read_metrics(runs["ddp"]) if r["event"] == "sync")
    buffers = syncs * 688 * 2 * 8
    params = int(whole["comm/average/bytes"]) - buffers
    assert int(sharded["comm/average/bytes"]) == params // 2 + buffers
    # The evaluated average holds the mean of every rank's BatchNorm statistics either way.
    assert sharded["eval/acc"] == pytest.approx(whole["eval/acc"])
    assert sharded["eval/loss"] == pytest.approx(whole["eval/loss"], rel=1e-9)
    # The consensus distance of the whole model, from the shards' (root of their sum of
    # squares over the group), equals the unsharded one at every sync.
    distances = {e: [r["sync/consensus_distance"] for r in read_metrics(run)
                     if r["event"] == "sync"] for e, run in runs.items()}
    assert len(distances["fsdp"]) >= 5
    assert distances["fsdp"] == pytest.approx(distances["ddp"], rel=1e-9)


@pytest.mark.slow
def test_compressed_fsdp_run_equals_compressed_ddp_groups(tmp_path: Path) -> None:
    """Through the trainer in float64 with an elementwise codec (bf16 pseudo-gradients):
    fsdp groups compress their shards and ddp groups whole tensors, to the same model.pt,
    each fsdp rank sending half the compressed bytes."""
    common = ["sync.replica_group=2", "sync.algorithm=local", "sync.period=3",
              "sync.compression.method=bf16", "model.dtype=float64", "train.epochs=1"]
    runs = {e: tmp_path / e for e in ("fsdp", "ddp")}
    for engine, run in runs.items():
        torchrun(synthetic_args(run, f"engine.name={engine}", *common), nproc=4)
    fsdp = torch.load(runs["fsdp"] / "model.pt", weights_only=True)
    ddp = torch.load(runs["ddp"] / "model.pt", weights_only=True)
    assert fsdp.keys() == ddp.keys()
    assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in fsdp) < 1e-10
    sharded, whole = _summary(runs["fsdp"]), _summary(runs["ddp"])
    assert 2 * int(sharded["comm/average/bytes"]) == int(whole["comm/average/bytes"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("reducer", ["gossip", "choco"])
def test_gossip_fsdp_run_equals_ddp_groups(tmp_path: Path, reducer: str) -> None:
    """Through the trainer in float64: ring gossip (and CHOCO) between groups, with the
    averaged evaluation and the final exact average over each shard's column, gives ddp
    groups' model.pt; each fsdp rank sends half the gossip bytes."""
    common = ["sync.replica_group=2", "sync.algorithm=local", "sync.period=3",
              "sync.topology=ring", f"sync.reducer={reducer}", "model.dtype=float64",
              "train.epochs=1"]
    runs = {e: tmp_path / e for e in ("fsdp", "ddp")}
    for engine, run in runs.items():
        torchrun(synthetic_args(run, f"engine.name={engine}", *common), nproc=4)
    fsdp = torch.load(runs["fsdp"] / "model.pt", weights_only=True)
    ddp = torch.load(runs["ddp"] / "model.pt", weights_only=True)
    assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in ddp) < 1e-10
    sharded, whole = _summary(runs["fsdp"]), _summary(runs["ddp"])
    assert sharded["eval/loss"] == pytest.approx(whole["eval/loss"], rel=1e-9)
    assert 2 * int(sharded["comm/gossip/bytes"]) == int(whole["comm/gossip/bytes"]) > 0


@pytest.mark.slow
def test_hierarchical_fsdp_run_on_two_nodes_equals_ddp_groups(tmp_path: Path) -> None:
    """Two torchrun agents of 4 ranks, groups of 2 (two per node): hierarchical SGD through
    the trainer gives ddp groups' model.pt; each fsdp rank sends half the averaging bytes
    (node and global averages alike)."""
    common = ["sync.replica_group=2", "sync.algorithm=hierarchical", "sync.period=2",
              "sync.block_period=2", "model.dtype=float64", "train.epochs=1"]
    runs = {e: tmp_path / e for e in ("fsdp", "ddp")}
    for engine, run in runs.items():
        port = free_port()
        args = synthetic_args(run, f"engine.name={engine}", *common)
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda n, a=args, p=port: torchrun(
                a, nproc=4, nnodes=2, node_rank=n, port=p), range(2)))
    fsdp = torch.load(runs["fsdp"] / "model.pt", weights_only=True)
    ddp = torch.load(runs["ddp"] / "model.pt", weights_only=True)
    assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in ddp) < 1e-10
    sharded, whole = _summary(runs["fsdp"]), _summary(runs["ddp"])
    assert 2 * int(sharded["comm/average/bytes"]) == int(whole["comm/average/bytes"]) > 0


@pytest.mark.slow
def test_deepspeed_zero2_run_equals_ddp_groups(tmp_path: Path) -> None:
    """Through the trainer in float32: ZeRO-2 inside groups of 2 gives ddp groups' model,
    sending half the cross-group averaging bytes (each rank its fp32 partition, padded)."""
    zero2 = tmp_path / "zero2.json"
    zero2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    common = ["sync.replica_group=2", "sync.algorithm=local", "sync.period=3",
              "sync.update=outer", "sync.outer.momentum=0.9", "sync.outer.nesterov=true",
              "sync.outer.lr=0.7", "train.epochs=2"]
    runs = {"deepspeed": [f"engine.deepspeed_config={zero2}"], "ddp": []}
    for engine, extra in runs.items():
        torchrun(synthetic_args(tmp_path / engine, f"engine.name={engine}", *common, *extra),
                 nproc=4)
    ds = torch.load(tmp_path / "deepspeed" / "model.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    assert max(float((ds[k] - ddp[k]).abs().max()) for k in ddp) < 1e-5
    sharded, whole = _summary(tmp_path / "deepspeed"), _summary(tmp_path / "ddp")
    # Half, up to the few elements DeepSpeed pads its flat partitions with for alignment.
    half = int(whole["comm/average/bytes"]) / 2
    assert half <= int(sharded["comm/average/bytes"]) <= 1.001 * half


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    [],
    # The sync of step 10 is still in flight when step 10's checkpoint is written.
    ["sync.period=5", "sync.overlap_steps=1"],
    # Error-feedback residuals of each rank's shards.
    ["sync.compression.method=ef_sign"],
], ids=["outer", "overlap_in_flight", "ef_sign"])
def test_fsdp_shards_resume_bitwise_after_a_killed_worker(tmp_path: Path,
                                                          extra: list[str]) -> None:
    """Each rank checkpoints its own shards (model, AdamW moments as DTensors, the outer
    anchor and momentum, an average of shards in flight, error-feedback residuals); a
    SIGKILL mid-period restarts from step 10 and ends bitwise on the uninterrupted run's
    model."""
    from test_fault_tolerance import FAULT, elastic

    common = ["engine.name=fsdp", "sync.replica_group=2", "sync.algorithm=local",
              "sync.period=3", "sync.update=outer", "sync.outer.momentum=0.9",
              "sync.outer.nesterov=true", "sync.outer.lr=0.7", "optim.name=adamw",
              "optim.base_lr=0.001", "model.dtype=float64", "run.checkpoint_every_steps=5",
              *extra]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    torchrun(synthetic_args(clean, *common), nproc=4)
    env = worker_env(FAULT_RANK="1", FAULT_STEP="12", FAULT_SIGNAL="KILL")
    proc = torchrun(synthetic_args(killed, *common), nproc=4, script=FAULT, env=env,
                    extra_launch=elastic(free_port()))
    assert "resumed from step 10" in proc.stdout, proc.stdout[-2000:]
    a = torch.load(clean / "model.pt", weights_only=True)
    b = torch.load(killed / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fewer_groups_of_the_same_size_merge_the_shards_like_ddp_groups(
        tmp_path: Path) -> None:
    """A checkpoint of 2 groups x 2 shards resumed as 1 group x 2: each new rank averages
    the old ranks that held its shard (model, AdamW moments, outer anchor and momentum), to
    the model ddp groups reach by merging whole replicas the same way. Another S is one line."""
    common = ["sync.replica_group=2", "sync.algorithm=local", "sync.period=3",
              "sync.update=outer", "sync.outer.momentum=0.9", "sync.outer.nesterov=true",
              "sync.outer.lr=0.7", "optim.name=adamw", "optim.base_lr=0.001",
              "model.dtype=float64", "run.checkpoint_every_epochs=1"]
    runs = {e: tmp_path / e for e in ("fsdp", "ddp")}
    for engine, run in runs.items():
        torchrun(synthetic_args(run, f"engine.name={engine}", *common, "train.epochs=1"),
                 nproc=4)
        if engine == "fsdp":
            shutil.copytree(run, tmp_path / "other_s")
        proc = torchrun(synthetic_args(run, f"engine.name={engine}", *common,
                                       "train.epochs=2"), nproc=2)
        assert "written by 4 workers, now 2" in proc.stdout, proc.stdout[-2000:]
    fsdp = torch.load(runs["fsdp"] / "model.pt", weights_only=True)
    ddp = torch.load(runs["ddp"] / "model.pt", weights_only=True)
    assert fsdp.keys() == ddp.keys()
    assert max(float((fsdp[k] - ddp[k]).abs().max()) for k in fsdp) < 1e-10
    # Merging every old rank (shards of both indices mixed) would give another model; the
    # ddp groups' merge of whole replicas cannot mix them.
    proc = torchrun(synthetic_args(tmp_path / "other_s", "engine.name=fsdp",
                                   *common[1:], "sync.replica_group=1", "train.epochs=2"),
                    nproc=2, check=False, timeout=180)
    assert proc.returncode != 0
    assert proc.stderr.count("localsgd: error") == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "- sync.replica_group:" in line]
    assert len(lines) == 1 and "sync.replica_group: the checkpoint holds fsdp shards of " \
        "groups of 2 ranks, this launch makes groups of 1" in lines[0], proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
