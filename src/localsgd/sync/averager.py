"""One sync of a list of tensors, as separate steps a part can replace one at a time.

bucketing (``Bucketer``) -> the collective (the reducer) -> byte and time counting (the
meter) -> the consensus distance -> applying the result (the update). Only parameters are
measured and given the recipe's update; buffers and momentum that travel with them are
copied.

``average`` does all of it at once through one bucket of memory: one ``cat`` fills it, one
call copies a plain average back, and the consensus distance is one sum of squares per
bucket over its parameters (taken before the reduction from the bucket's parameter part),
left on the device as a ``Distance`` until it is logged, so a sync makes no host read.
``start`` / ``complete`` / ``apply`` split it for syncs that run behind local steps:
``start`` snapshots the tensors and launches the same collectives (same buckets, so the
same calls and bytes), ``complete`` waits for them, and ``apply`` adds the sync's effect on
the snapshot to the tensors as they are by then: theta <- theta + (update(snapshot,
reduced) - snapshot), which keeps the local progress made meanwhile. That costs two copies
of what travels (the snapshot and the buffer being reduced).

A reducer that is not ``exact`` (gossip) returns a neighbourhood's mix, not the mean: the
distance to it is no consensus distance, so those syncs report nan, unless the job measured
the true one (``distance``: one exact reduction that only reads).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from localsgd.sync.accounting import CommMeter
from localsgd.sync.anchor import Anchor
from localsgd.sync.buckets import Bucketer, Slice, flat_view, floating_groups
from localsgd.sync.reducers.base import DELTA


@dataclass
class InFlight:
    """A sync started by ``Averager.start``: per dtype/device, the snapshot and the buffer
    being reduced, and the collectives still running."""

    kind: str
    size: int
    sizes: list[int]
    """numel of every tensor handed to ``start``, in order."""
    snapshots: list[torch.Tensor]
    reduced: list[torch.Tensor]
    members: list[list[int]]
    """For each snapshot: the indices of the tensors concatenated into it, in order."""
    started: float = field(default_factory=time.perf_counter)
    works: list[tuple[Any, torch.Tensor, Any]] = field(default_factory=list)
    """(work, the chunk it reduces in place, the reducer that finishes it)."""
    done: bool = False
    measured: float | None = None
    """The consensus distance measured when the sync started (a reducer that is not exact)."""
    deltas: list[bool] = field(default_factory=list)
    """For each snapshot: whether its buffer carries Delta = anchor - snapshot (a reducer
    that carries pseudo-gradients) rather than the snapshot itself."""
    launched: int = -1
    """Steps completed when it was started (the snapshot's step)."""

    @property
    def nbytes(self) -> int:
        """Memory it holds: the snapshots and the buffers being reduced."""
        return sum(t.numel() * t.element_size() for t in [*self.snapshots, *self.reduced])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "size": self.size, "sizes": self.sizes,
                "snapshots": self.snapshots, "reduced": self.reduced,
                "members": self.members, "measured": self.measured, "deltas": self.deltas,
                "launched": self.launched}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> InFlight:
        return cls(state["kind"], int(state["size"]), list(state["sizes"]),
                   list(state["snapshots"]), list(state["reduced"]),
                   [list(m) for m in state["members"]], done=True,
                   measured=state.get("measured"),
                   deltas=list(state.get("deltas", [False] * len(state["members"]))),
                   launched=int(state.get("launched", -1)))


class Distance:
    """A consensus distance not yet read: the squared distance of each bucket, as a
    tensor on the device. A sync launches its few ops and goes on; the host reads the
    value (one transfer per bucket) only when something asks for it (``float``)."""

    def __init__(self, squares: list[torch.Tensor]) -> None:
        self.squares = squares
        self.value: float | None = None

    def __float__(self) -> float:
        if self.value is None:
            sq = 0.0
            for t in self.squares:
                sq += float(t)
            self.value, self.squares = math.sqrt(sq), []
        return self.value


