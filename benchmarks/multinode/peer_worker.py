"""PyTorch's own post-local SGD as a torchrun worker: the peer of ``local-H16`` in bench_links.

    torchrun ... benchmarks/multinode/peer_worker.py RECIPE.yaml [dotted.key=value ...]

Same argv as ``torchrun_entry.py``: the recipe and overrides give the same data (synthetic
32x32, sampler, batch), model (ResNet-20, same seed), SGD (LR scaled to the global batch,
momentum, Nesterov, weight decay) and LR schedule as the trainer builds; ``sync.*`` overrides
are ignored. Only the synchronisation is PyTorch's, built as in ``benchmarks/bench_sync.py``:

* ``DistributedDataParallel(forward_sync_buffers=False)`` with DDP's default ``init_sync``
  (rank 0 broadcasts parameters and buffers once, at construction);
* ``post_localSGD_hook`` with ``PostLocalSGDState(start_localSGD_iter=0,
  post_local_gradient_allreduce=False)``: no gradient all-reduce in any step;
* ``PostLocalSGDOptimizer`` with ``PeriodicModelAverager(period=--peer-period (16),
  warmup_steps=0)``: one all-reduce of all parameters (not buffers) after the optimizer step
  whenever the averager's step counter is a multiple of the period, i.e. after steps
  1, 17, 33, 49 of 64 (PyTorch averages on its counter's 0, not after the 16th step).

The run ends like the trainer's (default ``sync.eval_model=averaged``): the workers' models,
parameters and buffers, are averaged into a copy, which scores its shard of the test set and
the totals are all-reduced. ``time/wall_s`` runs from the first step to the end of that
evaluation, as the trainer's does (set-up, DDP construction and its broadcast excluded).

``comm/bytes`` (payload per rank, as localsgd's ``CommMeter`` counts it) is the sum of
``comm/other/bytes``: DDP's initial broadcast, parameters + buffers, plus the 24-byte eval
totals; ``comm/average/bytes``: averages x parameter bytes, the averages counted with the
averager's own condition; ``comm/eval/bytes``: the averaged eval copy (parameters and
floating-point buffers, one all-reduce).
Not counted: DDP's tiny parameter-shape check at construction (also uncounted in localsgd's
runs) and rendezvous/store traffic. Rank 0 writes ``summary.json`` in ``run.dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
    PostLocalSGDState,
    post_localSGD_hook,
)
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.optim import PostLocalSGDOptimizer
from torch.nn.parallel import DistributedDataParallel

from localsgd.data import build_datasets, build_eval_loader, build_train_loader
from localsgd.engines.ddp import NO_BUFFER_SYNC
from localsgd.launch.env import init_distributed, shutdown
from localsgd.models import build_model
from localsgd.recipe import load_config
from localsgd.train.evaluate import evaluate
from localsgd.train.optim import build_optimizer, build_scheduler, scaled_lr


def nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def will_average(averager: PeriodicModelAverager) -> bool:
    """The condition ``PeriodicModelAverager.average_parameters`` tests before its step += 1."""
    s = averager.step
    return s >= averager.warmup_steps and (s - averager.warmup_steps) % averager.period == 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-period", type=int, default=16)
    args, rest = ap.parse_known_args(argv)
    if not rest:
        ap.error("RECIPE.yaml [dotted.key=value ...] required")
    warnings.filterwarnings("ignore", message=".*epoch parameter in `scheduler.step")
    cfg = load_config(rest[0], rest[1:])
    info = init_distributed(cfg.dist)
    comm = {"other": [0, 0], "average": [0, 0], "eval": [0, 0]}  # kind -> [bytes, calls]
    seconds = {"average": 0.0}

    data = build_datasets(cfg.data, cfg.seed, allow_download=False)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank, as the trainer
    dtype = getattr(torch, cfg.model.dtype.value)
    model = build_model(cfg.model, data.num_classes, data.image_size).to(info.device, dtype)
    loader, sampler = build_train_loader(data.train, cfg.data.batch_size, info.rank,
                                         info.world_size, cfg.seed, cfg.data.num_workers)
    steps_per_epoch = len(loader)
    peak_lr = scaled_lr(cfg.optim, info.world_size * cfg.data.batch_size)
    opt = build_optimizer(cfg.optim, model, peak_lr)
    scheduler = build_scheduler(cfg.lr_schedule, opt, cfg.optim.base_lr, peak_lr,
                                steps_per_epoch, cfg.train.epochs)
    eval_loader = build_eval_loader(data.test, max(256, cfg.data.batch_size), info.rank,
                                    info.world_size, shard=True,
                                    num_workers=cfg.data.num_workers)
    param_bytes = nbytes(model.parameters())
    state_bytes = param_bytes + nbytes(model.buffers())

    # bench_sync.py's build_torch_postlocal (speed set-up): CPU/gloo, so no device_ids; no
    # per-forward buffer broadcast; DDP's init_sync broadcasts rank 0's module state once.
    ddp = DistributedDataParallel(model, **NO_BUFFER_SYNC)
    if info.world_size > 1:
        comm["other"][0] += state_bytes
        comm["other"][1] += 1
    state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=0,
                              post_local_gradient_allreduce=False)
    ddp.register_comm_hook(state, post_localSGD_hook)
    averager = PeriodicModelAverager(period=args.peer_period, warmup_steps=0)
    wrapped = PostLocalSGDOptimizer(optim=opt, averager=averager)
    loss_fn = nn.CrossEntropyLoss()
    max_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs

    ddp.train()
    step, epoch = 0, 0
    marks: dict[int, float] = {}
    """Wall seconds after each 16th step (as the trainer's step records), for steady rates."""
    start = time.perf_counter()
    while step < max_steps:
        sampler.set_epoch(epoch)
        for x, y in loader:
            if step >= max_steps:
                break
            x = x.to(info.device, dtype, non_blocking=True)
            y = y.to(info.device, non_blocking=True)
            loss_fn(ddp(x), y).backward()
            averaging = will_average(averager)
            t0 = time.perf_counter()
            wrapped.step()
            if averaging:
                comm["average"][0] += param_bytes
                comm["average"][1] += 1
                seconds["average"] += time.perf_counter() - t0
            wrapped.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if step % 16 == 0:
                marks[step] = time.perf_counter() - start
        epoch += 1

    # Final evaluation, as the trainer's: average the models' floating-point state
    # (parameters, BatchNorm statistics) into a copy; integer batch counters stay rank 0's.
    eval_model = copy.deepcopy(model)
    src = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    dst = [t for t in [*eval_model.parameters(), *eval_model.buffers()] if t.is_floating_point()]
    with torch.no_grad():
        flat = torch.cat([t.detach().reshape(-1) for t in src])
        if info.world_size > 1:
            dist.all_reduce(flat)
            comm["eval"][0] += flat.numel() * flat.element_size()
            comm["eval"][1] += 1
        flat /= info.world_size
        offset = 0
        for t in dst:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    totals = evaluate(eval_model, eval_loader, info.device, dtype)
    dist.all_reduce(totals)
    comm["other"][0] += totals.numel() * totals.element_size()
    comm["other"][1] += 1
    wall = time.perf_counter() - start
    loss_sum, correct, count = totals.tolist()

    samples = step * info.world_size * cfg.data.batch_size
    summary: dict[str, Any] = {
        "eval/acc": correct / count, "eval/loss": loss_sum / count,
        "time/wall_s": wall, "throughput/samples_per_s": samples / max(wall, 1e-9),
        "time/step_marks": marks,
        "step": step, "epoch": epoch, "world_size": info.world_size,
        "sync/algorithm": f"torch-post_localSGD-H{args.peer_period}",
        "peer/averages": comm["average"][1], "peer/param_bytes": param_bytes,
        "peer/state_bytes": state_bytes, "peer/hook_iter": state.iter,
        "comm/bytes": sum(b for b, _ in comm.values()),
        "comm/calls": sum(c for _, c in comm.values()),
        "comm/average/seconds": seconds["average"],
        **{f"comm/{k}/bytes": b for k, (b, _) in comm.items()},
        **{f"comm/{k}/calls": c for k, (_, c) in comm.items()},
    }
    if info.is_main:
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"peer: {step} steps in {wall:.2f}s, {comm['average'][1]} averages, "
              f"comm {summary['comm/bytes'] / 2**20:.2f} MiB/rank", flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
