"""Drives the sync parts on whatever engine holds the model; owns the one step counter.

After each optimizer step the controller asks the schedule whether a sync is due and over
which scope, picks the tensors (parameters, then buffers and momentum as the recipe says)
from the engine's ``SyncTarget``, and hands the sync to the runner. The topology, reducer,
update and runner are chosen by name from their registries; the controller never branches
on which ones they are. Observers see every step and sync without patching anything.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from localsgd.launch.env import DistInfo
from localsgd.sync.accounting import CommMeter
from localsgd.sync.anchor import Anchor
from localsgd.sync.averager import Averager, Distance, InFlight
from localsgd.sync.buckets import Bucketer, flat_view
from localsgd.sync.parts import PART_KINDS, REDUCERS, SECTION, MomentumPolicy, state_on_cpu
from localsgd.sync.reducers.base import DELTA, Reducer
from localsgd.sync.resume import ResumeCheck, changed_keys, check_parts, record
from localsgd.sync.schedules.base import GLOBAL, LOCAL, MINIBATCH, Schedule
from localsgd.sync.sharding import local
from localsgd.sync.topologies.base import Topology
from localsgd.sync.updates.base import Update


class SyncTarget(Protocol):
    """What an engine shows the controller. The lists may be the same objects at every
    ask (an engine lists its tensors once): callers read them and write into the tensors,
    never change the lists."""

    def sync_params(self) -> list[torch.Tensor]:
        """Tensors that define the model: for mixed precision, the fp32 master copy."""
        ...

    def sync_buffers(self) -> list[torch.Tensor]:
        """Module buffers (BatchNorm running statistics)."""
        ...

    def momentum_buffers(self) -> list[torch.Tensor]:
        """Optimizer momentum tensors."""
        ...

    def momentum_decays(self) -> list[float | None]:
        """Per momentum tensor: the factor one optimizer step scales it by when it is an
        exponential moving average (Adam's beta1, beta2), else None (SGD's momentum)."""
        ...

    def after_params_changed(self) -> None:
        """Called after params were overwritten (engines with low-precision copies refresh)."""
        ...


class SyncObserver:
    """Sees the controller's work from outside (tests, probes, fault injection)."""

    def before_sync(self, step: int, action: str, target: SyncTarget) -> None:
        pass

    def after_sync(self, step: int, action: str, distance: float, target: SyncTarget) -> None:
        pass

    def after_step(self, step: int, action: str | None, target: SyncTarget) -> None:
        pass


@dataclass
class SyncEvent:
    step: int
    action: str
    measured: float | Distance
    """What the sync measured, read on the host only when ``distance`` is first asked for
    (the log of the epoch's syncs), so a sync never waits for the device."""

    @property
    def distance(self) -> float:
        """This worker's ||theta_i - theta_avg|| just before the average."""
        return float(self.measured)


