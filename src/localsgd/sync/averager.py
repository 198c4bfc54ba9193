"""Bucketed model averaging: one all-reduce per bucket, at most one bucket of extra memory.

Tensors are streamed into a preallocated flat buffer (one per dtype/device), large tensors in
slices, so averaging a model of any size never copies it whole. While a bucket holds both the
local values and the average, the squared distance of this worker from the average is summed,
which makes the consensus distance free of extra collectives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from localsgd.sync.accounting import CommMeter

Segment = tuple[int, int, int]
"""(index of the tensor, first element, end element) of one slice in a bucket."""


def _segments(sizes: list[int], capacity: int) -> Iterator[list[Segment]]:
    """Group slices of tensors with ``sizes`` elements into buckets of <= ``capacity``."""
    bucket: list[Segment] = []
    used = 0
    for i, numel in enumerate(sizes):
        start = 0
        while start < numel:
            take = min(numel - start, capacity - used)
            bucket.append((i, start, start + take))
            used += take
            start += take
            if used == capacity:
                yield bucket
                bucket, used = [], 0
    if bucket:
        yield bucket


class BucketAverager:
    def __init__(self, meter: CommMeter, bucket_mb: float) -> None:
        self.meter = meter
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def _buffer(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        if key not in self._buffers:
            elem = torch.empty((), dtype=dtype).element_size()
            self._buffers[key] = torch.empty(max(1, self.bucket_bytes // elem), dtype=dtype,
                                             device=device)
        return self._buffers[key]

    def average(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None,
                group_size: int, kind: str = "average", measured: int = 0,
                out: list[torch.Tensor] | None = None) -> float:
        """Average ``tensors`` over ``group``, in place or into ``out`` (one to one).

        Returns this worker's Euclidean distance from the average over the first
        ``measured`` tensors (the parameters, when buffers and momentum follow them).
        """
        targets = out if out is not None else tensors
        if len(targets) != len(tensors):
            raise ValueError("out must match tensors one to one")
        sq = 0.0
        # Only floating tensors are averaged: integer buffers (BatchNorm's batch counter)
        # advance identically on every worker.
        by_kind: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for i, t in enumerate(tensors):
            if t.is_floating_point():
                by_kind.setdefault((t.dtype, t.device), []).append(i)
        for (dtype, device), idx in by_kind.items():
            buf = self._buffer(dtype, device)
            src = [tensors[i].detach().reshape(-1) for i in idx]
            dst = [targets[i].detach().view(-1) for i in idx]
            for bucket in _segments([t.numel() for t in src], buf.numel()):
                n = sum(end - start for _, start, end in bucket)
                view = buf[:n]
                pos = 0
                for j, start, end in bucket:
                    view[pos:pos + end - start].copy_(src[j][start:end])
                    pos += end - start
                with self.meter.timed(kind, n * buf.element_size()):
                    dist.all_reduce(view, group=group)
                view.div_(group_size)
                pos = 0
                for j, start, end in bucket:
                    avg = view[pos:pos + end - start]
                    if idx[j] < measured:
                        sq += float(torch.sub(src[j][start:end], avg).double().pow(2).sum())
                    dst[j][start:end].copy_(avg)
                    pos += end - start
        return math.sqrt(sq)
