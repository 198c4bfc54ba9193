"""The inner optimizer and the learning-rate curve the sync parts read."""

from __future__ import annotations

import torch
from torch import nn

from localsgd.config.schema import LRDecay, LRScheduleConfig, OptimConfig, OptimName
from localsgd.engines.base import momentum_tensors
from localsgd.train.optim import LRCurve, build_optimizer, build_scheduler


def test_adamw_moments_are_the_momentum_tensors_in_parameter_order() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    opt = build_optimizer(OptimConfig(name=OptimName.adamw, weight_decay=0.01), model, 0.01)
    assert isinstance(opt, torch.optim.AdamW) and momentum_tensors(opt) == []
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    params = [p for g in opt.param_groups for p in g["params"]]
    got = momentum_tensors(opt)
    assert len(got) == 2 * len(params)
    for i, p in enumerate(params):
        assert got[2 * i] is opt.state[p]["exp_avg"]
        assert got[2 * i + 1] is opt.state[p]["exp_avg_sq"]
    # Decoupled weight decay for the weights, none for BatchNorm and biases (the paper's).
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]


def test_lr_curve_is_the_trainers_learning_rate_step_by_step() -> None:
    cfg = LRScheduleConfig(warmup_epochs=1, decay=LRDecay.multistep, milestones=[2], gamma=0.1)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    sched = build_scheduler(cfg, opt, 0.1, 0.4, 5, 3)
    curve = LRCurve(cfg, 0.1, 0.4, 5, 3)
    seen = []
    for _ in range(15):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [curve(s) for s in range(15)] == seen
    assert seen[0] == 0.1 and seen[5] == 0.4 and abs(seen[10] - 0.04) < 1e-12
