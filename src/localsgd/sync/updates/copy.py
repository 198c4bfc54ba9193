"""Plain averaging: every worker takes the reduced value as its own."""

from __future__ import annotations

from typing import Any

import torch

from localsgd.registry import Part
from localsgd.sync.parts import UPDATES


@UPDATES.register
class Copy(Part):
    name = "copy"

    def __init__(self, cfg: Any) -> None:
        pass

    def apply(self, index: int, start: int, local: torch.Tensor, reduced: torch.Tensor,
              out: torch.Tensor) -> None:
        """Write the new value of elements ``start:start+numel`` of tensor ``index``.

        ``local`` holds this worker's values before the sync, ``reduced`` what the reducer
        returned and ``out`` is where the result goes (may be ``local`` itself).
        """
        out.copy_(reduced)

