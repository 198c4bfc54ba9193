"""Gossip topologies: at a sync every worker mixes its model with its graph neighbours only.

With W the mixing matrix (``graphs``), worker i takes x_i <- W_ii x_i + sum_j W_ij x_j over
its neighbours j. It sends its tensors to each neighbour once (point to point, non-blocking)
and receives theirs: per-rank traffic is degree x model, whatever K is, and no collective
spans every worker. The workers never hold identical models while training, so:

* a sync's consensus distance needs the global average, which gossip never forms; it is
  measured with one exact all-reduce (counted as ``comm/consensus``) every
  ``sync.consensus_every`` syncs, and not at all by default;
* evaluation of the averaged model and the run's final model take the exact average of all
  workers (``everyone``), as for local SGD between syncs;
* the mini-batch phase of post-local SGD still all-reduces gradients: gossip replaces only
  the model averages.

With ``sync.exact_every`` N > 0 every N-th global sync is the exact average of all workers
(one all-reduce through the exact mean) and the others are gossip steps, logged as action
``gossip`` (``MIX``) and applied as plain mixes: the sync's update (an outer optimizer:
SlowMo over gossip) steps at the exact syncs only, as it does at the global averages of
hierarchical SGD. Since W is doubly stochastic, a gossip step keeps the workers' mean, so
the exact round equals gossip followed by the exact average, SlowMo's own setting. The
count of global syncs so far (which one is exact) is this part's checkpointed state.

Ring, torus and expander are files of their own that name a graph; this module holds what
they share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist

from localsgd.config.domains import NON_NEGATIVE, domain
from localsgd.launch.env import DistInfo
from localsgd.launch.replicas import group_count
from localsgd.registry import Facts
from localsgd.sync.capabilities import CONSENSUS, MODEL_AVERAGES, NEIGHBOURS, WHOLE_SYNCS
from localsgd.sync.schedules.base import GLOBAL, MIX
from localsgd.sync.topologies import graphs
from localsgd.sync.topologies.base import Topology

TAGS = 1 << 20
"""Exchanges are tagged with a running count modulo this, so that messages between the same
two workers pair up in order whatever the transport does."""


@dataclass
class Exchange:
    """Tensors received from the neighbours, once ``wait`` returns."""

    hood: Neighbourhood
    received: list[torch.Tensor]
    works: list[Any]

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        self.works = []
        return self.received


@dataclass
class Neighbourhood:
    """One worker's row of the mixing matrix: its own weight and its neighbours'."""

    rank: int
    self_weight: float
    peers: tuple[int, ...]
    weights: tuple[float, ...]
    sent: int = field(default=0, compare=False)
    """Exchanges started so far (their tag)."""

    @classmethod
    def of(cls, w: np.ndarray, rank: int) -> Neighbourhood:
        peers = tuple(j for j in range(w.shape[0]) if j != rank and w[rank, j] > 0)
        return cls(rank, float(w[rank, rank]), peers, tuple(float(w[rank, j]) for j in peers))

    def exchange(self, flat: torch.Tensor) -> Exchange:
        """Send ``flat`` to every neighbour and receive theirs, without blocking."""
        tag = self.sent % TAGS
        self.sent += 1
        received = [torch.empty_like(flat) for _ in self.peers]
        ops = [dist.P2POp(dist.isend, flat, peer, tag=tag) for peer in self.peers]
        ops += [dist.P2POp(dist.irecv, buf, peer, tag=tag)
                for peer, buf in zip(self.peers, received, strict=True)]
        return Exchange(self, received, dist.batch_isend_irecv(ops) if ops else [])


@dataclass
class GossipKeys:
    consensus_every: int = domain(NON_NEGATIVE, 0)
    """With a gossip topology (ring, torus, expander): measure the true consensus distance
    (one exact all-reduce of the parameters, counted as comm/consensus) at every N-th sync;
    0 never, and sync records then carry no distance. Evaluation and the final model use the
    exact average either way."""
    exact_every: int = domain(NON_NEGATIVE, 0)
    """With a gossip topology: every N-th sync is the exact average of all workers (one
    all-reduce) instead of a gossip step, and the update (sync.update=outer: SlowMo over
    gossip) steps there only; the syncs between are gossip steps (action gossip). 0 never."""


class Gossip(Topology):
    """A topology whose syncs mix with graph neighbours (a subclass names the graph)."""

    gossip: ClassVar[bool] = True
    shards = True
    """Runs across replica groups: a neighbour is the rank holding this rank's shard in the
    neighbouring group (``sync/sharding.py``)."""
    reducer: ClassVar[str] = "gossip"
    """The reducer ``sync.reducer=auto`` picks."""
    Config = GossipKeys
    graph: ClassVar[Callable[[int], np.ndarray]]
    """K -> the mixing matrix (a function of ``graphs``)."""

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        p: list[str] = []
        key = f"sync.topology: {cls.name}"
        # The graph joins workers: with replica groups, the groups.
        workers = group_count(str(getattr(cfg, "replica_group", "1")), facts.world_size,
                              facts.local_world_size)
        if workers is not None:
            try:
                cls.graph(workers)
            except graphs.GraphError as exc:
                p.append(f"{key}: {exc}; launch another number of workers or choose "
                         "another topology")
        return p

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        # Exact rounds leave every worker on one model, where the update steps.
        return frozenset({NEIGHBOURS} | ({CONSENSUS} if cfg.exact_every > 0 else set()))

    @classmethod
    def offers(cls, need: str) -> str | None:
        return "sync.exact_every > 0 (exact rounds of gossip)" if need == CONSENSUS else None

    @classmethod
    def needs(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        # Each fragment would mix at its own step, with neighbours that moved meanwhile.
        return frozenset({MODEL_AVERAGES, WHOLE_SYNCS})

    def __init__(self, cfg: Any, info: DistInfo, scopes: tuple[str, ...]) -> None:
        self.info = info
        self.matrix = self.graph(info.world_size)
        self.hood = self._neighbourhood(self.matrix, info.rank)
        # Across replica groups a peer is the rank holding this shard in the peer group.
        self.hood = dataclasses.replace(self.hood, peers=tuple(map(info.rank_of,
                                                                   self.hood.peers)))
        self.exact_every = int(cfg.exact_every)
        self.rounds = 0
        """Global syncs started so far: the ``exact_every``-th ones are exact."""

    def round(self, action: str) -> str:
        if action != GLOBAL or self.exact_every <= 0:
            return action
        self.rounds += 1
        return GLOBAL if self.rounds % self.exact_every == 0 else MIX

    def mixes(self, scope: str) -> bool:
        return scope == MIX or (scope == GLOBAL and self.exact_every <= 0)

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds} if self.exact_every > 0 else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = int(state.get("rounds", 0))

    def _neighbourhood(self, w: np.ndarray, rank: int) -> Any:
        return Neighbourhood.of(w, rank)

    def group(self, scope: str) -> tuple[Any, int]:
        """(this worker's neighbourhood, K) for a gossip step; everyone for an exact one."""
        if scope not in (GLOBAL, MIX):
            raise ValueError(f"topology {self.name} has no scope {scope!r}")
        return (self.hood, self.info.world_size) if self.mixes(scope) else self.everyone()

    def everyone(self) -> tuple[Any, int]:
        """(group, size) over which the exact average of all workers is formed: the world,
        or across replica groups the ranks holding this rank's shard (``GroupInfo``)."""
        return self.info.world_group, self.info.world_size
