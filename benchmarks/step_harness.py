"""One worker's side of the step benchmark: the hand-written loop, localsgd's trainer on the
same pre-made device batches, a window of steps between two barriers, and host clocks.

Shared by ``bench_step.py`` (timing) and ``tests/train/test_step_overhead.py`` (op and
call counts). The trainer runs through ``localsgd.cli.train_main``; only its training data
is swapped (``build_train_pipeline`` in the trainer's module) for the pre-made batches the
hand loop reads too, since no recipe setting feeds it tensors already on the device.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from localsgd.cli import train_main
from localsgd.config.schema import ModelConfig, ModelName, OptimConfig
from localsgd.data.loaders import mix_seed
from localsgd.models import build_model
from localsgd.sync.controller import SyncObserver
from localsgd.train import trainer as trainer_module
from localsgd.train.optim import build_optimizer, scaled_lr

POOL = 8
"""Distinct pre-made batches per rank, cycled through."""
CLASSES = 10
SEED = 0
OPTIM = OptimConfig(base_lr=0.1, base_batch_size=64, momentum=0.9, nesterov=True,
                    weight_decay=1e-4, no_decay_bn_bias=True)
"""The paper's SGD (resnet20_base.yaml), for both loops."""
BASE_RECIPE = "recipes/tests/tiny_synthetic.yaml"


@dataclass(frozen=True)
class Case:
    """What one measurement trains: model, image side, per-worker batch, workers, period."""

    model: str
    image_size: int
    batch: int
    world: int
    period: int
    """H: average every ``period`` steps (ignored with one worker, which runs mini-batch)."""
    warmup: int
    steps: int
    """Steps in the window (after ``warmup`` untimed ones)."""
    hand_average: str = "flat"
    """How the hand loop averages: ``flat`` (one all-reduce) or ``tensor`` (one per tensor)."""

    @property
    def total(self) -> int:
        return self.warmup + self.steps


def make_batches(case: Case, rank: int, device: torch.device) -> list[tuple[torch.Tensor,
                                                                             torch.Tensor]]:
    """``POOL`` batches of this rank, made on the host from a seed and moved once."""
    gen = torch.Generator().manual_seed(mix_seed(SEED, rank))
    shape = (case.batch, 3, case.image_size, case.image_size)
    return [(torch.randn(shape, generator=gen).to(device),
             torch.randint(0, CLASSES, (case.batch,), generator=gen).to(device))
            for _ in range(POOL)]


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ComponentClock:
    """Host time spent inside wrapped callables, exclusive of the wrapped ones they call,
    summed per component between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._frames: list[list[Any]] = []  # [component, started, time in wrapped callees]
        self._t0 = 0.0
        self._on = False
        self.window = 0.0

    def timed(self, fn: Callable[..., Any], component: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            frame = [component, time.perf_counter(), 0.0]
            self._frames.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._frames.pop()
                self._close(frame, time.perf_counter(), self._frames[-1] if self._frames
                            else None)
        return wrapper

    def wrap(self, obj: Any, attr: str, component: str) -> None:
        setattr(obj, attr, self.timed(getattr(obj, attr), component))

    def _close(self, frame: list[Any], end: float, parent: list[Any] | None) -> None:
        if not self._on:
            return
        elapsed = end - max(frame[1], self._t0)  # only the part inside the window
        self.totals[frame[0]] += elapsed - frame[2]
        if parent is not None:
            parent[2] += elapsed

    def start(self) -> None:
        self.totals.clear()
        for frame in self._frames:  # callees that returned before the window do not count
            frame[2] = 0.0
        self._t0 = time.perf_counter()
        self._on = True

    def stop(self) -> None:
        end = time.perf_counter()
        for i in range(len(self._frames) - 1, -1, -1):  # calls still open: up to now
            self._close(self._frames[i], end, self._frames[i - 1] if i else None)
        self._on = False
        self.window = end - self._t0


class Window:
    """Times steps ``warmup`` .. ``total`` between two barriers (the slowest rank counts);
    ``on_start`` / ``on_stop`` run at the edges, inside the window (clocks, profilers).

    It also takes this process's CPU time over the same steps (``time.process_time``: all
    its threads, gloo's included), which other people's load on the machine moves far
    less than the wall clock: time this process waits for a core is not in it."""

    def __init__(self, case: Case, device: torch.device,
                 on_start: Callable[[], None] | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.case, self.device = case, device
        self.on_start, self.on_stop = on_start, on_stop
        self.seconds = float("nan")
        self.cpu_seconds = float("nan")
        self._t0 = self._c0 = 0.0

    def after_step(self, step: int) -> None:
        if step == self.case.warmup:
            sync_device(self.device)
            if self.case.world > 1:
                dist.barrier()
            self._t0 = time.perf_counter()
            self._c0 = time.process_time()
            if self.on_start:
                self.on_start()
        elif step == self.case.total:
            if self.on_stop:
                self.on_stop()
            sync_device(self.device)
            self.cpu_seconds = time.process_time() - self._c0  # not the barrier's wait
            if self.case.world > 1:
                dist.barrier()
            self.seconds = time.perf_counter() - self._t0


# the hand-written loop ---------------------------------------------------------------------
def average_(tensors: list[torch.Tensor], world: int) -> None:
    """Plain model averaging: one all-reduce per tensor, then a division."""
    for t in tensors:
        dist.all_reduce(t)
        t.div_(world)


def average_flat_(tensors: list[torch.Tensor], world: int) -> None:
    """The same through one flat buffer, one all-reduce (as PyTorch's
    ``model_averaging.utils.average_parameters`` does)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


