"""torchrun worker (no tests here): the DeepSpeed engine's bf16 master weights under local SGD.

Run as ``torchrun ... test_deepspeed_worker.py BF16.json AUTOCAST.json``. Every rank checks,
for the bf16 config, that local steps issue no collective at all (counted at
torch.distributed, below DeepSpeed), that a sync averages the fp32 masters exactly and
refreshes the bf16 module from them, that a mini-batch step is counted as one gradient
all-reduce of bf16 bytes, and that a checkpoint round trip restores masters and momentum;
and for the torch_autocast config, that the fp32 weights are synced and local steps are
silent too. Prints "worker ok" on success.
"""

from __future__ import annotations

import io
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

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
from localsgd.sync.config import SyncConfig
from localsgd.sync.controller import SyncController
from localsgd.train.optim import build_optimizer

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "reduce_scatter", "reduce", "barrier", "all_to_all")
MICRO, ACCUM = 4, 2


def count_torch_collectives() -> Counter[str]:
    """Wrap torch.distributed's collectives; DeepSpeed calls them by attribute at call time."""
    calls: Counter[str] = Counter()

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))
    return calls


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def step(engine: Any, rank: int, gen: torch.Generator, grad_sync: bool) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for micro in range(ACCUM):
        # Different data on every rank, so the local models drift apart.
        x = torch.randn(MICRO, 3, 16, 16, generator=gen) + rank
        y = torch.randint(0, 10, (MICRO,), generator=gen)
        engine.forward_backward(x, y, loss_fn, 1.0 / ACCUM, grad_sync and micro == ACCUM - 1,
                                NoTimer())
    engine.optimizer_step()


def build(config: str, info: Any) -> tuple[Any, nn.Module, CommMeter]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=ModelName.simplecnn), 10, 16)
    optimizer = build_optimizer(OptimConfig(base_lr=0.05), model, 0.05)
    meter = CommMeter()
    engine = build_engine(EngineConfig(name="deepspeed", deepspeed_config=config),
                          EngineContext(model, optimizer, info, meter, Facts(
                              epochs=1, micro_batch=MICRO, grad_accum=ACCUM, local_steps=True,
                              world_size=info.world_size, precision="bf16")))
    return engine, model, meter


def local_steps_then_sync(engine: Any, info: Any, sync: SyncConfig, meter: CommMeter,
                          calls: Counter[str], gen: torch.Generator) -> None:
    """Three local steps without any collective, then one average of the sync tensors."""
    calls.clear()
    before = meter.flat()
    for _ in range(3):
        step(engine, info.rank, gen, grad_sync=False)
    assert sum(calls.values()) == 0, calls
    assert meter.flat() == before
    local = [m.clone() for m in engine.sync_params()]
    expected = [torch.stack(gather(m)).mean(0) for m in local]
    assert any(not torch.equal(a, b) for a, b in zip(local, expected, strict=True))
    controller = SyncController.build(sync, info, meter, steps_per_epoch=100)
    controller.after_step(engine)
    assert meter.totals["average"].calls == 1
    for m, e in zip(engine.sync_params(), expected, strict=True):
        torch.testing.assert_close(m, e, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(o, m) for o in gather(m))  # identical on every rank


def check_bf16(config: str, info: Any, calls: Counter[str]) -> None:
    sync = SyncConfig(algorithm="local", period=1, momentum="average")
    engine, model, meter = build(config, info)
    optimizer = engine.optimizer
    params = list(model.parameters())
    masters = engine.sync_params()
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(m.dtype == torch.float32 for m in masters)
    # The recipe's SGD updates the masters: they are what its param groups hold.
    held = {p.data_ptr() for g in optimizer.param_groups for p in g["params"]}
    assert all(m.data_ptr() in held for m in masters)
    assert not any(p.data_ptr() in held for p in params)

    gen = torch.Generator().manual_seed(100 + info.rank)
    local_steps_then_sync(engine, info, sync, meter, calls, gen)
    assert len(engine.momentum_buffers()) == len(params)
    for p, m in zip(params, engine.sync_params(), strict=True):
        assert torch.equal(p, m.to(torch.bfloat16))  # module refreshed from the masters

    # A mini-batch step: one counted all-reduce of the bf16 gradients, nothing else.
    calls.clear()
    grad = meter.totals["grad"]
    step(engine, info.rank, gen, grad_sync=True)
    assert dict(calls) == {"all_reduce": 1}, calls
    assert (grad.calls, grad.bytes) == (1, sum(p.numel() * 2 for p in params))
    assert all(torch.equal(o, engine.sync_params()[0]) for o in gather(engine.sync_params()[0]))

    # Checkpoint round trip (as the Checkpointer loads it) restores masters and momentum.
    buf = io.BytesIO()
    torch.save(engine.state_dict(), buf)
    saved = [m.clone() for m in engine.sync_params()]
    saved_momentum = [b.clone() for b in engine.momentum_buffers()]
    step(engine, info.rank, gen, grad_sync=False)
    assert not torch.equal(saved[0], engine.sync_params()[0])
    buf.seek(0)
    engine.load_state_dict(torch.load(buf, weights_only=True))
    for m, s, p in zip(engine.sync_params(), saved, params, strict=True):
        assert torch.equal(m, s) and torch.equal(p, s.to(torch.bfloat16))
    for b, s in zip(engine.momentum_buffers(), saved_momentum, strict=True):
        assert torch.equal(b, s)


def check_autocast(config: str, info: Any, calls: Counter[str]) -> None:
    sync = SyncConfig(algorithm="local", period=1)
    engine, model, meter = build(config, info)
    # fp32 weights are their own masters; the forward pass runs in bf16.
    params = list(model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert [m.data_ptr() for m in engine.sync_params()] == [p.data_ptr() for p in params]
    x = torch.randn(MICRO, 3, 16, 16)
    with torch.no_grad():
        out, ref = engine.ds(x), model(x)
    assert out.dtype == torch.float32 and not torch.equal(out, ref)
    gen = torch.Generator().manual_seed(200 + info.rank)
    local_steps_then_sync(engine, info, sync, meter, calls, gen)


def main() -> int:
    info = init_distributed(DistConfig())
    calls = count_torch_collectives()
    check_bf16(sys.argv[1], info, calls)
    check_autocast(sys.argv[2], info, calls)
    print(f"rank {info.rank}: worker ok", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
