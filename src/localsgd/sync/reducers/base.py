"""What every reducer declares and does, typed, so callers never probe for attributes."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from localsgd.registry import Part

MODEL = "model"
DELTA = "delta"


class Reducer(Part):
    """Moves one bucket: ``start`` launches its exchange, ``finish`` returns the result.

    A reducer ``carries`` either the model theta (the result is a combination of the
    workers' models) or the pseudo-gradient Delta = anchor - theta (the averager hands it
    Delta and the result is the mean Delta the update steps on; only parameters travel so).
    """

    exact: ClassVar[bool] = True
    """Whether the result is the mean over every worker of the group."""
    carries: ClassVar[str] = MODEL
    """MODEL or DELTA (the latter needs the sync's anchor)."""
    uses_anchor: ClassVar[bool] = False
    """Whether the sync must keep an anchor for this reducer."""

    sync_point_views: bool = False
    """Whether evaluation between syncs shows the last sync's model (the anchor) and the run
    ends with a sync of this reducer, rather than with exact averages formed aside: no fp32
    traffic in a compressed run."""

    def kind(self, requested: str) -> str:
        """The accounting kind this reducer's traffic is recorded as, when the caller asks
        for ``requested`` (``average``, ``eval``)."""
        return requested

    def payload_bytes(self, flat: torch.Tensor, group: Any = None, slices: Any = None) -> int:
        """Bytes this rank hands to the collective for ``flat``."""
        return flat.numel() * flat.element_size()

    def start(self, flat: torch.Tensor, group: Any, slices: Any = None) -> Any:
        raise NotImplementedError

    def finish(self, work: Any, flat: torch.Tensor, size: int) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, anchor: Any) -> None:
        """The sync's anchor (``sync.anchor.Anchor``), when ``uses_anchor`` asked for one."""

    def held_bytes(self) -> int:
        """Memory kept between syncs (error-feedback residuals)."""
        return 0
