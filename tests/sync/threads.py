"""In-process workers for the fast tier: K threads, each with its own SyncController.

Test-only parts are registered the way any new part is (one class each, no other edits): a
``threads`` topology whose groups are shared Python objects, a ``threads`` reducer that sums
through them in rank order, and ``threads_ring`` / ``threads_torus`` / ``threads_expander``:
the real gossip topologies with their point-to-point sends carried by a shared mailbox
(the real ``gossip`` reducer mixes what arrives). They stand in for gloo so the controller,
schedules, averager, updates and runners can be run at K = 4 or 8 in milliseconds; the real
``complete`` topology and ``mean`` reducer run under torchrun in tests/integration.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from localsgd.launch.env import DistInfo
from localsgd.registry import Facts
from localsgd.sync.accounting import CommMeter
from localsgd.sync.capabilities import ALL_WORKERS, NODE_GROUPS
from localsgd.sync.controller import SyncController, SyncObserver
from localsgd.sync.parts import REDUCERS, TOPOLOGIES
from localsgd.sync.reducers.compressed import Compressed
from localsgd.sync.reducers.mean import Mean
from localsgd.sync.schedules.base import NODE
from localsgd.sync.topologies.base import Topology
from localsgd.sync.topologies.expander import Expander
from localsgd.sync.topologies.gossip import Neighbourhood
from localsgd.sync.topologies.ring import Ring
from localsgd.sync.topologies.torus import Torus

_rank = threading.local()


class ThreadGroup:
    """A group of threads that can sum a tensor (every member gets the same result)."""

    def __init__(self, ranks: list[int]) -> None:
        self.ranks = ranks
        self.barrier = threading.Barrier(len(ranks))
        self.slots: dict[int, torch.Tensor] = {}
        self.calls: Counter[int] = Counter()
        """Collectives per rank."""

    def all_reduce(self, flat: torch.Tensor) -> None:
        me = _rank.value
        self.slots[me] = flat.clone()
        self.calls[me] += 1
        self.barrier.wait()
        total = self.slots[self.ranks[0]].clone()
        for r in self.ranks[1:]:
            total += self.slots[r]
        self.barrier.wait()
        flat.copy_(total)


    def all_gather(self, flat: torch.Tensor) -> torch.Tensor:
        """Every member's ``flat``, concatenated in rank order."""
        me = _rank.value
        self.slots[me] = flat.clone()
        self.calls[me] += 1
        self.barrier.wait()
        out = torch.cat([self.slots[r] for r in self.ranks])
        self.barrier.wait()
        return out


