"""Steps/s of localsgd's sync modes next to plain PyTorch DDP and PyTorch's post-local SGD.

    torchrun --nproc-per-node=2 benchmarks/bench_sync.py [--steps 16 --rounds 9 ...]

Every variant trains the same model on the same pre-generated, in-memory synthetic batches
(different per rank) with the same SGD; only the synchronisation differs. All variants are
built and warmed up once, then timed in windows of ``--steps`` steps between two barriers
(the slowest rank counts), ``--rounds`` windows each, interleaved with the order rotated
every round; medians are reported because a shared machine is noisy. Rank 0 prints a
Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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

from localsgd.config.schema import DistConfig, ModelConfig, ModelName, OptimConfig
from localsgd.engines import EngineConfig, EngineContext, build_engine
from localsgd.engines.ddp import NO_BUFFER_SYNC
from localsgd.launch.env import DistInfo, init_distributed
from localsgd.models import build_model
from localsgd.registry import Facts
from localsgd.sync.accounting import CommMeter
from localsgd.sync.config import SyncConfig
from localsgd.sync.controller import SyncController
from localsgd.train.optim import build_optimizer, scaled_lr
from localsgd.train.timing import PhaseTimer

NUM_CLASSES = 10
IMAGE_SIZE = 32
POOL = 8
"""Distinct pre-generated batches per rank, cycled through."""
TARGET_MINIBATCH = 0.98
"""Target: localsgd mini-batch steps/s at least this fraction of plain DDP's."""

StepFn = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass
class Built:
    """A ready-to-train variant: one call of ``step`` is one optimizer step."""

    step: StepFn
    meter: CommMeter | None = None
    keep: list[Any] = field(default_factory=list)
    """Objects that must stay alive while the variant runs (DDP wrappers, hook states)."""
    done: int = 0
    """Steps taken so far (also picks the next pre-generated batch)."""


@dataclass
class Setup:
    args: argparse.Namespace
    info: DistInfo
    loss_fn: nn.Module
    lr: float
    opt_cfg: OptimConfig
    node_group: dist.ProcessGroup | None = None
    """Per-node subgroup for the ``-docs`` peer; created once, collectively, on first use."""


def _model_and_opt(s: Setup) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(s.args.seed)  # identical replicas on every rank
    model = build_model(ModelConfig(name=ModelName(s.args.model)), NUM_CLASSES, IMAGE_SIZE)
    model = model.to(s.info.device).train()
    return model, build_optimizer(s.opt_cfg, model, s.lr)


def _device_ids(s: Setup) -> list[int] | None:
    return [s.info.device.index] if s.info.device.type == "cuda" else None


