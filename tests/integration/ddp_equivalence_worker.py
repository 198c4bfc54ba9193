"""torchrun worker: K workers x batch B through localsgd's DDP engine vs one process x K*B.

Rank r trains on rows r*B:(r+1)*B of each global batch; rank 0 also trains a private
single-process copy on whole global batches with plain torch and compares the parameters.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from helpers import NoTimer
from torch import nn

from localsgd.config.schema import DistConfig, ModelConfig, ModelName, OptimConfig
from localsgd.engines import EngineConfig, EngineContext, build_engine
from localsgd.launch.env import init_distributed
from localsgd.models import build_model
from localsgd.registry import Facts
from localsgd.sync.accounting import CommMeter
from localsgd.train.optim import build_optimizer


def main() -> int:
    info = init_distributed(DistConfig())
    steps, batch = int(sys.argv[1]), int(sys.argv[2])
    opt_cfg = OptimConfig(base_lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=ModelName.simplecnn), 10, 16).double()
    reference = build_model(ModelConfig(name=ModelName.simplecnn), 10, 16).double()
    reference.load_state_dict(model.state_dict())
    initial = [p.detach().clone() for p in model.parameters()]
    engine = build_engine(EngineConfig(name="ddp"), EngineContext(
        model, build_optimizer(opt_cfg, model, 0.05), info, CommMeter(),
        Facts(epochs=1, micro_batch=batch, grad_accum=1, world_size=info.world_size)))
    ref_opt = build_optimizer(opt_cfg, reference, 0.05)
    loss_fn = nn.CrossEntropyLoss()
    data = torch.Generator().manual_seed(1)
    k = info.world_size
    for _ in range(steps):
        x = torch.randn(k * batch, 3, 16, 16, generator=data, dtype=torch.float64)
        y = torch.randint(0, 10, (k * batch,), generator=data)
        mine = slice(info.rank * batch, (info.rank + 1) * batch)
        engine.forward_backward(x[mine], y[mine], loss_fn, 1.0, True, NoTimer())
        engine.optimizer_step()
        loss_fn(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    worst = max(float((a - b).abs().max())
                for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    # Not vacuous: training moved the weights away from where both copies started.
    moved = max(float((a - b).abs().max())
                for a, b in zip(model.parameters(), initial, strict=True))
    print(f"rank {info.rank}: max |ddp - single| = {worst:.3e}; moved {moved:.3e}", flush=True)
    ok = worst < 1e-10 and moved > 1e-3
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
