"""The six kinds of sync part, one registry each, and the ``sync`` section they compose.

A synchronization is *when* (schedule, period rule) x *with whom* (topology) x *what
travels* (reducer) x *how it is applied* (update) x *blocking or in the background*
(runner). Each kind is a
folder of files under ``localsgd/sync/``; each file registers one part, which brings its own
keys (its ``Config``) and checks them. The recipe key that chooses a part is listed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from localsgd.config.domains import POSITIVE, Choice, domain
from localsgd.launch.replicas import GroupSize
from localsgd.registry import Registry, Section
from localsgd.sync.capabilities import problems as capability_problems


class MomentumPolicy(str, Enum):
    local = "local"
    average = "average"
    reset = "reset"


class EvalModel(str, Enum):
    averaged = "averaged"
    local = "local"


class StateDevice(str, Enum):
    model = "model"
    cpu = "cpu"


def state_on_cpu(*devices: str) -> bool:
    """Whether any of the ``state_device`` settings given asks for host memory."""
    return StateDevice.cpu in map(StateDevice, devices)


SCHEDULES: Registry[type] = Registry("sync.algorithm", "localsgd.sync.schedules")
TOPOLOGIES: Registry[type] = Registry("sync.topology", "localsgd.sync.topologies")
REDUCERS: Registry[type] = Registry("sync.reducer", "localsgd.sync.reducers")
UPDATES: Registry[type] = Registry("sync.update", "localsgd.sync.updates")
RUNNERS: Registry[type] = Registry("sync.runner", "localsgd.sync.runners")
PERIOD_RULES: Registry[type] = Registry("sync.period_rule", "localsgd.sync.periods")


@dataclass
class SyncCommon:
    """Keys of the ``sync`` section that every combination of parts reads."""

    algorithm: str = domain(Choice(SCHEDULES.names, key=SCHEDULES.key), "minibatch")
    """The schedule: minibatch (all-reduce gradients every step), local (average models every
    ``period`` steps), post_local (minibatch until the switch point, then local) or
    hierarchical (average inside a node every ``period`` steps, across nodes every
    ``period * block_period``)."""
    topology: str = domain(Choice(TOPOLOGIES.names, key=TOPOLOGIES.key), "complete")
    """Who exchanges with whom at a sync: complete (every worker, or every worker of a node,
    all-reduce) or a gossip graph: ring, torus or expander (each worker mixes with its
    neighbours by point-to-point sends, weights from the graph's mixing matrix)."""
    reducer: str = domain(Choice(REDUCERS.names, ("auto",), REDUCERS.key), "auto")
    """What travels: mean (the exact mean, one all-reduce per bucket), gossip (a bucket to
    each graph neighbour, mixed with their weights) or compressed (model deltas compressed
    by ``sync.compression``, all-gathered); auto picks compressed when
    ``sync.compression.method`` is set, else what the topology needs."""
    update: str = domain(Choice(UPDATES.names, key=UPDATES.key), "copy")
    """How the result is applied: copy (every worker takes the average) or outer (an outer
    optimizer steps on the anchor with the averaged pseudo-gradient, as SlowMo and DiLoCo;
    see ``sync.outer``)."""
    period_rule: str = domain(Choice(PERIOD_RULES.names, key=PERIOD_RULES.key), "fixed")
    """How long each local period is: fixed (``period`` steps) or qsr (the Quadratic
    Synchronization Rule: max(period, floor((qsr_alpha / lr)^2)), from the LR at the start of
    each period)."""
    runner: str = domain(Choice(RUNNERS.names, ("auto",), RUNNERS.key), "auto")
    """When the result is applied: blocking (right away; training waits for it) or overlapped
    (``overlap_steps`` local steps later, the average running behind them); auto picks
    overlapped when ``overlap_steps`` > 0."""
    average_buffers: bool = True
    """Average BatchNorm running statistics (buffers) together with parameters at each sync."""
    momentum: MomentumPolicy = MomentumPolicy.local
    """Momentum buffers at a sync: kept local (paper), averaged, or reset to zero."""
    eval_model: EvalModel = EvalModel.averaged
    """Model evaluated between syncs: the average (built aside, workers untouched) or each
    local model, reporting the mean of their metrics."""
    bucket_mb: float = domain(POSITIVE, 25.0)
    """Size of one averaging bucket in MiB: bounds extra memory and sets the collective count."""
    state_device: StateDevice = StateDevice.model
    """Where the sync keeps its state between syncs: the anchor, the outer momentum,
    error-feedback residuals and CHOCO's public copies: model (the parameters' device) or cpu
    (host memory, pinned when CUDA is available; each sync moves what it needs)."""
    replica_group: str = domain(GroupSize(), "1")
    """Ranks that train as one synchronous data-parallel worker: 1 (every rank is a worker),
    node (the ranks of one node) or an integer S dividing the workers per node. Inside a
    group every step reduces gradients over its S ranks (sharded by ``engine.name=fsdp``);
    the schedule, averaging and outer steps run across the world / S groups, each rank with
    the ranks holding its shard in the others. ``data.batch_size`` stays per rank."""


PART_KINDS = {"schedule": ("algorithm", SCHEDULES), "topology": ("topology", TOPOLOGIES),
         "reducer": ("reducer", REDUCERS), "update": ("update", UPDATES),
         "runner": ("runner", RUNNERS), "period_rule": ("period_rule", PERIOD_RULES)}
"""Part kind -> (the sync key choosing it, its registry)."""

def _resolve(cfg: Any, key: str) -> str:
    value = getattr(cfg, key)
    if key == "runner" and value == "auto":
        return "overlapped" if getattr(cfg, "overlap_steps", 0) != 0 else "blocking"
    if key == "reducer" and value == "auto":
        compression = getattr(cfg, "compression", None)
        if compression is not None and compression.method != "none":
            return "compressed"
        topology = TOPOLOGIES.find(str(cfg.topology))
        return str(getattr(topology, "reducer", "mean"))
    return str(value)


def topology_gossips(cfg: Any) -> bool | None:
    """Whether ``sync.topology`` names a gossip graph (neighbours only, no exact average);
    None when it names no known topology (that is reported on its own)."""
    topology = TOPOLOGIES.find(str(cfg.topology))
    return None if topology is None else bool(getattr(topology, "gossip", False))


SECTION = Section("sync", SyncCommon, {key: reg for key, reg in PART_KINDS.values()},
                  resolve=_resolve, combine=capability_problems)
