"""Blocking syncs: the average runs to completion before the next step starts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from localsgd.registry import Part
from localsgd.sync.parts import RUNNERS


@RUNNERS.register
class Blocking(Part):
    name = "blocking"

    def __init__(self, cfg: Any) -> None:
        pass

    def run(self, average: Callable[[], float]) -> float | None:
        """Carry out ``average`` (one whole sync); its consensus distance, None if pending."""
        return average()

    def drain(self) -> list[float]:
        """Finish every pending sync (before a checkpoint, an evaluation or the end)."""
        return []
