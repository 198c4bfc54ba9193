"""Per-rank bytes of a replica group's state: parameters, gradients, optimizer state and sync
state, and the bytes one cross-group sync sends, for ``sync.replica_group`` S in {1, 2, 4}.

    python benchmarks/bench_sharded_memory.py [--nproc 8] [--hidden 1024] [--compression M]

runs one torchrun job of ``--nproc`` ranks (gloo, CPU). For each layout (ddp with S = 1,
fsdp with S = 1, 2 and 4, while at least two groups remain) every rank trains an MLP with
AdamW for 4 steps of local SGD (period 2) with a DiLoCo-style outer step (anchor + outer
momentum), then reports rank 0's bytes, counted from the tensors it holds (each rank's
local shards, ``to_local()``), not from the process's resident size. Writes
``benchmarks/results/sharded_memory.json``. With ``--compression`` (e.g. ``ef_sign``) the
syncs compress each rank's shards with error feedback, and the residuals it keeps are
counted too (``sharded_memory_<method>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from launching import torchrun_json, write_result
from torch import nn

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = (("ddp", 1), ("fsdp", 1), ("fsdp", 2), ("fsdp", 4))
"""(engine, S); those with S > world / 2 (a single group, nothing to sync) are skipped."""


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Timer:
    def phase(self, name: str) -> Any:
        from contextlib import nullcontext

        return nullcontext()


def measure(engine_name: str, size: int, hidden: int, info: Any,
            compression: str = "none") -> dict[str, Any]:
    from localsgd.engines import EngineContext, build_engine
    from localsgd.launch.replicas import build_replicas
    from localsgd.recipe import facts, load_config
    from localsgd.sync.accounting import CommMeter
    from localsgd.sync.controller import SyncController
    from localsgd.sync.sharding import engine_shards, local
    from localsgd.train.optim import build_optimizer

    cfg = load_config(None, [f"engine.name={engine_name}", f"sync.replica_group={size}",
                             "sync.algorithm=local", "sync.period=2", "sync.update=outer",
                             "sync.outer.momentum=0.9", "sync.outer.nesterov=true",
                             "sync.bucket_mb=1", "optim.name=adamw", "optim.base_lr=0.001",
                             "data.batch_size=8", f"sync.compression.method={compression}"])
    known = facts(cfg, info.world_size, info.local_world_size)
    replicas = build_replicas(str(size), info, engine_shards(known))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                          nn.ReLU(), nn.Linear(hidden, 16))
    meter = CommMeter()
    engine = build_engine(cfg.engine, EngineContext(
        model, build_optimizer(cfg.optim, model, 0.001), info, meter, known, None, replicas))
    ctl = SyncController.build(cfg.sync, replicas.sync_info(), meter, 4)
    ctl.begin(engine)
    gen = torch.Generator().manual_seed(1 + info.rank)
    grads = 0
    for _ in range(4):
        x, y = torch.randn(8, 512, generator=gen), torch.randint(0, 16, (8,), generator=gen)
        engine.forward_backward(x, y, nn.CrossEntropyLoss(), 1.0, ctl.grad_sync(), _Timer())
        with torch.no_grad():
            grads = max(grads, _nbytes([local(p.grad) for p in engine.module.parameters()
                                        if p.grad is not None]))
        engine.optimizer_step()
        ctl.after_step(engine)
    extra = ctl.extra_memory()
    syncs = sum(1 for e in ctl.events if e.action == "global")
    full = sum(p.numel() * p.element_size() for p in engine.module.parameters())
    return {"engine": engine_name, "replica_group": size, "groups": replicas.groups,
            "model_bytes": full,
            "params_bytes": _nbytes(engine.sync_params()), "grads_bytes": grads,
            "optimizer_bytes": _nbytes(engine.momentum_buffers()),
            "anchor_bytes": extra["anchor"], "outer_momentum_bytes": extra["update"],
            "bucket_bytes": extra["buckets"], "residual_bytes": extra["reducer"],
            "sync_bytes_per_global_sync": meter.totals["average"].bytes // max(syncs, 1)}


def worker(hidden: int, compression: str) -> None:
    from localsgd.config.schema import DistConfig
    from localsgd.launch.env import init_distributed

    info = init_distributed(DistConfig())
    rows = [measure(engine, size, hidden, info, compression) for engine, size in LAYOUTS
            if 2 * size <= info.world_size]
    if info.rank == 0:
        print(json.dumps(rows), flush=True)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--compression", default="none",
                    help="sync.compression.method of the syncs (e.g. ef_sign)")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/sharded_memory[_METHOD].json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.hidden, args.compression)
        return 0
    suffix = "" if args.compression == "none" else f"_{args.compression}"
    out = args.out or str(REPO / f"benchmarks/results/sharded_memory{suffix}.json")
    rows = torchrun_json(__file__, args.nproc, ["--worker", "--hidden", str(args.hidden),
                                                "--compression", args.compression], {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                    os.environ.get("PYTHONPATH")]))})
    keys = ["params_bytes", "grads_bytes", "optimizer_bytes", "anchor_bytes",
            "outer_momentum_bytes", "sync_bytes_per_global_sync"]
    if args.compression != "none":
        keys.insert(-1, "residual_bytes")
    print(f"{'layout':<10}" + "".join(f"{k.removesuffix('_bytes'):>28}" for k in keys))
    for r in rows:
        print(f"{r['engine']} S={r['replica_group']:<4}" + "".join(
            f"{r[k]:>28,}" for k in keys))
    write_result(out, {"nproc": args.nproc, "compression": args.compression, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
