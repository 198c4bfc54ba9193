"""The DDP engine lists its sync tensors once (``HeldTensors``): the held lists are the
module's and the optimizer's own storage, and a checkpoint load, whose optimizer state is
new tensors, makes the next sync list them afresh. One process, no wrapper (world size 1)."""

from __future__ import annotations

import torch
from helpers import NoTimer
from torch import nn

from localsgd.config.schema import ModelConfig, ModelName, OptimConfig
from localsgd.engines import EngineConfig, EngineContext, build_engine
from localsgd.launch.env import DistInfo
from localsgd.models import build_model
from localsgd.registry import Facts
from localsgd.sync.accounting import CommMeter
from localsgd.train.optim import build_optimizer

BATCH = 4


def _engine(seed: int) -> tuple[object, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name=ModelName.simplecnn), 10, 8)
    optimizer = build_optimizer(OptimConfig(base_lr=0.05, momentum=0.9), model, 0.05)
    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    engine = build_engine(EngineConfig(name="ddp"), EngineContext(
        model, optimizer, info, CommMeter(),
        Facts(epochs=1, micro_batch=BATCH, grad_accum=1, world_size=1)))
    return engine, model, optimizer


def _step(engine: object, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(BATCH, 3, 8, 8, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    engine.forward_backward(x, y, nn.CrossEntropyLoss(), 1.0, False, NoTimer())  # type: ignore[attr-defined]
    engine.optimizer_step()  # type: ignore[attr-defined]


def _moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [optimizer.state[p]["momentum_buffer"] for g in optimizer.param_groups
            for p in g["params"]]


def test_held_lists_are_the_modules_storage() -> None:
    engine, model, _ = _engine(0)
    params, buffers = engine.sync_params(), engine.sync_buffers()  # type: ignore[attr-defined]
    assert engine.sync_params() is params and engine.sync_buffers() is buffers  # type: ignore[attr-defined]
    _step(engine, 1)
    with torch.no_grad():
        for t in params:
            t.add_(1.0)  # what an average writes
    for t, p in zip(params, model.parameters(), strict=True):
        assert t.data_ptr() == p.data_ptr() and torch.equal(t, p)
    assert [b.data_ptr() for b in buffers] == [b.data_ptr() for b in model.buffers()]


def test_momentum_is_held_after_the_first_step_and_listed_afresh_after_a_load() -> None:
    engine, _, optimizer = _engine(0)
    assert engine.momentum_buffers() == []  # type: ignore[attr-defined]
    _step(engine, 1)
    held = engine.momentum_buffers()  # type: ignore[attr-defined]
    assert engine.momentum_buffers() is held  # type: ignore[attr-defined]
    assert all(h is m for h, m in zip(held, _moments(optimizer), strict=True))
    other, _, other_opt = _engine(5)
    _step(other, 7)
    engine.load_state_dict(other.state_dict())  # type: ignore[attr-defined]
    loaded = engine.momentum_buffers()  # type: ignore[attr-defined]
    live = _moments(optimizer)
    assert len(loaded) == len(live) > 0
    assert all(a is b for a, b in zip(loaded, live, strict=True))
    for a, b in zip(loaded, _moments(other_opt), strict=True):
        assert torch.equal(a, b)
    for m in loaded:
        m.zero_()  # sync.momentum=reset writes through the held list
    assert all(not m.any() for m in _moments(optimizer))
