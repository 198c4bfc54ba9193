"""Every worker of a scope exchanges with every other: all workers, or those of one node.

Nodes are runs of LOCAL_WORLD_SIZE consecutive ranks. Process groups for node scopes are
created once at start-up, by every rank in the same order, and only when the schedule can
sync over a node.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from localsgd.launch.env import DistInfo
from localsgd.registry import Facts
from localsgd.sync.capabilities import ALL_WORKERS, NODE_GROUPS
from localsgd.sync.parts import TOPOLOGIES
from localsgd.sync.schedules.base import GLOBAL, NODE
from localsgd.sync.topologies.base import Topology


@TOPOLOGIES.register
class Complete(Topology):
    name = "complete"
    shards = True
    """Runs across replica groups on each rank's own shard (``sync/sharding.py``)."""

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({ALL_WORKERS, NODE_GROUPS})

    def __init__(self, cfg: Any, info: DistInfo, scopes: tuple[str, ...]) -> None:
        self.info = info
        self.node_group: dist.ProcessGroup | None = None
        if NODE in scopes:
            # Across replica groups, a node's groups average each shard over its column.
            self.node_group = info.node_group()

    def group(self, scope: str) -> tuple[dist.ProcessGroup | None, int]:
        """(process group, its size) for ``scope``; None is the default (world) group."""
        if scope == NODE:
            return self.node_group, self.info.local_world_size
        if scope != GLOBAL:
            raise ValueError(f"topology complete has no scope {scope!r}")
        return self.everyone()

    def everyone(self) -> tuple[dist.ProcessGroup | None, int]:
        """(group, size) over which the exact average of all workers is formed: the world,
        or across replica groups the ranks holding this rank's shard (``GroupInfo``)."""
        return self.info.world_group, self.info.world_size
