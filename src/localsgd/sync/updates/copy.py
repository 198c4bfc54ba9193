"""Plain averaging: every worker takes the reduced value as its own."""

from __future__ import annotations

from typing import Any

import torch

from localsgd.sync.parts import UPDATES
from localsgd.sync.updates.base import Update


@UPDATES.register
class Copy(Update):
    name = "copy"
    shards = True
    """Runs across replica groups on each rank's own shard (``sync/sharding.py``)."""

    def __init__(self, cfg: Any) -> None:
        pass

    @property
    def copies(self) -> bool:
        # A subclass that overrides ``apply`` does more than copy.
        return type(self).apply is Copy.apply

    def apply(self, index: int, start: int, local: torch.Tensor, reduced: torch.Tensor,
              out: torch.Tensor) -> None:
        out.copy_(reduced)
