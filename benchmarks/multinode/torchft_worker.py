"""torchft's DiLoCo as a torchrun worker: the peer of the SparseLoCo runs in bench_overlap.

    torchrun --nnodes=1 ... benchmarks/multinode/torchft_worker.py RECIPE.yaml [key=value ...] \\
        [--ft-period 4 --ft-fragments 2 --ft-delay 1 --ft-bucketize --ft-quantize]

Each emulated node is one torchft replica group of one worker: its own one-node torchrun job
(``netem.node_command(own_job=True)``), the replica groups meeting through torchft's lighthouse
(``torchft_lighthouse``, started in node 0's namespace; ``TORCHFT_LIGHTHOUSE``), its
``REPLICA_GROUP_ID`` and ``NUM_REPLICA_GROUPS`` from the environment. Same argv as
``torchrun_entry.py``: the recipe and overrides give the same data (synthetic 32x32, the
replica group's shard of the sampler, batch), model (ResNet-20, same seed on every replica, so
``init_sync=False``), inner optimizer (the recipe's AdamW, LR schedule, ``optim.grad_clip``);
``sync.*`` overrides are ignored. Only the synchronisation is torchft's:

* ``Manager`` over ``ProcessGroupGloo`` with ``use_async_quorum=False`` (DiLoCo requires it),
  ``min_replica_size`` = every replica group;
* ``DiLoCo(manager, fragments, inner, outer, sync_every=--ft-period, use_bucketization,
  should_quantize, fragment_sync_delay=--ft-delay)``, one outer SGD (lr 0.7, momentum 0.9,
  Nesterov: the DiLoCo recipe's outer step) per fragment. ``--ft-fragments`` > 1 cuts the
  model into that many contiguous fragments of near-equal parameter counts
  (``balanced_fragments``); torchft syncs one fragment every period / fragments steps, so
  every parameter is synced once per period, as ours are.

Counted (rank 0 writes ``summary.json`` for replica group 0, ``summary-replica<i>.json`` for
the others): ``comm/bytes``, the bytes of every tensor handed to ``Manager.allreduce``
(fp32 pseudo-gradients: torchft syncs parameters only, not BatchNorm statistics);
``peer/commits`` and ``peer/commit_failures``, what ``Manager.should_commit`` returned (a
failed collective makes torchft skip the outer step without raising, so a run whose commits
are not all true compared nothing); ``peer/manager_step`` and ``peer/errored``.
``time/wall_s`` runs from the first step to the last; there is no final evaluation (the
speed window of the harness ends at the last step anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from localsgd.data import build_datasets, build_train_loader
from localsgd.models import build_model
from localsgd.recipe import load_config
from localsgd.train.optim import build_optimizer, build_scheduler, scaled_lr

LIGHTHOUSE_PORT = 29510
MANAGER_PORT = 29512


def units(model: nn.Module) -> list[nn.Module]:
    """The model's top-level modules, with every ``nn.Sequential`` opened into its blocks."""
    out: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.Sequential):
            out.extend(units(child) if any(True for _ in child.children()) else [child])
        elif any(True for _ in child.parameters()):
            out.append(child)
    return out


