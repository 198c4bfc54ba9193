"""Engines by name (``engine.name``), the ``engine`` section they compose, and building one.

An engine is a file in this package that registers a class with a ``name``, a ``Config`` of
the ``engine.*`` keys it reads, a ``check`` of them, and a constructor taking its section and
an ``EngineContext``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from localsgd.config.domains import Choice, domain
from localsgd.launch.env import DistInfo
from localsgd.registry import Facts, Registry, Section
from localsgd.sync.accounting import CommMeter

ENGINES: Registry[type] = Registry("engine.name", "localsgd.engines")


@dataclass
class EngineCommon:
    name: str = domain(Choice(ENGINES.names, key=ENGINES.key), "ddp")
    """ddp (PyTorch DistributedDataParallel), deepspeed, or fsdp (FSDP2 ``fully_shard``
    over the replica group's ranks, ``sync.replica_group``)."""


@dataclass
class EngineContext:
    """What an engine is built from besides its own section."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    info: DistInfo
    meter: CommMeter
    facts: Facts
    """Batch, accumulation, world size and whether the schedule takes local steps."""
    grad_compression: Any = None
    """A ``sync.grad_compression.CompressedGrads``: mini-batch gradients travel compressed
    through it instead of the plain all-reduce (``sync.compression.method``)."""
    replicas: Any = None
    """A ``launch.replicas.Replicas``: the group this rank steps with every mini-batch
    (``sync.replica_group``); None or S = 1: every rank is a worker of its own."""


SECTION = Section("engine", EngineCommon, {"name": ENGINES})


def check_engine(cfg: Any, facts: Facts) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the ``engine`` section."""
    return SECTION.check(cfg, facts)


def build_engine(cfg: Any, ctx: EngineContext) -> Any:
    """The engine named by ``cfg.name``, built from its own section."""
    return ENGINES.get(cfg.name)(cfg, ctx)
