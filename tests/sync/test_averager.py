"""Bucketed averaging on a real 2-process gloo group (spawned, file:// rendezvous)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from localsgd.sync.accounting import CommMeter
from localsgd.sync.averager import Averager
from localsgd.sync.buckets import Bucketer
from localsgd.sync.reducers.mean import Mean


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    # Mixed sizes, one tensor larger than a bucket, an integer buffer and a float64 one.
    tensors = [torch.randn(1000, generator=g), torch.randn(7, 3, generator=g),
               torch.randn(5, generator=g).double(), torch.tensor([rank + 3])]
    originals = [t.clone() for t in tensors]
    meter = CommMeter()
    bucketer = Bucketer(bucket_mb=256 / 2**20)  # 256 bytes: 64 floats
    distance = Averager(meter, bucketer, Mean(None)).average(tensors, None, 2, params=2)
    result = {"tensors": tensors, "originals": originals, "distance": distance,
              "calls": meter.totals["average"].calls, "bytes": meter.totals["average"].bytes,
              "buffers": {str(k): v.numel() * v.element_size()
                          for k, v in bucketer.buffers.items()}}
    torch.save(result, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_bucketed_average_is_exact_and_bounded() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(f"{tmp}/store", tmp), nprocs=2, join=True)
        r = [torch.load(Path(tmp) / f"rank{i}.pt", weights_only=False) for i in range(2)]
    for i in range(3):
        expected = (r[0]["originals"][i] + r[1]["originals"][i]) / 2
        assert torch.allclose(r[0]["tensors"][i], expected)
        assert torch.equal(r[0]["tensors"][i], r[1]["tensors"][i])
    # Integer buffers are left alone (they advance identically on every worker).
    assert int(r[0]["tensors"][3]) == 3 and int(r[1]["tensors"][3]) == 4
    # float32: 1021 elements in 64-element buckets; float64: 5 elements in one 32-slot bucket.
    assert r[0]["calls"] == math.ceil(1021 / 64) + 1
    assert r[0]["bytes"] == 1021 * 4 + 5 * 8
    # Extra memory: one 256-byte bucket per dtype, never a copy of the model.
    assert sorted(r[0]["buffers"].values()) == [256, 256]
    for rank in range(2):
        own = torch.cat([t.reshape(-1) for t in r[rank]["originals"][:2]])
        avg = torch.cat([t.reshape(-1) for t in r[rank]["tensors"][:2]])
        assert abs(r[rank]["distance"] - float((own - avg).norm())) < 1e-4
