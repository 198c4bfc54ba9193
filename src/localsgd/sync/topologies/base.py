"""What every topology declares and answers, typed, so the controller never probes for
attributes."""

from __future__ import annotations

from typing import Any, ClassVar

from localsgd.registry import Part
from localsgd.sync.schedules.base import GLOBAL


class Topology(Part):
    """A scope (``GLOBAL``, ``NODE``, ``MIX``) -> the workers that exchange in it."""

    gossip: ClassVar[bool] = False
    """Whether a sync through the sync's reducer leaves workers apart (graph gossip) rather
    than agreeing."""
    reducer: ClassVar[str] = "mean"
    """The reducer ``sync.reducer=auto`` picks."""
    mean_reducer: ClassVar[str] = "mean"
    """The reducer that forms the exact average over ``everyone`` (evaluation, the end)."""

    def round(self, action: str) -> str:
        """The scope of the sync the schedule calls ``action``, counted here: a topology
        may turn some global syncs into neighbour mixes (``MIX``)."""
        return action

    def mixes(self, scope: str) -> bool:
        """Whether syncs over ``scope`` go through the sync's reducer (``sync.reducer``);
        the others are exact means over the scope."""
        return scope == GLOBAL

    def group(self, scope: str) -> tuple[Any, int]:
        """(group, size) of ``scope``: a process group or a neighbourhood."""
        raise NotImplementedError

    def everyone(self) -> tuple[Any, int]:
        """(group, size) over which the exact average of all workers is formed."""
        raise NotImplementedError