class Mailbox:
    """Point-to-point messages between threads, keyed (sender, receiver, tag)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.box: dict[tuple[int, int, int], torch.Tensor] = {}
        self.sent: Counter[int] = Counter()
        """Messages per sender."""

    def put(self, key: tuple[int, int, int], t: torch.Tensor) -> None:
        with self.cond:
            self.box[key] = t.clone()
            self.sent[key[0]] += 1
            self.cond.notify_all()

    def take(self, key: tuple[int, int, int]) -> torch.Tensor:
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.box, timeout=30):
                raise TimeoutError(f"no message {key}")
            return self.box.pop(key)


@dataclass
class World:
    size: int
    local_size: int
    everyone: ThreadGroup = field(init=False)
    nodes: list[ThreadGroup] = field(init=False)
    mailbox: Mailbox = field(init=False)

    def __post_init__(self) -> None:
        self.mailbox = Mailbox()
        self.everyone = ThreadGroup(list(range(self.size)))
        self.nodes = [ThreadGroup(list(range(n, n + self.local_size)))
                      for n in range(0, self.size, self.local_size)]


_world: World | None = None


@TOPOLOGIES.register
class Threads(Topology):
    name = "threads"
    mean_reducer = "threads"
    """Parts that form no exact average (compressed) take the exact one through this."""

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({ALL_WORKERS, NODE_GROUPS})

    def __init__(self, cfg: Any, info: DistInfo, scopes: tuple[str, ...]) -> None:
        assert _world is not None
        self.world = _world
        self.info = info

    def group(self, scope: str) -> tuple[ThreadGroup, int]:
        if scope == NODE:
            g = self.world.nodes[self.info.rank // self.info.local_world_size]
        else:
            g = self.world.everyone
        return g, len(g.ranks)


    def everyone(self) -> tuple[ThreadGroup, int]:
        return self.world.everyone, len(self.world.everyone.ranks)


@dataclass
class ThreadExchange:
    hood: Neighbourhood
    keys: list[tuple[int, int, int]]
    mailbox: Mailbox

    def wait(self) -> list[torch.Tensor]:
        return [self.mailbox.take(k) for k in self.keys]


@dataclass
class ThreadNeighbourhood(Neighbourhood):
    def exchange(self, flat: torch.Tensor) -> ThreadExchange:
        assert _world is not None
        tag = self.sent
        self.sent += 1
        for peer in self.peers:
            _world.mailbox.put((self.rank, peer, tag), flat)
        return ThreadExchange(self, [(p, self.rank, tag) for p in self.peers], _world.mailbox)


def _threaded(base: type) -> type:
    class Threaded(base):  # type: ignore[valid-type, misc]
        name = f"threads_{base.name}"
        mean_reducer = "threads"

        def _neighbourhood(self, w: Any, rank: int) -> Any:
            hood = Neighbourhood.of(w, rank)
            return ThreadNeighbourhood(hood.rank, hood.self_weight, hood.peers, hood.weights)

        def everyone(self) -> tuple[ThreadGroup, int]:
            assert _world is not None
            return _world.everyone, _world.size

    return TOPOLOGIES.register(Threaded)


for _base in (Ring, Torus, Expander):
    _threaded(_base)


@REDUCERS.register
class ThreadSum(Mean):
    name = "threads"

    def start(self, flat: torch.Tensor, group: Any, slices: Any = None) -> Any:
        group.all_reduce(flat)
        return None


class ThreadGather:
    """A finished all-gather (the thread world gathers at once)."""

    def wait(self) -> None:
        pass


@REDUCERS.register
class ThreadCompressed(Compressed):
    """The real compressed reducer, its payload bytes all-gathered through the threads."""

    name = "threads_compressed"

    def gather(self, payload: Any, group: Any) -> tuple[Any, torch.Tensor]:
        flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in payload.tensors])
        return ThreadGather(), group.all_gather(flat)


SEGMENTS = [(0, 40), (40, 61), (61, 66)]
"""Flat offsets of FakeTarget's default parameters, shapes (40,), (7, 3) and (5,)."""


def ring_mixing(k: int) -> np.ndarray:
    """numpy's mixing matrix of a ring of k workers: 1/3 for itself and each neighbour."""
    w = np.zeros((k, k))
    for i in range(k):
        for d in (-1, 0, 1):
            w[i, (i + d) % k] += 1 / 3
    return w


def scaled_sign(m: np.ndarray) -> np.ndarray:
    """numpy's scaled sign of a flat FakeTarget model: mean |m| x sign(m) per parameter."""
    out = np.empty_like(m)
    for a, b in SEGMENTS:
        scale = np.float32(np.abs(m[a:b]).mean())
        out[a:b] = float(scale) * np.where(m[a:b] >= 0, 1.0, -1.0)
    return out


