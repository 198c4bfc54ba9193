"""torchrun worker: G replica groups x S ranks, sharded (fsdp) and unsharded (ddp), against
a single-process simulation of G workers each stepping on its group's whole mini-batch.

``sharded_equivalence_worker.py S STEPS [ENGINES]``. For each algorithm (local, post-local,
outer DiLoCo-style) every rank trains through localsgd's engines and SyncController, with
``sync.replica_group=S``, once per engine of the comma-separated ENGINES (default
``fsdp,ddp``; ``zero1`` and ``zero2`` are DeepSpeed with that ZeRO stage, which runs local
and outer only).
Rank r reads rows r*B:(r+1)*B of each global batch, so group g's mini-batch is the union of
rows of its S ranks. Independently, every rank simulates the algorithm with plain torch: G
models, group g's gradient is that of the mean loss over its union batch, syncs average
the G models (and for outer, an outer Nesterov SGD on the averaged pseudo-gradient). The
gathered models must match the simulation in float64 to round-off (DeepSpeed's float32
masters: to float32 round-off).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import NoTimer
from torch import nn

from localsgd.config.schema import DistConfig, ModelConfig, ModelName
from localsgd.engines import EngineContext, build_engine
from localsgd.launch.env import init_distributed
from localsgd.launch.replicas import build_replicas
from localsgd.models import build_model
from localsgd.recipe import facts, load_config
from localsgd.sync.accounting import CommMeter
from localsgd.sync.controller import SyncController
from localsgd.train.optim import build_optimizer

BATCH = 4
LR = 0.05
CASES: dict[str, list[str]] = {
    "local": ["sync.algorithm=local", "sync.period=2"],
    "post_local": ["sync.algorithm=post_local", "sync.switch_step=3", "sync.period=2"],
    "outer": ["sync.algorithm=local", "sync.period=3", "sync.update=outer",
              "sync.outer.lr=0.7", "sync.outer.momentum=0.9", "sync.outer.nesterov=true",
              "sync.outer.scale_by_inner_lr=false"],
}
OPTIM = ["optim.base_lr=0.05", "optim.momentum=0.9", "optim.nesterov=true",
         "optim.weight_decay=0.0005", "optim.no_decay_bn_bias=false"]


def new_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=ModelName.simplecnn), 10, 8).double()


def batches(steps: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = torch.Generator().manual_seed(1)
    return [(torch.randn(world * BATCH, 3, 8, 8, generator=data, dtype=torch.float64),
             torch.randint(0, 10, (world * BATCH,), generator=data)) for _ in range(steps)]


def engine_keys(engine: str) -> list[str]:
    """Overrides choosing ``engine`` (``zeroN``: DeepSpeed with ZeRO stage N)."""
    if not engine.startswith("zero"):
        return [f"engine.name={engine}"]
    path = Path(tempfile.gettempdir()) / f"sharded_equivalence_{engine}_{os.getpid()}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": int(engine[4:])}}))
    return ["engine.name=deepspeed", f"engine.deepspeed_config={path}"]


def trained(engine_name: str, overrides: list[str], size: int, steps: int, info: Any,
            replicas: Any) -> dict[str, torch.Tensor]:
    """The consensus model after ``steps`` steps through localsgd's engine and sync."""
    cfg = load_config(None, [*overrides, *OPTIM, *engine_keys(engine_name),
                             f"sync.replica_group={size}", f"data.batch_size={BATCH}"])
    model = new_model()
    known = facts(cfg, info.world_size, info.local_world_size)
    engine = build_engine(cfg.engine, EngineContext(
        model, build_optimizer(cfg.optim, model, LR), info, CommMeter(), known, None,
        replicas))
    ctl = SyncController.build(cfg.sync, replicas.sync_info(), CommMeter(), steps)
    ctl.begin(engine)
    loss_fn = nn.CrossEntropyLoss()
    mine = slice(info.rank * BATCH, (info.rank + 1) * BATCH)
    for x, y in batches(steps, info.world_size):
        engine.forward_backward(x[mine], y[mine], loss_fn, 1.0, ctl.grad_sync(), NoTimer())
        engine.optimizer_step()
        ctl.after_step(engine)
    ctl.finish(engine)
    full = getattr(engine, "full_state_dict", None)
    state = full() if full is not None else None
    return state if state is not None else model.state_dict()


