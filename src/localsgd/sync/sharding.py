"""Which sync parts run across replica groups, each rank on what it holds.

With ``sync.replica_group`` > 1, or an engine that shards the model over its group
(``engine.name=fsdp``), a rank holds one shard of its group's model and averages it with the
ranks holding the same shard in the other groups. A part runs there when it declares
``shards = True``: it touches only the tensors the engine hands it, over the process group
(or the neighbours) its topology names. Every registered part does: codecs then compress
each rank's shard of a tensor as that tensor (statistics and residuals per shard), gossip
mixes a shard with the ranks holding it in the neighbouring groups, and hierarchical node
averages run over a node's ranks of one shard. A part that does not declare it is refused,
one line, saying which would run instead.
"""

from __future__ import annotations

from typing import Any

import torch

from localsgd.launch.replicas import NODE, group_problems, group_size
from localsgd.registry import Facts, Registry

AUTO_SOURCE = {"reducer": "sync.compression.method=none", "runner": "sync.overlap_steps=0"}
"""Selectors whose ``auto`` is derived from another key: the key to set instead."""


def engine_shards(facts: Facts) -> bool:
    """Whether ``engine.name`` shards parameters over the replica group."""
    from localsgd.engines.registry import ENGINES

    engine = ENGINES.find(facts.engine)
    return bool(getattr(engine, "shards", False))


def grouped(value: str, facts: Facts) -> bool:
    """Whether ``sync.replica_group=value`` makes groups of more than one rank (``node`` on
    a node of unknown size counts)."""
    size = group_size(value, facts.local_world_size)
    return (size is None and value == NODE) or (size or 1) > 1


def minibatch_steps(cfg: Any) -> bool:
    """Whether the schedule of the ``sync`` section ``cfg`` takes mini-batch steps: always
    (minibatch), or before a switch point after step 0 (post_local, hierarchical)."""
    if str(cfg.algorithm) == "minibatch":
        return True
    switch = [getattr(cfg, key, None) for key in ("switch_step", "switch_epoch")]
    return str(cfg.algorithm) in ("post_local", "hierarchical") and any(
        s is not None and s > 0 for s in switch)


def replica_problems(cfg: Any, facts: Facts, chosen: dict[str, Any],
                     selectors: dict[str, Registry[Any]], name_of: Any) -> list[str]:
    """The launch rule of ``sync.replica_group`` and one line per chosen part that cannot
    run across replica groups."""
    value = str(getattr(cfg, "replica_group", "1"))
    out = group_problems(value, facts.world_size, facts.local_world_size)
    sharded = engine_shards(facts)
    if not (grouped(value, facts) or sharded):
        return out
    who = (f"engine.name={facts.engine}" if sharded else f"sync.replica_group={value}")
    back = ("sync.replica_group=1 and engine.name=ddp" if sharded else "sync.replica_group=1")
    method = str(getattr(getattr(cfg, "compression", None), "method", "none"))
    if method != "none" and minibatch_steps(cfg):
        out.append(f"sync.compression.method={method} with {who}: mini-batch steps across "
                   f"replica groups reduce gradients exactly (only model deltas are "
                   f"compressed there yet), so sync.algorithm={cfg.algorithm} would not "
                   "compress its gradients; use sync.algorithm=local (or no mini-batch "
                   f"phase), or {back}")
    for key, part in chosen.items():
        if getattr(part, "shards", False):
            continue
        name = name_of(cfg, key)
        if key == "reducer" and str(getattr(cfg, key)) == "auto" and str(getattr(
                getattr(cfg, "compression", None), "method", "none")) == "none":
            continue  # the topology's own reducer: the topology's line says it
        able = sorted(p.name for p in selectors[key].parts() if getattr(p, "shards", False))
        instead = (AUTO_SOURCE[key] if str(getattr(cfg, key)) == "auto" and key in AUTO_SOURCE
                   else f"sync.{key}=" + "|".join(able))
        out.append(f"sync.{key}={name} with {who}: {name} cannot run across replica groups "
                   f"on each rank's own shard yet; use {instead}, or {back}")
    return out


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: a DTensor's local shard (a view: call under
    ``torch.no_grad()`` to write through it), any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
