"""Epoch time of localsgd's trainer against a minimal hand-written loop, in one process.

    python benchmarks/bench_epoch.py recipes/quickstart.yaml [key=value ...] [--variants ...]

Every variant trains the recipe's model on the recipe's training set with the same batch
size and optimizer, one worker, and times whole epochs after the first (which pays for
cuDNN autotuning, allocator growth and loader start-up). Variants:

- ``hand``: a plain PyTorch loop over a ``DataLoader`` with the recipe's transforms and
  ``num_workers`` (what a user would write by hand; the target is localsgd within 1.2x).
- ``hand-device-data``: the same loop over batches already on the device, without
  augmentation: the compute bound, so ``hand`` / this shows what the CPU loader costs.
- ``localsgd``: ``train_main`` with ``sync.algorithm=minibatch`` (one worker: no collective).
- ``localsgd-bf16``, ``localsgd-device``, ``localsgd-bf16-device``: the same with
  ``model.precision=bf16`` and/or ``data.pipeline=device``.
- ``localsgd-channels-last``, ``localsgd-compile``: the same with ``model.channels_last``
  or ``train.compile`` (its compilation falls in the first, untimed epoch); combine them
  with the others through the positional overrides, which every variant takes.
- ``localsgd-synced-timer``: the same, with the phase timer synchronizing the device around
  every phase (how the timer worked before it used CUDA events), to measure that cost.

Writes a JSON with samples/s per variant and round to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from localsgd.cli import train_main
from localsgd.data import build_datasets
from localsgd.models import build_model
from localsgd.recipe import load_config
from localsgd.train import trainer as trainer_module
from localsgd.train.optim import build_optimizer, scaled_lr
from localsgd.train.timing import PhaseTimer


class SyncedPhaseTimer(PhaseTimer):
    """Synchronizes around every phase (the timer's design before CUDA events)."""

    @contextmanager
    def phase(self, name: str):  # type: ignore[override]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.totals[name] += time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hand_loop(cfg, device: torch.device, epochs: int, on_device: bool) -> list[float]:
    torch.manual_seed(cfg.seed)
    bundle = build_datasets(cfg.data, cfg.seed)
    model = build_model(cfg.model, bundle.num_classes, bundle.image_size).to(device)
    opt = build_optimizer(cfg.optim, model, scaled_lr(cfg.optim, cfg.data.batch_size))
    loss_fn = nn.CrossEntropyLoss()
    bs = cfg.data.batch_size
    if on_device:
        # Un-augmented test-time view of the training set, uploaded once.
        plain = build_datasets(cfg.data, cfg.seed).train
        if hasattr(plain, "dataset") and hasattr(plain.dataset, "transform"):
            plain.dataset.transform = bundle.test.dataset.transform  # type: ignore[attr-defined]
        xs = torch.stack([plain[i][0] for i in range(len(plain))]).to(device)
        ys = torch.tensor([plain[i][1] for i in range(len(plain))], device=device)
        steps = len(xs) // bs

        def batches():
            order = torch.randperm(len(xs), device=device)
            for s in range(steps):
                idx = order[s * bs:(s + 1) * bs]
                yield xs[idx], ys[idx]
    else:
        loader = DataLoader(bundle.train, batch_size=bs, shuffle=True, drop_last=True,
                            num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                            persistent_workers=cfg.data.num_workers > 0)

        def batches():
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    rates = []
    model.train()
    for _ in range(epochs):
        _sync(device)
        start, count = time.perf_counter(), 0
        for x, y in batches():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            count += y.numel()
        _sync(device)
        rates.append(count / (time.perf_counter() - start))
    return rates


LOCALSGD = {"localsgd": [], "localsgd-synced-timer": [],
            "localsgd-bf16": ["model.precision=bf16"],
            "localsgd-device": ["data.pipeline=device"],
            "localsgd-bf16-device": ["model.precision=bf16", "data.pipeline=device"],
            "localsgd-channels-last": ["model.channels_last=true"],
            "localsgd-compile": ["train.compile=true"]}


def localsgd_run(recipe: str, overrides: list[str], epochs: int, synced: bool) -> list[float]:
    original = trainer_module.PhaseTimer
    trainer_module.PhaseTimer = SyncedPhaseTimer if synced else original  # type: ignore[misc]
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            code = train_main([recipe, *overrides, f"train.epochs={epochs}",
                               "sync.algorithm=minibatch", "lr_schedule.decay=constant",
                               "lr_schedule.milestones=[]", "train.progress=false",
                               "run.resume=false", "run.checkpoint_every_epochs=0",
                               "wandb.mode=disabled", f"run.dir={run_dir}"])
            if code != 0:
                raise SystemExit(f"localsgd run failed with exit code {code}")
            records = [json.loads(line) for line in
                       (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    finally:
        trainer_module.PhaseTimer = original  # type: ignore[misc]
    return [r["throughput/samples_per_s"] for r in records if r.get("event") == "epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default="hand,hand-device-data,localsgd,"
                        "localsgd-synced-timer")
    parser.add_argument("--out", default="benchmarks/results/epoch.json")
    args = parser.parse_args()
    cfg = load_config(args.recipe, args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - {"hand", "hand-device-data", *LOCALSGD})
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from hand, hand-device-data, "
                     + ", ".join(LOCALSGD))
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            if v.startswith("hand"):
                got = hand_loop(cfg, device, args.epochs, on_device=v == "hand-device-data")
            else:
                got = localsgd_run(args.recipe, [*args.overrides, *LOCALSGD[v]], args.epochs,
                                   synced=v == "localsgd-synced-timer")
            rates[v].extend(got[1:])  # the first epoch warms up
            print(f"round {r} {v}: {[round(x) for x in got]} samples/s", flush=True)
    median = {v: sorted(x)[len(x) // 2] for v, x in rates.items() if x}
    print("\n| variant | samples/s (median) | vs hand |\n|---|---|---|")
    for v, m in median.items():
        ratio = m / median["hand"] if "hand" in median else float("nan")
        print(f"| {v} | {m:.0f} | {ratio:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": sys.argv, "device": torch.cuda.get_device_name() if device.type == "cuda"
        else platform.processor() or "cpu", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"), "rates": rates, "median": median}, indent=1))


if __name__ == "__main__":
    main()