class SyncJob:
    """One sync of ``target`` over ``action``'s scope, as the runner carries it out: all at
    once (``run``), or launched now (``start``) and applied later (``apply``)."""

    def __init__(self, ctl: SyncController, target: SyncTarget, action: str,
                 final: bool = False) -> None:
        self.ctl, self.target, self.action, self.final = ctl, target, action, final
        self.step = ctl.step
        """Steps completed when the sync was due (its snapshot, for an overlapped runner)."""

    def _update(self) -> Any:
        """The recipe's update for a global sync; intra-node averages are plain copies."""
        if self.action != GLOBAL:
            return None
        if self.ctl.begins:  # the learning rate costs a scheduler step the first time
            self.ctl.update.begin(self.step, self.ctl.inner_lr(self.step))
        return self.ctl.update

    def tensors(self) -> tuple[list[torch.Tensor], int, range]:
        """What travels (parameters, then buffers, then momentum), how many of them are
        parameters, and where the buffers are."""
        params = self.target.sync_params()
        tensors = list(params)
        if self.ctl.cfg.average_buffers or self.final:
            tensors += self.target.sync_buffers()
        buffers = range(len(params), len(tensors))
        if self.ctl.cfg.momentum == MomentumPolicy.average:
            tensors += self.target.momentum_buffers()
        return tensors, len(params), buffers

    def _applied(self) -> None:
        if self.ctl.cfg.momentum == MomentumPolicy.reset:
            for m in self.target.momentum_buffers():
                m.zero_()
        self.target.after_params_changed()

    def _measured(self) -> float | None:
        """The exact consensus distance, measured apart when the sync itself cannot give it
        (gossip) and the topology says one is due."""
        if self.final or not self.ctl.topology.mixes(self.action) or not self.ctl.measure_now():
            return None
        return self.ctl.exact.distance(self.target.sync_params(), *self.ctl.topology.everyone())

    def run(self) -> float | Distance:
        tensors, params, _ = self.tensors()
        measured = self._measured()
        # The last average of a run is exact whatever the topology or reducer (the saved
        # model is the consensus), and so are intra-node averages (compression is for the
        # links between nodes) and the exact rounds of gossip (``sync.exact_every``).
        exact = self.final or not self.ctl.topology.mixes(self.action)
        averager = self.ctl.exact if exact else self.ctl.averager
        group = self.ctl.topology.everyone() if self.final else self.ctl.topology.group(
            self.action)
        if not exact and self.ctl.reducer.carries == DELTA:
            distance = averager.average_lazily(tensors[:params], *group, params=params,
                                               update=self._update())
            if len(tensors) > params:
                self.ctl.exact.average(tensors[params:], *group)
        else:
            distance = averager.average_lazily(tensors, *group, params=params,
                                               update=self._update())
        if self.action == GLOBAL and self.ctl.anchor is not None:
            self.ctl.anchor.step = self.step  # the update moved it to this sync's result
        if exact and self.action == GLOBAL:
            self.ctl.agreed = self.step
        self._applied()
        return distance if measured is None else measured

    def _averager(self) -> Averager:
        """Intra-node averages are exact (compression is for the links between nodes), as
        are the exact rounds of gossip."""
        return self.ctl.averager if self.ctl.topology.mixes(self.action) else self.ctl.exact

    def start(self, select: Collection[int] | None = None) -> InFlight:
        """Launch the average of the tensors with an index in ``select`` (default all)."""
        measured = self._measured()
        tensors, params, _ = self.tensors()
        flight = self._averager().start(tensors, *self.ctl.topology.group(self.action),
                                        select=select, params=params,
                                        rest=self.ctl.exact.reducer)
        flight.measured = measured
        flight.launched = self.step
        return flight

    def _decays(self, flight: InFlight, first: int) -> dict[int, float]:
        """Averaged moments that are moving averages (AdamW's) take the correction scaled by
        beta^tau, tau the optimizer steps since the snapshot: exactly what replacing them by
        the average at the snapshot and taking those steps would give, and never a negative
        second moment (the unscaled correction could give one)."""
        if self.ctl.cfg.momentum != MomentumPolicy.average or flight.launched < 0:
            return {}
        tau = self.step - flight.launched
        return {first + i: beta ** tau
                for i, beta in enumerate(self.target.momentum_decays()) if beta is not None}

    def apply(self, flight: InFlight) -> float:
        tensors, params, buffers = self.tensors()
        distance = self._averager().apply(flight, tensors, params, self._update(), buffers,
                                          self._decays(flight, buffers.stop))
        if self.action == GLOBAL and self.ctl.anchor is not None:
            self.ctl.anchor.step = self.step
        self._applied()
        return distance