AVERAGES = {"flat": average_flat_, "tensor": average_}


def hand_loop(case: Case, rank: int, device: torch.device, window: Window,
              clock: ComponentClock | None = None,
              probe: Callable[[str, nn.Module], None] | None = None) -> nn.Module:
    """SGD on the pre-made batches, averaging parameters and floating buffers every
    ``case.period`` steps with ``dist.all_reduce`` when there are several workers.
    ``probe(when, model)`` sees the model just before and after the last average."""
    torch.manual_seed(SEED)  # identical replicas on every rank, as localsgd's broadcast
    model = build_model(ModelConfig(name=ModelName(case.model)), CLASSES,
                        case.image_size).to(device).train()
    opt = build_optimizer(OPTIM, model, scaled_lr(OPTIM, case.world * case.batch))
    loss_fn = nn.CrossEntropyLoss()
    batches = make_batches(case, rank, device)
    shared = [p.data for p in model.parameters()] + [
        b for b in model.buffers() if b.is_floating_point()]
    forward: Callable[..., Any] = model
    backward: Callable[..., Any] = torch.Tensor.backward
    step_fn: Callable[..., Any] = opt.step
    average: Callable[..., Any] = AVERAGES[case.hand_average]
    if clock is not None:
        forward = clock.timed(model, "model forward")
        backward = clock.timed(torch.Tensor.backward, "backward")
        step_fn = clock.timed(opt.step, "optimizer step")
        average = clock.timed(average, "averaging")
    for step in range(1, case.total + 1):
        x, y = batches[(step - 1) % POOL]
        opt.zero_grad(set_to_none=True)
        backward(loss_fn(forward(x), y))
        step_fn()
        if case.world > 1 and step % case.period == 0:
            last = step == case.total
            if probe and last:
                probe("pre", model)
            average(shared, case.world)
            if probe and last:
                probe("post", model)
        window.after_step(step)
    return model


# localsgd's trainer ------------------------------------------------------------------------
class PremadeSampler:
    """What the trainer asks of its sampler."""

    def set_epoch(self, epoch: int) -> None:
        pass

    def set_resume(self, epoch: int, skip: int) -> None:
        pass