class FakeTarget:
    """A model without a model: parameters, buffers and momentum that drift per rank."""

    def __init__(self, rank: int, shapes: list[tuple[int, ...]] | None = None,
                 distinct: bool = False, channels_last: bool = False) -> None:
        shapes = shapes or [(40,), (7, 3), (5,)]
        # Identical start on every rank, unless asked to differ (gossip without training).
        g = torch.Generator().manual_seed(1000 + rank if distinct else 0)
        self.rank = rank
        self.params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
        if channels_last:  # 4-D tensors as a channels_last model holds its conv weights
            self.params = [p.contiguous(memory_format=torch.channels_last) if p.dim() == 4
                           else p for p in self.params]
        self.buffers = [torch.zeros(3, dtype=torch.float64), torch.zeros((), dtype=torch.long)]
        self.momentum = [torch.zeros_like(p) for p in self.params]
        self.refreshed = 0

    def local_step(self, step: int) -> None:
        """A rank-dependent step of heavy-ball SGD on a made-up gradient."""
        for p, m in zip(self.params, self.momentum, strict=True):
            grad = torch.sin(p * (self.rank + 1) + step)
            m.mul_(0.9).add_(grad)
            p.sub_(0.1 * m)
        self.buffers[0].add_(self.rank + step)
        self.buffers[1].add_(1)

    def sync_params(self) -> list[torch.Tensor]:
        return self.params

    def sync_buffers(self) -> list[torch.Tensor]:
        return self.buffers

    def momentum_buffers(self) -> list[torch.Tensor]:
        return self.momentum

    def momentum_decays(self) -> list[float | None]:
        return [None] * len(self.momentum)  # heavy-ball sums, as SGD's

    def after_params_changed(self) -> None:
        self.refreshed += 1

    def tensors(self) -> list[torch.Tensor]:
        return [*self.params, *self.buffers, *self.momentum]

    def whole(self) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).double() for t in self.tensors()])

    def flat(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params])


@dataclass
class Worker:
    rank: int
    target: FakeTarget
    controller: SyncController
    meter: CommMeter
    before: list[torch.Tensor] = field(default_factory=list)
    """Flat parameters before each step's sync (after its local step)."""
    after: list[torch.Tensor] = field(default_factory=list)
    """Flat parameters after each step."""
    whole_before: list[torch.Tensor] = field(default_factory=list)
    """Every tensor (parameters, buffers, momentum) before each step's sync, as float64."""
    whole_after: list[torch.Tensor] = field(default_factory=list)


def run_workers(cfg: Any, steps: int, world: int = 4, local_world: int = 2,
                observers: Callable[[int], list[SyncObserver]] | None = None,
                finish: bool = False,
                between: Callable[[Worker, int], None] | None = None,
                resume: dict[int, tuple[dict[str, Any], list[torch.Tensor]]] | None = None,
                lr_at: Callable[[int], float] | None = None,
                train: bool = True, shapes: list[tuple[int, ...]] | None = None,
                target: Callable[[int], FakeTarget] | None = None,
                ) -> tuple[list[Worker], World]:
    """Run ``steps`` steps on ``world`` thread workers (nodes of ``local_world``).

    ``resume`` gives each rank a controller state and the target's tensors (parameters,
    buffers, momentum) to continue from, as a checkpoint would. ``train=False`` takes no
    local steps and starts every rank from different parameters (``shapes``), so that only
    the syncs move them. ``target`` makes each rank's FakeTarget.
    """
    global _world
    _world = World(world, local_world)
    workers: list[Worker | None] = [None] * world
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        _rank.value = rank
        try:
            info = DistInfo(rank, world, rank % local_world, local_world,
                            torch.device("cpu"), "threads")
            meter = CommMeter()
            ctl = SyncController.build(cfg, info, meter, steps_per_epoch=10,
                                       observers=observers(rank) if observers else None,
                                       lr_at=lr_at)
            made = (target(rank) if target is not None
                    else FakeTarget(rank, shapes, distinct=not train))
            w = Worker(rank, made, ctl, meter)
            workers[rank] = w
            if resume is not None:
                state, tensors = resume[rank]
                ctl.load_state_dict(state)
                for mine, saved in zip(w.target.tensors(), tensors, strict=True):
                    mine.copy_(saved)
            ctl.begin(w.target)
            for t in range(ctl.step, steps):
                if train:
                    w.target.local_step(t)
                w.before.append(w.target.flat().clone())
                w.whole_before.append(w.target.whole())
                ctl.after_step(w.target)
                w.after.append(w.target.flat().clone())
                w.whole_after.append(w.target.whole())
                if between is not None:
                    between(w, t)
            if finish:
                ctl.finish(w.target)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            _world.everyone.barrier.abort()
            for node in _world.nodes:
                node.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    assert all(w is not None for w in workers)
    return [w for w in workers if w is not None], _world
