"""Neighbour mixing: send a bucket to each graph neighbour, return W_ii x_i + sum_j W_ij x_j.

The topology (ring, torus, expander) says who the neighbours are and how much each weighs,
and moves the bytes; this reducer only combines what arrives, in a fixed neighbour order so
that every run sums alike. Bytes counted are what this rank sends: degree x the bucket.
"""

from __future__ import annotations

from typing import Any

import torch

from localsgd.registry import Facts
from localsgd.sync.capabilities import NEIGHBOURS
from localsgd.sync.parts import REDUCERS
from localsgd.sync.reducers.base import Reducer


@REDUCERS.register
class GossipMix(Reducer):
    name = "gossip"
    shards = True
    """Mixes whatever tensors the engine hands it: across replica groups, each rank's own
    shards with its neighbours' (``sync/sharding.py``)."""
    exact = False
    """The result is a neighbourhood's weighted mean, not the mean of every worker."""

    @classmethod
    def needs(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({NEIGHBOURS})

    def __init__(self, cfg: Any) -> None:
        pass

    def kind(self, requested: str) -> str:
        return "gossip" if requested == "average" else requested

    def payload_bytes(self, flat: torch.Tensor, hood: Any = None, slices: Any = None) -> int:
        """Bytes this rank sends for ``flat``: one copy per neighbour."""
        peers = len(hood.peers) if hood is not None else 1
        return peers * flat.numel() * flat.element_size()

    def start(self, flat: torch.Tensor, hood: Any, slices: Any = None) -> Any:
        return hood.exchange(flat)

    def finish(self, work: Any, flat: torch.Tensor, size: int) -> torch.Tensor:
        received = work.wait()
        out = flat * work.hood.self_weight
        for weight, theirs in zip(work.hood.weights, received, strict=True):
            out.add_(theirs, alpha=weight)
        return out