def _plain_step(forward: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module) -> StepFn:
    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss_fn(forward(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def build_ddp(s: Setup, sync_buffers: bool | None = None) -> Built:
    """Plain DDP; by default PyTorch's defaults (buffers synced every forward, built-in
    all-reduce); ``sync_buffers=False`` turns the per-forward buffer broadcast off."""
    model, opt = _model_and_opt(s)
    ddp = DistributedDataParallel(model, device_ids=_device_ids(s),
                                  **({} if sync_buffers is None else NO_BUFFER_SYNC))
    return Built(_plain_step(ddp, opt, s.loss_fn), keep=[ddp])


def build_localsgd(s: Setup, algorithm: str, period: int) -> Built:
    """localsgd's DDP engine driven by its SyncController, as the trainer drives them."""
    model, opt = _model_and_opt(s)
    meter = CommMeter()
    engine = build_engine(EngineConfig(name="ddp"), EngineContext(
        model, opt, s.info, meter, Facts(epochs=1, micro_batch=s.args.batch, grad_accum=1,
                                         local_steps=algorithm != "minibatch",
                                         world_size=s.info.world_size)))
    cfg = SyncConfig(algorithm=algorithm, period=period)
    # steps_per_epoch only matters for switch_epoch, which is unset here.
    controller = SyncController.build(cfg, s.info, meter, steps_per_epoch=1)
    engine.train()
    timer = PhaseTimer(s.info.device)  # what the trainer passes

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        engine.forward_backward(x, y, s.loss_fn, 1.0, controller.grad_sync(), timer)
        engine.optimizer_step()
        controller.after_step(engine)
    return Built(step, meter, keep=[engine, controller])


def build_torch_postlocal(s: Setup, period: int, docs_defaults: bool = False) -> Built:
    """PyTorch's post-local SGD: comm hook + PostLocalSGDOptimizer + PeriodicModelAverager.

    Local from step 0. By default it is set up for speed: no gradient all-reduce after the
    switch and no per-forward buffer broadcast. ``docs_defaults`` keeps PyTorch's defaults
    (``post_local_gradient_allreduce=True``, whose per-node subgroup is every rank on one
    machine, so gradients are still all-reduced each step; buffers synced each forward).
    On CPU the hook cannot size that subgroup itself, so it is passed in.
    """
    model, opt = _model_and_opt(s)
    ddp = DistributedDataParallel(model, device_ids=_device_ids(s),
                                  **({} if docs_defaults else NO_BUFFER_SYNC))
    if docs_defaults and s.node_group is None:
        s.node_group, _ = dist.new_subgroups(group_size=s.info.local_world_size)
    state = PostLocalSGDState(process_group=None,
                              subgroup=s.node_group if docs_defaults else None,
                              start_localSGD_iter=0,
                              post_local_gradient_allreduce=docs_defaults)
    ddp.register_comm_hook(state, post_localSGD_hook)
    wrapped = PostLocalSGDOptimizer(optim=opt,
                                    averager=PeriodicModelAverager(period=period, warmup_steps=0))
    return Built(_plain_step(ddp, wrapped, s.loss_fn), keep=[ddp, state])


def build_nocomm(s: Setup) -> Built:
    """Upper bound: each worker trains its own model, no DDP, no averaging."""
    model, opt = _model_and_opt(s)
    return Built(_plain_step(model, opt, s.loss_fn))


def variants(periods: list[int], peer_period: int) -> dict[str, Callable[[Setup], Built]]:
    table: dict[str, Callable[[Setup], Built]] = {
        "ddp": build_ddp,
        "ddp-nobcast": lambda s: build_ddp(s, sync_buffers=False),
        "localsgd-minibatch": lambda s: build_localsgd(s, "minibatch", 1),
    }
    for h in periods:
        table[f"localsgd-local-H{h}"] = lambda s, h=h: build_localsgd(s, "local", h)
    table[f"torch-postlocal-H{peer_period}"] = lambda s: build_torch_postlocal(s, peer_period)
    table[f"torch-postlocal-H{peer_period}-docs"] = (
        lambda s: build_torch_postlocal(s, peer_period, docs_defaults=True))
    table["no-comm"] = build_nocomm
    return table


OPTIONAL = ("ddp-nobcast", "-docs")
"""Variants (name or name suffix) left out unless --variants names them or --all is given."""


def _comm_snapshot(meter: CommMeter | None) -> dict[str, tuple[int, int, float]]:
    if meter is None:
        return {}
    return {k: (t.bytes, t.calls, t.seconds) for k, t in meter.totals.items()}


def run_steps(built: Built, batches: list[tuple[torch.Tensor, torch.Tensor]],
              count: int) -> None:
    for _ in range(count):
        built.step(*batches[built.done % len(batches)])
        built.done += 1


def measure(built: Built, batches: list[tuple[torch.Tensor, torch.Tensor]],
            steps: int) -> tuple[float, dict[str, float]]:
    """Steps/s over ``steps`` timed steps (slowest rank), and localsgd's traffic in them."""
    before = _comm_snapshot(built.meter)
    dist.barrier()
    start = time.perf_counter()
    run_steps(built, batches, steps)
    dist.barrier()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    comm: dict[str, float] = {"bytes": 0, "calls": 0, "seconds": 0.0}
    for kind, now in _comm_snapshot(built.meter).items():
        delta = [a - b for a, b in zip(now, before[kind], strict=True)]
        for i, key in enumerate(("bytes", "calls", "seconds")):
            comm[key] += delta[i]
            if delta[1]:
                comm[f"{kind}_{key}"] = delta[i]
    return steps / float(elapsed), comm


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
               "unknown")
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads_per_worker": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_start": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=16,
                   help="timed steps per window; a multiple of every H keeps the number of "
                   "averages per window fixed")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant, once")
    p.add_argument("--rounds", type=int, default=9,
                   help="timed windows per variant, interleaved; the median is reported")
    p.add_argument("--batch", type=int, default=32, help="per-worker batch size")
    p.add_argument("--model", default="resnet20", choices=[m.value for m in ModelName])
    p.add_argument("--periods", default="1,4,16", help="H values of localsgd local SGD")
    p.add_argument("--peer-period", type=int, default=16, help="H of PyTorch's post-local SGD")
    p.add_argument("--variants", default="",
                   help="comma-separated subset (default: all but the optional ones)")
    p.add_argument("--all", action="store_true",
                   help="also run the optional variants (ddp-nobcast, torch ...-docs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/sync_cpu.json", help="JSON output")
    args = p.parse_args(argv)
    if min(args.steps, args.rounds, args.batch) < 1 or args.warmup < 0:
        p.error("--steps, --rounds and --batch must be positive, --warmup non-negative")
    return args


def select(table: dict[str, Callable[[Setup], Built]], args: argparse.Namespace) -> list[str]:
    if args.variants:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in table]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {list(table)}")
        return names
    return [n for n in table if args.all or not any(n == o or n.endswith(o) for o in OPTIONAL)]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _paired(runs: dict[str, list[float]], num: str, den: str) -> float | None:
    """Median over rounds of the ratio measured within each round (robust to load drift)."""
    if num not in runs or den not in runs:
        return None
    return statistics.median(a / b for a, b in zip(runs[num], runs[den], strict=True))


def _target(runs: dict[str, list[float]], med: dict[str, float], num: str, den: str,
            target: float) -> dict[str, Any] | None:
    ratio = _ratio(med.get(num), med.get(den))
    if ratio is None:
        return None
    return {"variant": num, "reference": den, "ratio": ratio, "target": target,
            "met": ratio >= target, "paired_ratio": _paired(runs, num, den)}


