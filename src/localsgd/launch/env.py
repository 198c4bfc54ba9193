"""Process-group set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_*)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from localsgd.config.errors import ConfigError
from localsgd.config.schema import Backend, Device, DistConfig
from localsgd.launch.rendezvous import await_workers, reach


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    world_group: Any = None
    """The process group of the sync's exact averages: None, the world (``GroupInfo``: the
    ranks holding this rank's shard in every replica group)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rank_of(self, worker: int) -> int:
        """The launch rank that sync worker ``worker`` exchanges with (a gossip peer): the
        worker itself (``GroupInfo``: the rank holding this rank's shard in that group)."""
        return worker

    def node_group(self) -> dist.ProcessGroup:
        """The ranks of this node that average together (hierarchical SGD)."""
        return node_groups(self)[0]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def launcher_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) as torchrun set them; 1 process without."""
    world = _env_int("WORLD_SIZE", 1)
    return (_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0),
            _env_int("LOCAL_WORLD_SIZE", world))


def resolve_device(cfg: DistConfig, local_rank: int) -> torch.device:
    use_cuda = cfg.device == Device.cuda or (
        cfg.device == Device.auto and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError(["dist.device: cuda was asked for but no CUDA device is "
                               "visible; use dist.device=cpu or dist.device=auto"])
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def choose_backend(cfg: DistConfig, device: torch.device, local_world: int, rank: int) -> str:
    """nccl on CUDA and gloo on CPU, unless the recipe names one.

    NCCL refuses two ranks on one GPU, and several workers per GPU is how the paper ran its
    16-worker experiments; gloo handles CUDA tensors (through host copies), so ``auto`` falls
    back to it with a notice. An explicit ``nccl`` in that layout is the recipe's mistake.
    """
    shared = device.type == "cuda" and local_world > torch.cuda.device_count()
    if cfg.backend == Backend.nccl and shared:
        raise ConfigError([
            f"dist.backend: nccl cannot run {local_world} workers per node on "
            f"{torch.cuda.device_count()} visible GPU(s) (NCCL allows one rank per GPU); use "
            "dist.backend=auto or gloo, or start at most one worker per GPU"])
    if cfg.backend != Backend.auto:
        return cfg.backend.value
    if device.type != "cuda":
        return "gloo"
    if shared:
        if rank == 0:
            print(f"localsgd: notice: {local_world} workers share {torch.cuda.device_count()} "
                  "GPU(s); NCCL allows one rank per GPU, so dist.backend=auto uses gloo",
                  flush=True)
        return "gloo"
    return "nccl"


def init_distributed(cfg: DistConfig) -> DistInfo:
    """Join (or, without torchrun, create) the default process group."""
    rank, world, local_rank, local_world = launcher_env()
    device = resolve_device(cfg, local_rank)
    backend = choose_backend(cfg, device, local_world, rank)
    timeout = timedelta(seconds=cfg.timeout_s)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            addr, port = os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "0"))
            # Under torchrun node 0's launcher hosts the store: a worker that cannot reach
            # it, or a rank 0 whose peers never arrive, says so instead of waiting mutely.
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            if agent_store:
                reach(addr, port, rank, local_rank, timeout)
            store, _, _ = next(rendezvous("env://", rank, world, timeout=timeout))
            # After an elastic restart the store can still hold the previous attempt's
            # addresses; workers would then dial dead peers. Keys are kept per attempt.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"localsgd/attempt_{attempt}", store)
            if agent_store:
                await_workers(store, rank, world, local_world, f"{addr}:{port}", timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=timeout,
                                    device_id=device if backend == "nccl" else None)
        else:
            # Plain `python torchrun_entry.py`: a one-process group keeps a single code path.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank,
                    local_world_size=local_world, device=device, backend=backend)


def node_groups(info: DistInfo) -> tuple[dist.ProcessGroup, list[list[int]]]:
    """This rank's intra-node group; nodes are runs of LOCAL_WORLD_SIZE consecutive ranks.

    Every rank must create every group in the same order, so all are built and one is kept.
    """
    size = info.local_world_size
    layout = [list(range(n * size, (n + 1) * size)) for n in range(info.num_nodes)]
    mine: dist.ProcessGroup | None = None
    for ranks in layout:
        group = dist.new_group(ranks)
        if info.rank in ranks:
            mine = group
    assert mine is not None
    return mine, layout


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
