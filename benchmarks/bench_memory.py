"""Peak extra memory of averaging a large model: localsgd's bucketed averager vs PyTorch's.

    python benchmarks/bench_memory.py [--params 200e6] [--bucket-mb 25]

runs each variant as its own 2-worker torchrun job (fresh processes, so peaks do not mix)
and prints the extra peak resident memory that one model average adds on a worker.
PyTorch's ``model_averaging.utils.average_parameters`` (what ``PeriodicModelAverager`` calls)
flattens every parameter into one new tensor; localsgd streams through one bucket.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from launching import torchrun_json, write_result
from torch import nn

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("localsgd", "torch")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(variant: str, params: int, bucket_mb: float) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    chunk = 4_000_000
    torch.manual_seed(rank)
    model = nn.ParameterList(nn.Parameter(torch.randn(chunk)) for _ in range(params // chunk))
    tensors = [p.data for p in model]
    n = sum(t.numel() for t in tensors)
    dist.barrier()
    before_rss, before_peak = _rss_mib(), _peak_mib()
    start = time.perf_counter()
    if variant == "localsgd":
        from localsgd.sync.accounting import CommMeter
        from localsgd.sync.averager import Averager
        from localsgd.sync.buckets import Bucketer
        from localsgd.sync.reducers.mean import Mean

        Averager(CommMeter(), Bucketer(bucket_mb), Mean(None)).average(tensors, None, world)
    else:
        from torch.distributed.algorithms.model_averaging.utils import average_parameters

        average_parameters(iter(tensors), dist.group.WORLD)
    seconds = time.perf_counter() - start
    extra = max(0.0, _peak_mib() - max(before_rss, 0.0))
    # Check the result is the true average, so a fast wrong averager cannot win.
    firsts = [torch.randn(chunk, generator=torch.Generator().manual_seed(r))[:8]
              for r in range(world)]
    correct = torch.allclose(tensors[0][:8], sum(firsts) / world, atol=1e-6)
    if rank == 0:
        print(json.dumps({"variant": variant, "params": n, "model_mib": n * 4 / 2**20,
                          "rss_before_mib": before_rss, "peak_before_mib": before_peak,
                          "extra_peak_mib": extra, "seconds": seconds,
                          "average_correct": correct}), flush=True)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=200e6)
    ap.add_argument("--bucket-mb", type=float, default=25.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/memory_cpu.json"))
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        worker(args.variant, int(args.params), args.bucket_mb)
        return 0
    rows = []
    for variant in VARIANTS:
        rows.append(torchrun_json(__file__, 2, ["--variant", variant, "--params",
                                                str(args.params), "--bucket-mb",
                                                str(args.bucket_mb)], {}))
    print(f"{'variant':<10} {'params':>12} {'model MiB':>10} {'extra peak MiB':>15} "
          f"{'x model':>8} {'seconds':>8}")
    for r in rows:
        print(f"{r['variant']:<10} {r['params']:>12,} {r['model_mib']:>10.0f} "
              f"{r['extra_peak_mib']:>15.0f} {r['extra_peak_mib'] / r['model_mib']:>8.3f} "
              f"{r['seconds']:>8.2f}")
    write_result(args.out, {"bucket_mb": args.bucket_mb, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
