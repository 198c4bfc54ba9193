"""DeepSpeed inside a replica group: its data-parallel group is the group's S ranks.

``deepspeed.initialize(mpu=...)`` takes the data-parallel group from an object with
Megatron's ``mpu`` interface, so ZeRO stages 1-2 partition the optimizer state (and, from
stage 2, the gradients) over the group only, and reduce over it every step. Local SGD then
runs across groups on what each rank owns: with ZeRO, its fp32 partition of the flat
parameter groups, which holds the same elements on the ranks with the same partition
index in every group; afterwards DeepSpeed copies the partitions into the module's weights
and all-gathers them over the group (``update_lp_params``).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


class GroupMPU:
    """Megatron's ``mpu`` interface for DeepSpeed: data parallel over one replica group,
    no model parallelism (a group of one rank)."""

    def __init__(self, replicas: Any) -> None:
        self.replicas = replicas
        rank, world = replicas.info.rank, replicas.info.world_size
        solo = None
        # Every rank creates every group, in the same order.
        for r in range(world):
            group = dist.new_group([r])
            if r == rank:
                solo = group
        self.solo = solo

    def get_data_parallel_group(self) -> Any:
        return self.replicas.within

    def get_data_parallel_world_size(self) -> int:
        return int(self.replicas.size)

    def get_data_parallel_rank(self) -> int:
        return int(self.replicas.info.rank % self.replicas.size)

    def get_model_parallel_group(self) -> Any:
        return self.solo

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0