def summarise(names: list[str], runs: dict[str, list[float]],
              comm: dict[str, dict[str, float] | None], peer: str) -> dict[str, Any]:
    med = {n: statistics.median(runs[n]) for n in names}
    ddp, bound = med.get("ddp"), med.get("no-comm")
    rows = [{"variant": n, "steps_per_s_median": med[n], "steps_per_s_runs": runs[n],
             "ratio_to_ddp": _ratio(med[n], ddp), "ratio_to_nocomm": _ratio(med[n], bound),
             "ratio_to_ddp_paired": _paired(runs, n, "ddp"),
             "ratio_to_nocomm_paired": _paired(runs, n, "no-comm"),
             "comm_timed_total": comm[n]} for n in names]
    mine = peer.replace("torch-postlocal", "localsgd-local")
    targets = {k: t for k, t in (
        ("minibatch_vs_ddp", _target(runs, med, "localsgd-minibatch", "ddp", TARGET_MINIBATCH)),
        ("local_vs_torch_peer", _target(runs, med, mine, peer, 1.0))) if t is not None}
    return {"rows": rows, "targets": targets}


def render(summary: dict[str, Any], steps: int) -> str:
    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = ["| variant | steps/s (median) | min-max | x DDP | x DDP (paired) | x no-comm "
             f"| x no-comm (paired) | localsgd comm in {steps} timed steps |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in summary["rows"]:
        c = r["comm_timed_total"]
        traffic = "-" if c is None else (
            f"{c['bytes'] / 2**20:.2f} MiB / {c['calls']:.0f} calls / {c['seconds']:.2f} s")
        runs = r["steps_per_s_runs"]
        ratios = " | ".join(fmt(r[k], ".3f") for k in (
            "ratio_to_ddp", "ratio_to_ddp_paired", "ratio_to_nocomm", "ratio_to_nocomm_paired"))
        lines.append(f"| {r['variant']} | {r['steps_per_s_median']:.2f} | "
                     f"{min(runs):.2f}-{max(runs):.2f} | {ratios} | {traffic} |")
    for name, t in summary["targets"].items():
        lines.append(f"target {name}: {t['variant']} / {t['reference']} = {t['ratio']:.3f} "
                     f"(>= {t['target']}) -> {'met' if t['met'] else 'NOT met'}; per-round "
                     f"paired median {t['paired_ratio']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = init_distributed(DistConfig())
    periods = [int(h) for h in args.periods.split(",") if h.strip()]
    table = variants(periods, args.peer_period)
    names = select(table, args)
    opt_cfg = OptimConfig()  # momentum 0.9, Nesterov, weight decay 1e-4
    setup = Setup(args, info, nn.CrossEntropyLoss(), scaled_lr(opt_cfg,
                  args.batch * info.world_size), opt_cfg)
    gen = torch.Generator().manual_seed(1000 + info.rank)
    batches = [(torch.randn(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
                .to(info.device),
                torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen).to(info.device))
               for _ in range(POOL)]
    machine = machine_info()
    main_rank = info.is_main
    if main_rank:
        print(f"{info.world_size} workers, {info.backend}, {info.device}; {args.model}, batch "
              f"{args.batch}/worker; {args.warmup} warmup + {args.steps} timed steps x "
              f"{args.rounds} rounds; {machine['cpu_model']}, {machine['cpu_count']} CPUs, "
              f"torch {machine['torch']}, {machine['torch_threads_per_worker']} thread(s)/worker",
              flush=True)
    # Every variant is built and warmed up once and keeps its state between rounds, so the
    # short timed windows of all variants interleave closely in time.
    built = {name: table[name](setup) for name in names}
    for name in names:
        run_steps(built[name], batches, args.warmup)
    runs: dict[str, list[float]] = {n: [] for n in names}
    comm: dict[str, dict[str, float] | None] = {n: None for n in names}
    begin = time.perf_counter()
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sps, traffic = measure(built[name], batches, args.steps)
            runs[name].append(sps)
            if built[name].meter is not None:
                total = comm[name] or {}
                comm[name] = {k: total.get(k, 0) + v for k, v in traffic.items()}
            if main_rank:
                print(f"round {r + 1}/{args.rounds} {name:>28}: {sps:7.2f} steps/s", flush=True)
    summary = summarise(names, runs, comm, f"torch-postlocal-H{args.peer_period}")
    if main_rank:
        print()
        print(render(summary, args.steps * args.rounds))
        machine["loadavg_end"] = list(os.getloadavg())
        result = {
            "command": f"torchrun --nproc-per-node={info.world_size} "
                       + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine,
            "setup": {"world_size": info.world_size, "backend": info.backend,
                      "device": str(info.device), "model": args.model, "batch": args.batch,
                      "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                      "periods": periods, "peer_period": args.peer_period, "lr": setup.lr,
                      "optimizer": "SGD momentum 0.9 nesterov, wd 1e-4 (none on BN/bias)"},
            "wall_s": time.perf_counter() - begin,
            **summary,
        }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {out} ({result['wall_s']:.0f} s)", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
