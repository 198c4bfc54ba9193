"""Replica groups: S consecutive ranks that train as one synchronous data-parallel worker.

``sync.replica_group`` names S: ``1`` (every rank is a worker, the default), ``node`` (the
ranks of one node) or an integer that divides the node's worker count, so a group never
spans two nodes. The world of W ranks becomes a mesh of G = W / S groups by S shards:

    replicate dim ->  group 0: ranks 0 .. S-1,  group 1: ranks S .. 2S-1, ...
    shard dim     ->  rank g*S + s holds shard s of group g

Inside a group the engine steps every mini-batch together (gradients reduced over the
``within`` group); the sync parts see G workers, and each rank averages with the ranks of the
``across`` group, those holding the same shard (or, unsharded, the same replica) in the
other groups. A rank of a group still reads its own slice of the data, so a group's
mini-batch is the union of its S ranks' ``data.batch_size`` batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from localsgd.config.domains import Problem, Text, show
from localsgd.launch.env import DistInfo

NODE = "node"


@dataclass(frozen=True)
class GroupSize(Text):
    """``node``, or a decimal integer >= 1 (a string, so that ``node`` fits the same key)."""

    what: str = "node or an integer >= 1 that divides the workers per node"

    def problems(self, value: Any) -> list[Problem]:
        found = super().problems(value)
        if found:
            return found
        if value != NODE and not (value.isdecimal() and int(value) >= 1 and len(value) < 19):
            return [("", f"must be {self.what}, got {show(value)}")]
        return []


def group_size(value: str, local_world_size: int | None) -> int | None:
    """S for ``sync.replica_group=value``; None where it depends on an unknown node size."""
    if value == NODE:
        return local_world_size
    return int(value) if value.isdecimal() else None


def group_count(value: str, world_size: int | None,
                local_world_size: int | None) -> int | None:
    """G = world / S, the workers the sync parts see; None where unknown or not whole."""
    size = group_size(value, local_world_size)
    if world_size is None or not size or world_size % size:
        return None
    return world_size // size


def group_problems(value: str, world_size: int | None,
                   local_world_size: int | None) -> list[str]:
    """The launch rule of ``sync.replica_group``: S divides the workers per node."""
    size = group_size(value, local_world_size)
    if size is None or local_world_size is None or size == 1:
        return []
    if local_world_size % size != 0:
        return [f"sync.replica_group: {size} does not divide the {local_world_size} workers "
                "per node (torchrun --nproc-per-node), and a group may not span two nodes; "
                f"use a divisor of {local_world_size} or sync.replica_group=node"]
    return []


@dataclass(frozen=True)
class GroupInfo(DistInfo):
    """The launch as the sync parts see it: one worker per replica group, exchanging over
    ``world_group`` (the ranks holding the same shard in every group). ``rank`` and
    ``world_size`` count groups; ``local_world_size`` the groups of one node."""

    shard: int = 0
    """This rank's place in its group: the shard (or replica) index it averages."""
    group_size: int = 1
    """S: ranks per group."""

    def rank_of(self, worker: int) -> int:
        """The launch rank holding this rank's shard in group ``worker`` (a gossip peer)."""
        return worker * self.group_size + self.shard

    def node_group(self) -> dist.ProcessGroup:
        """The ranks of this node holding this rank's shard: the groups of one node average
        there (hierarchical SGD). Every rank builds every (node, shard) group, in the same
        order, and keeps its own."""
        per_node = self.local_world_size
        mine: dist.ProcessGroup | None = None
        for node in range(self.num_nodes):
            for shard in range(self.group_size):
                ranks = [g * self.group_size + shard
                         for g in range(node * per_node, (node + 1) * per_node)]
                group = dist.new_group(ranks)
                if node == self.node_rank and shard == self.shard:
                    mine = group
        assert mine is not None
        return mine


@dataclass
class Replicas:
    """The mesh of G groups x S shards and this rank's process groups in it."""

    info: DistInfo
    """The launch."""
    size: int
    """S: ranks per group."""
    groups: int
    """G: groups, the workers the sync parts see."""
    mesh: Any = None
    """A 2-D ``DeviceMesh`` ("replicate", "shard"), or None with S = 1 and no sharding."""
    within: Any = None
    """The S ranks of this rank's group."""
    across: Any = None
    """The G ranks holding this rank's shard index; None: the whole world (S = 1)."""

    @property
    def index(self) -> int:
        """This rank's group."""
        return self.info.rank // self.size

    def sync_info(self) -> DistInfo:
        """The launch as the sync controller sees it (the launch itself with S = 1)."""
        if self.mesh is None:
            return self.info
        i = self.info
        return GroupInfo(rank=self.index, world_size=self.groups,
                         local_rank=i.local_rank // self.size,
                         local_world_size=max(1, i.local_world_size // self.size),
                         device=i.device, backend=i.backend, world_group=self.across,
                         shard=i.rank % self.size, group_size=self.size)


def build_replicas(value: str, info: DistInfo, mesh_needed: bool = False) -> Replicas:
    """The replica layout of ``sync.replica_group=value``. No process group is created for
    S = 1 unless ``mesh_needed`` (an engine that shards over the mesh even then)."""
    size = group_size(value, info.local_world_size) or 1
    groups = info.world_size // size
    if size == 1 and not mesh_needed:
        return Replicas(info, 1, groups)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(info.device.type, (groups, size),
                            mesh_dim_names=("replicate", "shard"))
    within, across = mesh["shard"].get_group(), mesh["replicate"].get_group()
    assert dist.get_process_group_ranks(within)[0] == (info.rank // size) * size
    return Replicas(info, size, groups, mesh, within, across)