class SyncController:
    def __init__(self, cfg: Any, schedule: Schedule, info: DistInfo, meter: CommMeter,
                 observers: list[SyncObserver] | None = None,
                 lr_at: Callable[[int], float] | None = None) -> None:
        self.cfg = cfg
        self.lr_at = lr_at
        """The learning rate of each step index (``train.optim.LRCurve``), for parts that
        depend on it (outer optimizers, the QSR period rule)."""
        self.info = info
        self.meter = meter
        self.observers = list(observers or [])
        self.step = 0
        """Optimizer steps completed: the only counter; saved in checkpoints."""
        self.events: list[SyncEvent] = []
        chosen = {kind: reg.get(SECTION.name_of(cfg, key))
                  for kind, (key, reg) in PART_KINDS.items()}
        self.period_rule = chosen["period_rule"](cfg, lr_at)
        self.schedule = schedule.with_rule(self.period_rule)
        self.topology: Topology = chosen["topology"](cfg, info, schedule.scopes)
        self.reducer: Reducer = chosen["reducer"](cfg)
        self.update: Update = chosen["update"](cfg)
        self.anchor: Anchor | None = None
        """The model of the last global sync, kept only when a chosen part uses it."""
        if self.reducer.uses_anchor or self.update.uses_anchor:
            self.anchor = Anchor(self.update.anchor_on_cpu or state_on_cpu(cfg.state_device))
            self.reducer.bind(self.anchor)
            self.update.bind(self.anchor)
        self.averager = Averager(meter, Bucketer(cfg.bucket_mb), self.reducer, self.anchor)
        self.exact = self.averager
        """Forms the exact average over ``topology.everyone()`` (evaluation, the final model,
        measurements): the sync averager itself when its reducer is exact."""
        if not self.reducer.exact:
            mean = REDUCERS.get(self.topology.mean_reducer)(cfg)
            self.exact = Averager(meter, self.averager.bucketer, mean)
        self.finished = False
        """Whether ``finish`` has taken the final average (everyone then agrees)."""
        self.agreed = -1
        """The step after which a blocking exact sync of a gossip topology last landed."""
        self.measured_syncs = 0
        """Global syncs started by a reducer that is not exact (gossip): every
        ``sync.consensus_every``-th one measures the true consensus distance."""
        self.runner = chosen["runner"](cfg, self.averager)
        self.resumed: tuple[int, bool] | None = None
        """(step, whether the workers agreed then) of the checkpoint this run resumed from:
        a fact of the checkpoint, which a recipe with other sync steps would misjudge."""
        self.keeps_consensus = (self.anchor is not None
                                or type(self.update).at_consensus is not Update.at_consensus)
        """Whether a part takes the agreed model at consensus (``_at_consensus`` has work)."""
        self.begins = type(self.update).begin is not Update.begin
        """Whether the update hears when a global sync begins."""
        self._job_for: tuple[SyncTarget | None, Callable[[str], SyncJob] | None] = (None, None)
        self.parts: dict[str, Any] = {"schedule": self.schedule, "topology": self.topology,
                                      "reducer": self.reducer, "update": self.update,
                                      "runner": self.runner, "period_rule": self.period_rule}

    @staticmethod
    def schedule_for(cfg: Any, steps_per_epoch: int) -> Schedule:
        """The schedule ``sync.algorithm`` names, for ``steps_per_epoch`` optimizer steps."""
        return PART_KINDS["schedule"][1].get(cfg.algorithm).from_config(cfg, steps_per_epoch)

    @classmethod
    def build(cls, cfg: Any, info: DistInfo, meter: CommMeter, steps_per_epoch: int,
              observers: list[SyncObserver] | None = None,
              lr_at: Callable[[int], float] | None = None) -> SyncController:
        """The controller for the ``sync`` section ``cfg``."""
        return cls(cfg, cls.schedule_for(cfg, steps_per_epoch), info, meter, observers, lr_at)

    def inner_lr(self, steps_done: int) -> float:
        """The learning rate of the last step before ``steps_done`` steps had completed."""
        return self.lr_at(max(steps_done - 1, 0)) if self.lr_at is not None else 1.0

    def begin(self, target: SyncTarget) -> None:
        """Call once before the first step (and after a resume): parts that keep the last
        agreed model (outer optimizers) take it now if local steps follow."""
        if self.info.world_size > 1:
            self._at_consensus(target)

    def _at_consensus(self, target: SyncTarget) -> None:
        if not self.keeps_consensus:
            return
        if self.schedule.phase(self.step) == LOCAL and self.in_consensus():
            params = target.sync_params()
            if self.anchor is not None:
                self.anchor.take(self.step, params)
            self.update.at_consensus(self.step, params)

    def measure_now(self) -> bool:
        """Count a global sync; whether it must measure its consensus distance apart (its
        reducer does not form the exact average, and ``sync.consensus_every`` says so)."""
        every = getattr(self.cfg, "consensus_every", 0)
        if self.reducer.exact or every <= 0:
            return False
        self.measured_syncs += 1
        return (self.measured_syncs - 1) % every == 0

    def grad_sync(self) -> bool:
        return self.schedule.grad_sync(self.step)

    def in_consensus(self) -> bool:
        """Whether all workers hold identical parameters now."""
        if self.finished:
            return True
        if self.resumed is not None and self.resumed[0] == self.step:
            return self.resumed[1]
        if self.topology.gossip:
            # Gossip brings workers closer but never together; only its exact rounds do.
            return (self.step == 0 or self.schedule.phase(self.step - 1) == MINIBATCH
                    or self.agreed == self.step)
        return self.runner.in_consensus(self.schedule, self.step)

    def _record(self, done: list[tuple[int, str, float | Distance]],
                target: SyncTarget) -> None:
        # An engine holding shards measures its shard's distance; it knows the whole's.
        whole = getattr(target, "whole_distance", None)
        # Only observers that listen to syncs make the host read the distance now.
        listening = [o for o in self.observers
                     if type(o).after_sync is not SyncObserver.after_sync]
        for step, action, distance in done:
            distance = whole(float(distance)) if whole is not None else distance
            self.events.append(SyncEvent(step, action, distance))
            for o in listening:
                o.after_sync(step, action, float(distance), target)

    def _jobs(self, target: SyncTarget) -> Callable[[str], SyncJob]:
        """``job(action)``: a sync of ``target``; one function kept per target, not one
        made at every step."""
        held, job = self._job_for
        if held is not target or job is None:
            job = functools.partial(SyncJob, self, target)
            self._job_for = (target, job)
        return job

    def after_step(self, target: SyncTarget) -> str | None:
        """Count the optimizer step just taken, apply syncs that are due, start a new one if
        the schedule says so."""
        self.step += 1
        done = self.runner.poll(self.step, self._jobs(target))
        if done:
            self._record(done, target)
        action = self.schedule.action_after(self.step)
        if action is not None and self.info.world_size > 1:
            action = self.topology.round(action)
            for o in self.observers:
                o.before_sync(self.step, action, target)
            self._record(self.runner.submit(self.step, action, SyncJob(self, target, action)),
                         target)
        if self.keeps_consensus and self.info.world_size > 1:
            self._at_consensus(target)
        for o in self.observers:
            o.after_step(self.step, action, target)
        return action

    def finish(self, target: SyncTarget) -> None:
        """Final global average, buffers included, so the saved model is the consensus."""
        if self.info.world_size == 1:
            return
        self._record(self.runner.drain(self._jobs(target)), target)
        if self.in_consensus():
            # Parameters already agree; BatchNorm statistics never do under mini-batch SGD.
            self.exact.average(target.sync_buffers(), *self.topology.everyone())
            self.finished = True
            return
        for o in self.observers:
            o.before_sync(self.step, GLOBAL, target)
        if self.reducer.sync_point_views:
            # A compressed run ends with one more compressed sync (everyone then agrees on
            # its result); only the BatchNorm statistics take the exact mean.
            distance = SyncJob(self, target, GLOBAL).run()
            if not self.cfg.average_buffers:
                self.exact.average(target.sync_buffers(), *self.topology.everyone())
        else:
            distance = SyncJob(self, target, GLOBAL, final=True).run()
        self.finished = True
        self._record([(self.step, "final", distance)], target)

    def averaged_copy(self, target: SyncTarget, out: nn.Module) -> None:
        """Write the average of all workers' models into ``out``; the workers are untouched."""
        src_params = target.sync_params()
        with torch.no_grad():  # a sharded copy: write into its shards
            dst_params = [local(p) for p in out.parameters()]
        src_buffers = target.sync_buffers()
        dst_buffers = list(out.buffers())
        with torch.no_grad():
            if self.in_consensus():
                for s, d in zip(src_params, dst_params, strict=True):
                    d.copy_(s)
                src, dst = src_buffers, dst_buffers
            elif self.reducer.sync_point_views and self.anchor:
                # The model of the last sync, which every worker holds: no fp32 traffic.
                for a, d in zip(self.anchor.tensors, dst_params, strict=True):
                    flat_view(d.detach()).copy_(a)
                src, dst = src_buffers, dst_buffers
            else:
                src, dst = src_params + src_buffers, dst_params + dst_buffers
            if self.info.world_size > 1:
                self.exact.average(src, *self.topology.everyone(), kind="eval", out=dst)
            else:
                for s, d in zip(src, dst, strict=True):
                    d.copy_(s)

    def extra_memory(self) -> dict[str, int]:
        """What ``extra_bytes`` adds up, by what holds it: averaging buckets, the most an
        overlapped runner kept in flight (snapshots and buffers being reduced), the sync's
        anchor, the update's state (outer momentum) and the reducer's (error-feedback
        residuals)."""
        buckets = sum(b.numel() * b.element_size() for b in self.averager.bucketer.buffers.values())
        return {"buckets": buckets, "in_flight": self.runner.peak_bytes,
                "anchor": self.anchor.nbytes() if self.anchor is not None else 0,
                "update": self.update.held_bytes(), "reducer": self.reducer.held_bytes()}

    def extra_bytes(self) -> int:
        """The most memory syncs held besides the model (``extra_memory``, summed)."""
        return sum(self.extra_memory().values())

    def pop_events(self) -> list[SyncEvent]:
        events, self.events = self.events, []
        return events

    # checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Pending events belong to the epoch in progress; a mid-epoch resume must log them.
        # ``recipe`` and ``consensus`` let a resume with other parts check that they fit.
        # The runner first: it waits for what is in flight, and finishing a collective may
        # move a reducer's state (CHOCO's sums of the neighbours' public copies).
        runner = self.runner.state_dict()
        return {"step": self.step, "measured_syncs": self.measured_syncs,
                "events": [[e.step, e.action, e.distance] for e in self.events],
                "parts": {kind: runner if kind == "runner" else part.state_dict()
                          for kind, part in self.parts.items()},
                "recipe": record(self.cfg), "consensus": self.in_consensus()}

    def _check_resume(self, state: dict[str, Any], step: int, consensus: bool,
                      parts: dict[str, dict[str, Any]], where: Path | str | None) -> None:
        saved = state.get("recipe")
        check = ResumeCheck(step, consensus, changed_keys(saved, record(self.cfg)),
                            self.schedule, dict(saved.get("parts", {})) if saved else {})
        check_parts(self.cfg, self.parts, parts, check, where)

    def load_state_dict(self, state: dict[str, Any],
                        where: Path | str | None = None) -> None:
        """Continue from ``state``; raises ConfigError, before any part loads its state, when
        a part of this recipe cannot continue from what the checkpoint (``where``) holds."""
        step = int(state["step"])
        if "consensus" in state:
            self.resumed = (step, bool(state["consensus"]))
        self.step = step
        self._check_resume(state, step, self.in_consensus(), state.get("parts", {}), where)
        self.measured_syncs = int(state.get("measured_syncs", 0))
        self.events = [SyncEvent(int(s), str(a), float(d)) for s, a, d in state["events"]]
        for kind, part in self.parts.items():
            part.load_state_dict(state.get("parts", {}).get(kind, {}))

    def load_merged(self, states: list[dict[str, Any]], step: int,
                    where: Path | str | None = None) -> None:
        """Continue at ``step`` from the states of a run with another world size: each part
        merges its own states; events of the unfinished epoch are dropped with it."""
        self.step = step
        self.measured_syncs = max((int(s.get("measured_syncs", 0)) for s in states), default=0)
        self.events = []
        merged = {kind: type(part).merge_states([s.get("parts", {}).get(kind, {})
                                                 for s in states])
                  for kind, part in self.parts.items()}
        # The schedule's view decides what begin() rebuilds, so it is the one checked.
        self._check_resume(states[0] if states else {}, step, self.in_consensus(), merged,
                           where)
        for kind, part in self.parts.items():
            part.load_state_dict(merged[kind])
