"""torchrun worker: K workers x batch B through localsgd's DDP engine vs one process x K*B.

Rank r trains on rows r*B:(r+1)*B of each global batch; rank 0 also trains a private
single-process copy on whole global batches with plain torch and compares the parameters.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from localsgd.config.schema import DistConfig, ModelConfig, ModelName, OptimConfig
from localsgd.dist.env import init_distributed
from localsgd.engines.ddp import DDPEngine
from localsgd.models import build_model
from localsgd.sync.accounting import CommMeter
from localsgd.train.optim import build_optimizer


class _NoTimer:
    def phase(self, name: str) -> nullcontext[None]:
        return nullcontext()


def main() -> int:
    info = init_distributed(DistConfig())
    steps, batch = int(sys.argv[1]), int(sys.argv[2])
    opt_cfg = OptimConfig(base_lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=ModelName.simplecnn), 10, 16).double()
    reference = build_model(ModelConfig(name=ModelName.simplecnn), 10, 16).double()
    reference.load_state_dict(model.state_dict())
    engine = DDPEngine(model, build_optimizer(opt_cfg, model, 0.05), info, CommMeter())
    ref_opt = build_optimizer(opt_cfg, reference, 0.05)
    loss_fn = nn.CrossEntropyLoss()
    data = torch.Generator().manual_seed(1)
    k = info.world_size
    for _ in range(steps):
        x = torch.randn(k * batch, 3, 16, 16, generator=data, dtype=torch.float64)
        y = torch.randint(0, 10, (k * batch,), generator=data)
        mine = slice(info.rank * batch, (info.rank + 1) * batch)
        engine.forward_backward(x[mine], y[mine], loss_fn, 1.0, True, _NoTimer())
        engine.optimizer_step()
        loss_fn(reference(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    worst = max(float((a - b).abs().max())
                for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    moved = max(float((a - b).abs().max())
                for a, b in zip(model.parameters(), build_model(
                    ModelConfig(name=ModelName.simplecnn), 10, 16).double().parameters(),
                    strict=True))
    print(f"rank {info.rank}: max |ddp - single| = {worst:.3e}; moved {moved:.3e}", flush=True)
    ok = worst < 1e-10 and moved > 1e-3
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
