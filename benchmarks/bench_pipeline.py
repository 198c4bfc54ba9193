"""Samples/s of the two training data pipelines alone (no model), side by side.

    python benchmarks/bench_pipeline.py [--subset 10000 --batch 128 --rounds 3]

``torchvision`` (per-sample PIL crop, flip, ToTensor, Normalize in ``DataLoader`` worker
processes; 0 means in the training process) against ``device`` (the training set as uint8
on the device, whole batches augmented with tensor ops; on CPU here, and on CUDA where one
is visible). Both produce the same batches bit for bit (tests/data/test_device_pipeline.py),
so this is the cost of the same work. Each variant iterates one full epoch of one rank's
shard per round; the median round counts. Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from localsgd.config.schema import DataConfig, DatasetName
from localsgd.data import CIFAR_STATS, build_datasets, build_train_loader
from localsgd.data.device import build_device_loader

REPO = Path(__file__).resolve().parents[1]


def epoch_rate(loader, sampler, epoch: int, device: torch.device) -> float:
    sampler.set_epoch(epoch)
    start, count = time.perf_counter(), 0
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        count += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="0,1,2", help="torchvision loader processes")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                    "pipeline_cpu.json")
    args = ap.parse_args()
    cfg = DataConfig(name=DatasetName.cifar10, root=str(args.data), download=False,
                     train_subset=args.subset)
    train = build_datasets(cfg, seed=0).train
    mean, std = CIFAR_STATS[DatasetName.cifar10]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                       else [])
    variants = {}
    for w in (int(x) for x in args.workers.split(",")):
        variants[f"torchvision-{w}proc"] = (build_train_loader(train, args.batch, 0, 1, 0, w),
                                            devices[-1])
    for dev in devices:
        variants[f"device-{dev.type}"] = (build_device_loader(
            train, args.batch, 0, 1, 0, dev, mean, std, True), dev)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, ((loader, sampler), dev) in variants.items():
            rates[name].append(epoch_rate(loader, sampler, r, dev))
    median = {k: statistics.median(v) for k, v in rates.items()}
    base = median["torchvision-1proc"] if "torchvision-1proc" in median else min(median.values())
    print("| pipeline | samples/s (median) | vs torchvision, 1 loader process |\n|---|---|---|")
    for k, v in median.items():
        print(f"| {k} | {v:.0f} | {v / base:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": sys.argv, "machine": platform.processor() or platform.machine(),
        "cores": torch.get_num_threads(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"), "rates": rates, "median": median}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
