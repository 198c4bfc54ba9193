"""The exact mean: one all-reduce (sum) of a flat bucket, then a division by the group size.

A reducer only moves one bucket: the averager does the bucketing, byte counting and the
consensus distance around it, so another reducer (compressed, neighbour-only) replaces this
file and nothing else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from localsgd.registry import Facts
from localsgd.sync.capabilities import ALL_WORKERS, CONSENSUS
from localsgd.sync.parts import REDUCERS
from localsgd.sync.reducers.base import Reducer


@REDUCERS.register
class Mean(Reducer):
    name = "mean"
    shards = True
    """Runs across replica groups on each rank's own shard (``sync/sharding.py``)."""
    exact = True
    """The result is the mean of every worker of the group."""

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({CONSENSUS})

    @classmethod
    def needs(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({ALL_WORKERS})

    def __init__(self, cfg: Any) -> None:
        pass

    def kind(self, requested: str) -> str:
        """The accounting kind this reducer's traffic is recorded as, when the caller asks
        for ``requested`` (``average``, ``eval``): a compressed reducer may keep its own."""
        return requested

    def payload_bytes(self, flat: torch.Tensor, group: Any = None, slices: Any = None) -> int:
        """Bytes this rank hands to the collective for ``flat``."""
        return flat.numel() * flat.element_size()

    def start(self, flat: torch.Tensor, group: dist.ProcessGroup | None,
              slices: Any = None) -> Any:
        """Begin reducing ``flat`` in place over ``group``; returns what ``finish`` needs.

        The collective runs in the background (gloo's worker threads; NCCL's own stream on
        CUDA): a blocking sync finishes it at once, an overlapped one steps after.
        """
        return dist.all_reduce(flat, group=group, async_op=True)

    def finish(self, work: Any, flat: torch.Tensor, size: int) -> torch.Tensor:
        """Wait for ``work``; the mean, here in place in ``flat`` (a reducer may instead
        return another tensor of the same length)."""
        if work is not None:
            work.wait()
        return flat.div_(size)
