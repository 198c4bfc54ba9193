"""One sync of a list of tensors, as separate steps a part can replace one at a time.

bucketing (``Bucketer``) -> the collective (the reducer) -> byte and time counting (the
meter) -> the consensus distance -> applying the result (the update). Only parameters are
measured and given the recipe's update; buffers and momentum that travel with them are
copied.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from localsgd.sync.accounting import CommMeter
from localsgd.sync.buckets import Bucketer
from localsgd.sync.updates.copy import COPY


class Averager:
    def __init__(self, meter: CommMeter, bucketer: Bucketer, reducer: Any) -> None:
        self.meter = meter
        self.bucketer = bucketer
        self.reducer = reducer

    def average(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None,
                size: int, kind: str = "average", params: int = 0, update: Any = COPY,
                out: list[torch.Tensor] | None = None) -> float:
        """Reduce ``tensors`` over ``group`` (``size`` workers); results go in place or into
        ``out`` (one to one). The first ``params`` tensors get ``update``, the rest a copy.

        Returns this worker's Euclidean distance from the average over those ``params``.
        """
        targets = out if out is not None else tensors
        if len(targets) != len(tensors):
            raise ValueError("out must match tensors one to one")
        dst = [t.detach().view(-1) for t in targets]
        sq = 0.0
        for bucket in self.bucketer.fill(tensors):
            with self.meter.timed(kind, self.reducer.payload_bytes(bucket.flat)):
                work = self.reducer.start(bucket.flat, group)
                self.reducer.finish(work, bucket.flat, size)
            for s in bucket.slices:
                target = dst[s.index][s.start:s.start + s.local.numel()]
                if s.index < params:
                    sq += squared_distance(s.local, s.packed)
                    update.apply(s.index, s.start, s.local, s.packed, target)
                else:
                    COPY.apply(s.index, s.start, s.local, s.packed, target)
        return math.sqrt(sq)


def squared_distance(local: torch.Tensor, mean: torch.Tensor) -> float:
    """||local - mean||^2 in float64: the consensus distance, summed slice by slice."""
    return float(torch.sub(local, mean).double().pow(2).sum())