def simulated(overrides: list[str], size: int, steps: int, world: int) -> list[torch.Tensor]:
    """Plain torch: G models, each stepping on its group's union batch; syncs average them."""
    cfg = load_config(None, [*overrides, *OPTIM])
    groups = world // size
    models = [new_model() for _ in range(groups)]
    opts = [build_optimizer(cfg.optim, m, LR) for m in models]
    anchor = [p.detach().clone() for p in models[0].parameters()]
    velocity = [torch.zeros_like(a) for a in anchor]
    switch = cfg.sync.switch_step if cfg.sync.algorithm == "post_local" else 0
    loss_fn = nn.CrossEntropyLoss()
    for t, (x, y) in enumerate(batches(steps, world), start=1):
        grads = []
        for g, m in enumerate(models):
            rows = slice(g * size * BATCH, (g + 1) * size * BATCH)
            m.zero_grad()
            loss_fn(m(x[rows]), y[rows]).backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        if t <= switch:  # mini-batch phase: every group takes the mean gradient
            for m in models:
                for i, p in enumerate(m.parameters()):
                    p.grad.copy_(torch.stack([gr[i] for gr in grads]).mean(0))
        for o in opts:
            o.step()
        if t > switch and ((t - switch) % cfg.sync.period == 0 or t == steps):
            average(models, cfg, anchor, velocity)
        elif t == switch:
            for a, p in zip(anchor, models[0].parameters(), strict=True):
                a.copy_(p.detach())
    return [p.detach() for p in models[0].parameters()]


def average(models: list[nn.Module], cfg: Any, anchor: list[torch.Tensor],
            velocity: list[torch.Tensor]) -> None:
    outer = cfg.sync.update == "outer"
    with torch.no_grad():
        for i, params in enumerate(zip(*(m.parameters() for m in models), strict=True)):
            mean = torch.stack([p.detach() for p in params]).mean(0)
            if outer:
                o = cfg.sync.outer
                delta = anchor[i] - mean
                velocity[i].mul_(o.momentum).add_(delta)
                anchor[i].sub_(delta + o.momentum * velocity[i], alpha=o.lr)
                mean = anchor[i]
            for p in params:
                p.copy_(mean)


def main() -> int:
    info = init_distributed(DistConfig())
    size, steps = int(sys.argv[1]), int(sys.argv[2])
    engines = (sys.argv[3] if len(sys.argv) > 3 else "fsdp,ddp").split(",")
    replicas = build_replicas(str(size), info, mesh_needed=True)
    ok = True
    for name, overrides in CASES.items():
        reference = simulated(overrides, size, steps, info.world_size)
        initial = list(new_model().parameters())
        for engine in engines:
            if engine.startswith("zero") and name == "post_local":
                continue  # mini-batch steps across groups: not built for DeepSpeed
            got = list(trained(engine, overrides, size, steps, info, replicas).values())
            worst = max(float((a - b).abs().max())
                        for a, b in zip(got, reference, strict=True))
            moved = max(float((a.detach() - b.detach()).abs().max())
                        for a, b in zip(got, initial, strict=True))
            print(f"rank {info.rank} {name} {engine} {info.world_size // size}x{size}: "
                  f"max |engine - simulation| = {worst:.3e}; moved {moved:.3e}", flush=True)
            # DeepSpeed's ZeRO keeps float32 masters even of a float64 model: float32
            # round-off over the steps (about 1e-7 here), far below any algorithmic error.
            tolerance = 1e-6 if engine.startswith("zero") else 1e-10
            ok &= worst < tolerance and moved > 1e-3
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