def balanced_fragments(model: nn.Module, n: int) -> list[nn.Module]:
    """``n`` contiguous groups of ``units`` whose largest parameter count is the smallest
    possible (the linear partition problem, solved exactly; the model has a dozen units)."""
    parts = units(model)
    if n <= 1:
        return [model]
    if n > len(parts):
        raise ValueError(f"{n} fragments but the model has only {len(parts)} units")
    sizes = [sum(p.numel() for p in u.parameters()) for u in parts]
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    # best[k][j]: (largest group, last cut) splitting the first j units into k groups
    best = [[(float("inf"), 0)] * (len(parts) + 1) for _ in range(n + 1)]
    best[0][0] = (0, 0)
    for k in range(1, n + 1):
        for j in range(k, len(parts) + 1):
            best[k][j] = min((max(best[k - 1][i][0], prefix[j] - prefix[i]), i)
                             for i in range(k - 1, j))
    cuts, j = [], len(parts)
    for k in range(n, 0, -1):
        i = best[k][j][1]
        cuts.append((i, j))
        j = i
    return [nn.ModuleList(parts[i:j]) for i, j in reversed(cuts)]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ft-period", type=int, default=4)
    ap.add_argument("--ft-fragments", type=int, default=1)
    ap.add_argument("--ft-delay", type=int, default=0)
    ap.add_argument("--ft-bucketize", action="store_true")
    ap.add_argument("--ft-quantize", action="store_true")
    args, rest = ap.parse_known_args(argv)
    if not rest:
        ap.error("RECIPE.yaml [dotted.key=value ...] required")
    warnings.filterwarnings("ignore", message=".*epoch parameter in `scheduler.step")
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    cfg = load_config(rest[0], rest[1:])
    replica = int(os.environ["REPLICA_GROUP_ID"])
    replicas = int(os.environ["NUM_REPLICA_GROUPS"])
    device, dtype = torch.device("cpu"), getattr(torch, cfg.model.dtype.value)

    data = build_datasets(cfg.data, cfg.seed, allow_download=False)
    torch.manual_seed(cfg.seed)  # identical initial weights on every replica group
    model = build_model(cfg.model, data.num_classes, data.image_size).to(device, dtype)
    loader, sampler = build_train_loader(data.train, cfg.data.batch_size, replica, replicas,
                                         cfg.seed, cfg.data.num_workers)
    steps_per_epoch = len(loader)
    peak_lr = scaled_lr(cfg.optim, replicas * cfg.data.batch_size)
    inner = build_optimizer(cfg.optim, model, peak_lr)
    scheduler = build_scheduler(cfg.lr_schedule, inner, cfg.optim.base_lr, peak_lr,
                                steps_per_epoch, cfg.train.epochs)
    fragments = balanced_fragments(model, args.ft_fragments)
    outers = [torch.optim.SGD(f.parameters(), lr=0.7, momentum=0.9, nesterov=True)
              for f in fragments]

    timeout = timedelta(seconds=120)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout), min_replica_size=replicas,
        use_async_quorum=False, init_sync=False,
        load_state_dict=lambda sd: (model.load_state_dict(sd["model"]),
                                    inner.load_state_dict(sd["inner"])),
        state_dict=lambda: {"model": model.state_dict(), "inner": inner.state_dict()},
        replica_id=f"replica_{replica}", rank=0, world_size=1,
        hostname=os.environ["MASTER_ADDR"], port=MANAGER_PORT,
        timeout=timeout, quorum_timeout=timeout, connect_timeout=timeout)

    counts: dict[str, Any] = {"bytes": 0, "calls": 0, "commits": 0, "failures": 0}
    allreduce, should_commit = manager.allreduce, manager.should_commit

    def counted_allreduce(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
        counts["bytes"] += tensor.numel() * tensor.element_size()
        counts["calls"] += 1
        return allreduce(tensor, *a, **k)

    def counted_commit(*a: Any, **k: Any) -> bool:
        ok = should_commit(*a, **k)
        counts["commits" if ok else "failures"] += 1
        return ok

    manager.allreduce = counted_allreduce  # type: ignore[method-assign]
    manager.should_commit = counted_commit  # type: ignore[method-assign]

    loss_fn = nn.CrossEntropyLoss()
    max_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    model.train()
    step, epoch, sync_s = 0, 0, 0.0
    marks: dict[int, float] = {}
    with DiLoCo(manager, fragments, inner, outers, sync_every=args.ft_period,
                backup_device=device, pin_memory=False, use_bucketization=args.ft_bucketize,
                should_quantize=args.ft_quantize, fragment_sync_delay=args.ft_delay):
        start = time.perf_counter()
        while step < max_steps:
            sampler.set_epoch(epoch)
            for x, y in loader:
                if step >= max_steps:
                    break
                loss_fn(model(x.to(device, dtype)), y.to(device)).backward()
                if cfg.optim.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                t0 = time.perf_counter()
                inner.step()  # DiLoCo's hooks prepare and perform the fragment syncs here
                sync_s += time.perf_counter() - t0
                inner.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                if step % 16 == 0:
                    marks[step] = time.perf_counter() - start
            epoch += 1
        wall = time.perf_counter() - start

    errored = manager.errored()
    summary: dict[str, Any] = {
        "time/wall_s": wall, "step": step, "epoch": epoch, "world_size": replicas,
        "throughput/samples_per_s": step * replicas * cfg.data.batch_size / max(wall, 1e-9),
        "time/step_marks": marks,
        "sync/algorithm": (f"torchft-DiLoCo-H{args.ft_period}-F{args.ft_fragments}"
                           f"-delay{args.ft_delay}"),
        "peer/bucketized": args.ft_bucketize, "peer/quantized": args.ft_quantize,
        "peer/fragment_params": [sum(p.numel() for p in f.parameters()) for f in fragments],
        "peer/commits": counts["commits"], "peer/commit_failures": counts["failures"],
        "peer/manager_step": manager.current_step(),
        "peer/errored": None if errored is None else repr(errored.original_exception),
        "comm/bytes": counts["bytes"], "comm/calls": counts["calls"],
        "comm/average/bytes": counts["bytes"], "comm/average/calls": counts["calls"],
        "comm/average/seconds": sync_s,
    }
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    name = "summary.json" if replica == 0 else f"summary-replica{replica}.json"
    (run_dir / name).write_text(json.dumps(summary, indent=1) + "\n")
    print(f"torchft replica {replica}: {step} steps in {wall:.2f}s, {counts['commits']} "
          f"commits, {counts['failures']} failed, {counts['bytes'] / 2**20:.2f} MiB "
          f"all-reduced", flush=True)
    manager.shutdown(wait=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