class Averager:
    def __init__(self, meter: CommMeter, bucketer: Bucketer, reducer: Any,
                 anchor: Anchor | None = None) -> None:
        self.meter = meter
        self.bucketer = bucketer
        self.reducer = reducer
        self.measures: bool = getattr(reducer, "exact", True)
        """Whether a sync through this reducer gives the consensus distance (an exact one)."""
        self.anchor = anchor
        """The sync's anchor, which a reducer carrying pseudo-gradients needs."""

    def average(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None,
                size: int, kind: str = "average", params: int = 0, update: Any = None,
                out: list[torch.Tensor] | None = None) -> float:
        """Reduce ``tensors`` over ``group`` (``size`` workers); results go in place or into
        ``out`` (one to one). The first ``params`` tensors get ``update`` (None: a copy of the
        average), the rest a copy.

        Returns this worker's Euclidean distance from the average over those ``params``.
        """
        return float(self.average_lazily(tensors, group, size, kind, params, update, out))

    def average_lazily(self, tensors: list[torch.Tensor], group: dist.ProcessGroup | None,
                       size: int, kind: str = "average", params: int = 0, update: Any = None,
                       out: list[torch.Tensor] | None = None) -> Distance | float:
        """``average``, with the distance left on the device until it is read."""
        targets = out if out is not None else tensors
        if len(targets) != len(tensors):
            raise ValueError("out must match tensors one to one")
        # Elements travel in memory order (``flat_view``), so a target must be laid out like
        # its source for element k to land where it came from.
        if out is not None and any(t.is_floating_point() and t.stride() != s.stride()
                                   for t, s in zip(targets, tensors, strict=True)):
            raise ValueError("out must have the memory layout of tensors (e.g. both "
                             "channels_last)")
        if self.reducer.carries == DELTA:
            dst = [flat_view(t.detach()) for t in targets]
            self._average_delta(tensors, group, size, self.reducer.kind(kind), update, dst)
            return math.nan
        # In place, a slice's target is its own ``local`` view, which the bucket made.
        dst = [flat_view(t.detach()) for t in out] if out is not None else None
        measures = self.measures
        copies = update is None or getattr(update, "copies", False)
        squares: list[torch.Tensor] = []
        kind = self.reducer.kind(kind)
        for bucket in self.bucketer.fill(tensors):
            # Parameters come first in every bucket (``tensors`` lists them first).
            n_params = sum([s.packed.numel() for s in bucket.slices if s.index < params])
            before = bucket.flat[:n_params].clone() if measures and n_params else None
            result = self._reduce(bucket, group, size, kind)
            if before is not None:
                squares.append(before.sub_(result[:n_params]).double().square_().sum())
            reduced = result.split([s.packed.numel() for s in bucket.slices])
            outs = [s.local for s in bucket.slices] if dst is None else [
                dst[s.index] if p.numel() == dst[s.index].numel() else
                dst[s.index][s.start:s.start + p.numel()]
                for s, p in zip(bucket.slices, reduced, strict=True)]
            if copies:
                torch._foreach_copy_(outs, reduced)
                continue
            for s, mean, target in zip(bucket.slices, reduced, outs, strict=True):
                if s.index < params:
                    update.apply(s.index, s.start, s.local, mean, target)
                else:
                    target.copy_(mean)
        if not measures:
            return math.nan
        return Distance(squares)

    def _reduce(self, bucket: Any, group: Any, size: int, kind: str) -> torch.Tensor:
        """One bucket through the reducer, launched and landed, counted under ``kind``."""
        nbytes = self.reducer.payload_bytes(bucket.flat, group, bucket.slices)
        # ``meter.timed`` by hand: its context manager costs six Python calls a bucket.
        started = time.perf_counter()
        work = self.reducer.start(bucket.flat, group, bucket.slices)
        result = self.reducer.finish(work, bucket.flat, size)
        elapsed = time.perf_counter() - started
        self.meter.record(kind, nbytes, elapsed, wait_s=elapsed)
        return result

    def _average_delta(self, params: list[torch.Tensor], group: Any, size: int, kind: str,
                       update: Any, dst: list[torch.Tensor]) -> None:
        """The bucket holds Delta = anchor - theta (parameters only); the reducer returns
        its reduced Delta, which the update applies and moves the anchor by."""
        if self.anchor is None or not self.anchor or update is None:
            raise RuntimeError("a reducer carrying pseudo-gradients needs the sync's anchor "
                               "and an update; the controller takes both before a sync")
        anchor = self.anchor.tensors
        for bucket in self.bucketer.fill(params):
            for s in bucket.slices:
                a = anchor[s.index][s.start:s.start + s.packed.numel()]
                torch.sub(a.to(s.packed.device), s.packed, out=s.packed)
            result = self._reduce(bucket, group, size, kind)
            for s in bucket.slices:
                n = s.local.numel()
                update.apply_delta(s.index, s.start, s.local, result[s.pos:s.pos + n],
                                   anchor[s.index][s.start:s.start + n],
                                   dst[s.index][s.start:s.start + n])

    def _distance(self, sq: float) -> float:
        return math.sqrt(sq) if self.measures else math.nan

    def distance(self, params: list[torch.Tensor], group: Any, size: int,
                 kind: str = "consensus") -> float:
        """This worker's distance from the exact average of ``params`` over ``group``,
        which stay untouched (the reducer must be exact)."""
        sq = 0.0
        for bucket in self.bucketer.fill(params):
            with self.meter.timed(kind, self.reducer.payload_bytes(bucket.flat, group)):
                work = self.reducer.start(bucket.flat, group)
                result = self.reducer.finish(work, bucket.flat, size)
            for s in bucket.slices:
                sq += squared_distance(s.local, result[s.pos:s.pos + s.local.numel()])
        return math.sqrt(sq)

    def start(self, tensors: list[torch.Tensor], group: Any, size: int,
              kind: str = "average", select: Collection[int] | None = None, params: int = 0,
              rest: Any = None) -> InFlight:
        """Snapshot ``tensors`` (those with an index in ``select``, default all) and launch
        their reduction over ``group``; returns at once. With a reducer that carries
        pseudo-gradients, the first ``params`` tensors travel as anchor - snapshot and the
        others through the reducer ``rest`` (an exact mean)."""
        flight = InFlight(self.reducer.kind(kind), size, [t.numel() for t in tensors], [], [],
                          [])
        delta = self.reducer.carries == DELTA
        for (dtype, _device), idx in floating_groups(tensors, select).items():
            runs = ([([i for i in idx if i < params], True), ([i for i in idx if i >= params],
                                                              False)] if delta else [(idx, False)])
            for members, is_delta in runs:
                if sum(tensors[i].numel() for i in members) == 0:
                    continue  # nothing to send (the blocking path makes no call either)
                snap = torch.cat([flat_view(tensors[i].detach()) for i in members])
                if is_delta:
                    if self.anchor is None or not self.anchor:
                        raise RuntimeError("a reducer carrying pseudo-gradients needs the "
                                           "sync's anchor before its first sync")
                    buf = torch.cat([self.anchor.tensors[i] for i in members]).to(snap.device)
                    buf.sub_(snap)
                else:
                    buf = snap.clone()
                reducer = self.reducer if is_delta or not delta else rest
                flight.snapshots.append(snap)
                flight.reduced.append(buf)
                flight.members.append(members)
                flight.deltas.append(is_delta)
                offset = 0
                for chunk in buf.split(self.bucketer.capacity(dtype)):
                    # Reducers with state per tensor slice key it as the blocking path does.
                    slices = chunk_slices(members, flight.sizes, offset, chunk, snap)
                    offset += chunk.numel()
                    self.meter.record(flight.kind, reducer.payload_bytes(chunk, group, slices))
                    flight.works.append((reducer.start(chunk, group, slices), chunk, reducer))
        return flight

    def complete(self, flight: InFlight) -> None:
        """Wait for the collectives of ``flight``; the reduced values are then in place."""
        if flight.done:
            return
        waited = time.perf_counter()
        for work, chunk, reducer in flight.works:
            result = reducer.finish(work, chunk, flight.size)
            if result is not chunk:
                chunk.copy_(result)
        now = time.perf_counter()
        self.meter.record(flight.kind, 0, now - flight.started, calls=0, wait_s=now - waited)
        flight.works = []
        flight.done = True


    def apply(self, flight: InFlight, tensors: list[torch.Tensor], params: int = 0,
               update: Any = None, averaged: range = range(0),
               decays: dict[int, float] | None = None) -> float:
        """Complete ``flight`` and add its effect to ``tensors`` (the ones given to ``start``);
        returns the consensus distance of the snapshot. Tensors with an index in
        ``averaged`` (BatchNorm statistics) take the snapshots' average instead of a
        correction, which could push a running variance below zero; those in ``decays``
        (moving averages) take the correction scaled by their factor."""
        decays = decays or {}
        if [t.numel() for t in tensors] != flight.sizes:
            raise ValueError("tensors do not match the ones the sync was started with")
        self.complete(flight)
        sq = 0.0
        deltas = flight.deltas or [False] * len(flight.members)
        for snap, red, idx, is_delta in zip(flight.snapshots, flight.reduced, flight.members,
                                            deltas, strict=True):
            pos = 0
            for i in idx:
                n = flight.sizes[i]
                live = flat_view(tensors[i].detach())
                # A checkpoint restores snapshots on the CPU; the model may live on a GPU.
                local = snap[pos:pos + n].to(live.device)
                mean = red[pos:pos + n].to(live.device)
                if is_delta:
                    if update is None or self.anchor is None:
                        raise RuntimeError("a pseudo-gradient in flight lands through the "
                                           "update, on the sync's anchor")
                    synced = torch.empty_like(local)
                    update.apply_delta(i, 0, local, mean, self.anchor.tensors[i], synced)
                    live.add_(synced.sub_(local))
                    pos += n
                    continue
                if i < params:
                    sq += squared_distance(local, mean)
                if i < params and update is not None:
                    synced = torch.empty_like(local)
                    update.apply(i, 0, local, mean, synced)
                    live.add_(synced.sub_(local))
                elif i in averaged:
                    live.copy_(mean)
                elif i in decays:
                    live.add_(mean - local, alpha=decays[i])
                else:
                    live.add_(mean - local)
                pos += n
        if flight.measured is not None:
            return flight.measured
        return self._distance(sq)


def chunk_slices(members: list[int], sizes: list[int], offset: int, chunk: torch.Tensor,
                 snap: torch.Tensor) -> list[Slice]:
    """The parameter slices of ``chunk``, which starts ``offset`` elements into a buffer of
    ``members`` laid end to end: what a reducer of pseudo-gradients keys its codec and
    residuals by, as the blocking path's buckets."""
    out, pos, end = [], 0, offset + chunk.numel()
    for i in members:
        lo, hi = max(pos, offset), min(pos + sizes[i], end)
        if lo < hi:
            out.append(Slice(i, lo - pos, lo - offset, snap[lo:hi], chunk[lo - offset:hi - offset]))
        pos += sizes[i]
    return out


def squared_distance(local: torch.Tensor, mean: torch.Tensor) -> float:
    """||local - mean||^2 in float64: the consensus distance, summed slice by slice."""
    return float(torch.sub(local, mean).double().pow(2).sum())