class PremadeLoader:
    """``case.total`` batches per epoch, cycling through the pre-made pool."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(self.length):
            yield self.batches[k % POOL]


def recipe_args(case: Case, run_dir: str, device: torch.device) -> list[str]:
    """``train_main`` arguments: one epoch of ``case.total`` steps, no checkpoints, no W&B."""
    sync = (["sync.algorithm=minibatch"] if case.world == 1 else
            ["sync.algorithm=local", f"sync.period={case.period}"])
    return [BASE_RECIPE, f"seed={SEED}", f"model.name={case.model}", "data.name=synthetic",
            f"data.image_size={case.image_size}", f"data.batch_size={case.batch}",
            f"data.synthetic_samples={max(64, case.world * case.batch)}",
            f"data.synthetic_classes={CLASSES}", "data.num_workers=0", "data.augment=false",
            f"optim.base_lr={OPTIM.base_lr}", f"optim.base_batch_size={OPTIM.base_batch_size}",
            f"optim.momentum={OPTIM.momentum}", f"optim.nesterov={OPTIM.nesterov}",
            f"optim.weight_decay={OPTIM.weight_decay}",
            f"optim.no_decay_bn_bias={OPTIM.no_decay_bn_bias}", "lr_schedule.decay=constant",
            "lr_schedule.milestones=[]", "lr_schedule.warmup_epochs=0", "train.epochs=1",
            f"train.max_steps={case.total}", "train.log_every_steps=10",
            "train.progress=false", "run.resume=false", "run.checkpoint_every_epochs=0",
            "wandb.mode=disabled", f"dist.device={device.type}", "dist.backend=gloo",
            f"run.dir={run_dir}", *sync]


class _WindowObserver(SyncObserver):
    def __init__(self, window: Window) -> None:
        self.window = window

    def after_step(self, step: int, action: str | None, target: Any) -> None:
        self.window.after_step(step)


def clock_trainer(trainer: Any, clock: ComponentClock) -> None:
    """Wrap the set-up trainer's parts (instance attributes only) with the clock."""
    engine = trainer.engine
    for attr in ("forward_backward", "optimizer_step"):
        clock.wrap(engine, attr, "engine")
    clock.wrap(engine.module, "forward", "model forward")
    clock.wrap(engine.amp, "backward", "backward")
    clock.wrap(trainer.optimizer, "step", "optimizer step")
    clock.wrap(trainer.scheduler, "step", "lr scheduler")
    for attr in ("grad_sync", "after_step", "pop_events"):
        clock.wrap(trainer.controller, attr, "sync controller")
    clock.wrap(trainer.reporters, "log", "reporters")


def localsgd_loop(case: Case, device: torch.device, window: Window,
                  clock: ComponentClock | None = None,
                  after_setup: Callable[[Any], None] | None = None) -> None:
    """``train_main`` on the pre-made batches; the window observes its steps."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    batches = make_batches(case, rank, device)
    original_pipeline, original_trainer = (trainer_module.build_train_pipeline,
                                           trainer_module.Trainer)

    def premade(*args: Any, **kwargs: Any) -> tuple[PremadeLoader, PremadeSampler]:
        return PremadeLoader(batches, case.total), PremadeSampler()

    class Measured(original_trainer):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            super().setup()
            if clock is not None:
                clock_trainer(self, clock)
            if after_setup is not None:
                after_setup(self)

    trainer_module.build_train_pipeline = premade  # type: ignore[assignment]
    trainer_module.Trainer = Measured  # type: ignore[misc]
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            code = train_main(recipe_args(case, run_dir, device), [_WindowObserver(window)])
    finally:
        trainer_module.build_train_pipeline = original_pipeline  # type: ignore[assignment]
        trainer_module.Trainer = original_trainer  # type: ignore[misc]
    if code != 0:
        raise RuntimeError(f"localsgd train_main exited with {code}")


GROUPS = {"trainer": ("trainer loop", "lr scheduler"),
          "engine": ("engine", "model forward", "backward", "optimizer step"),
          "sync controller": ("sync controller",), "reporters": ("reporters",)}
"""The four host-time groups of localsgd and the clock's components in each."""


def breakdown(clock: ComponentClock, steps: int, loop: str) -> dict[str, float]:
    """Milliseconds per step per component; what no wrapped callable took is ``loop``."""
    per = {k: v / steps * 1e3 for k, v in clock.totals.items()}
    per[loop] = clock.window / steps * 1e3 - sum(per.values())
    per["total"] = clock.window / steps * 1e3
    return per
