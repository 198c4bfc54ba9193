"""CHOCO-SGD's gossip: compressed differences to public copies of the neighbours' models.

Koloskova, Stich and Jaggi (ICML 2019), in the memory-efficient form of Koloskova, Lin,
Stich and Jaggi (ICLR 2020). Every worker i keeps x_hat_i, the public copy of its own
model that its neighbours hold too, and s_i = sum_j W_ij x_hat_j over itself and its graph
neighbours, the weighted sum of the public copies it would otherwise keep one by one. At a
sync of the model x_i:

    q_i = C(x_i - x_hat_i)                      sent to every neighbour (any codec)
    x_hat_i += q_i,   s_i += W_ii q_i + sum_j W_ij q_j      (the q_j received)
    x_i <- x_i + gamma (s_i - x_hat_i)

gamma is the consensus step size (``sync.choco.gamma``). Since every worker adds the same
decoded q_j, the neighbours' copies stay equal to x_hat_j bit for bit without being sent.
With the ``none`` codec and gamma = 1 each sync is the plain gossip step x <- W x. The
public copies start at 0, as in the paper, so the first syncs send the models themselves
until the copies have caught up; what a biased codec drops stays in x - x_hat and is sent
later, so error feedback is never stacked on top (``ef_sign`` and
``sync.compression.error_feedback`` are refused with this reducer).

What travels is every synced tensor (parameters, BatchNorm statistics with
``sync.average_buffers``, momentum with ``sync.momentum=average``): one payload per bucket
to each neighbour (non-blocking sends, counted as ``comm/gossip``: degree x the payload).
State, per tensor slice, on its device (in host memory with ``sync.state_device=cpu``):
x_hat and s, two copies of what travels, counted in ``sync/extra_bytes``; plus the count of
syncs, which seeds random codecs. Both are in the checkpoint; a resume with another bucket
layout, graph or set of synced tensors is refused while copies exist, and a world-size
change starts the copies afresh at 0 from the averaged model. Evaluation and the final model
take the exact average, as for gossip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from localsgd.config.domains import Range, domain
from localsgd.registry import Facts
from localsgd.sync.anchor import on_host
from localsgd.sync.capabilities import MODEL_AVERAGES, NEIGHBOURS
from localsgd.sync.parts import REDUCERS, state_on_cpu
from localsgd.sync.reducers.base import Reducer
from localsgd.sync.reducers.compressed import (
    CompressionKeys,
    build_codec,
    check_compression,
    split,
    uses_feedback,
)


@dataclass
class ChocoOptions:
    gamma: float = domain(Range(0, 1, lo_open=True), 1.0)
    """Consensus step size in (0, 1]: x <- x + gamma (s - x_hat). With no compression 1 is
    plain gossip; harsher codecs need smaller steps (the paper tunes it per codec)."""


@dataclass
class ChocoKeys:
    compression: CompressionKeys = field(default_factory=CompressionKeys)
    """Compressed communication (sync.reducer=auto picks compressed when method != none)."""
    choco: ChocoOptions = field(default_factory=ChocoOptions)
    """CHOCO-SGD (sync.reducer=choco): compressed differences to neighbours' public copies."""


@dataclass
class Pending:
    exchange: Any
    keys: list[str]
    segments: list[tuple[int, int]]


def _wire(payload: Any) -> torch.Tensor:
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in payload.tensors])


@REDUCERS.register
class Choco(Reducer):
    name = "choco"
    shards = True
    """Public copies are kept per tensor slice the engine hands it: across replica groups,
    per shard, so their memory is / S (``sync/sharding.py``)."""
    exact = False
    """The result is a step towards the neighbours' public copies, not the mean."""
    Config = ChocoKeys

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        keys = cfg.compression
        p = check_compression(keys)
        if not p and uses_feedback(keys):
            p.append(f"sync.compression.{'error_feedback' if keys.error_feedback else 'method'}"
                     f": error feedback with sync.reducer=choco is refused; the public copies "
                     f"already keep what the codec dropped (use "
                     f"{'sign' if keys.method == 'ef_sign' else 'error_feedback=false'})")
        return p

    @classmethod
    def needs(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({NEIGHBOURS, MODEL_AVERAGES})

    def __init__(self, cfg: Any) -> None:
        self.codec = build_codec(cfg.compression)
        self.gamma = float(cfg.choco.gamma)
        self.copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        """Slice key -> (x_hat, s), flat."""
        self.syncs = 0
        """Buckets sent so far: random codecs draw from it."""
        self.on_cpu = state_on_cpu(cfg.state_device)

    def kind(self, requested: str) -> str:
        return "gossip" if requested == "average" else requested

    def _segments(self, flat: torch.Tensor, slices: Any) -> list[tuple[int, int]]:
        if slices is None:
            return [(0, flat.numel())]
        return [(s.pos, s.pos + s.local.numel()) for s in slices]

    def payload_bytes(self, flat: torch.Tensor, hood: Any = None, slices: Any = None) -> int:
        """Bytes this rank sends for ``flat``: one payload per neighbour."""
        peers = len(hood.peers) if hood is not None else 1
        shapes = self.codec.payload_shapes(flat.numel(), self._segments(flat, slices),
                                           flat.dtype)
        return peers * sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size()
                           for s, d in shapes)

    def _copy(self, key: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x_hat, s) of ``key``, where they live (host memory with
        ``sync.state_device=cpu``, else the slice's device)."""
        if key not in self.copies:
            zeros = torch.zeros_like(like)
            self.copies[key] = ((on_host(zeros), on_host(zeros)) if self.on_cpu
                                else (zeros, zeros.clone()))
        hat, mix = self.copies[key]
        if hat.numel() != like.numel():
            raise RuntimeError(f"sync.reducer=choco: the public copy {key} has "
                               f"{hat.numel()} elements, the slice {like.numel()}")
        if not self.on_cpu and hat.device != like.device:  # restored on another device
            hat, mix = hat.to(like.device), mix.to(like.device)
            self.copies[key] = (hat, mix)
        return hat, mix

    def start(self, flat: torch.Tensor, hood: Any, slices: Any = None) -> Pending:
        """Send C(x - x_hat) of the bucket ``flat`` to the neighbours; fold it into this
        worker's own public copy and weighted sum."""
        if slices is None:
            raise RuntimeError("sync.reducer=choco: a bucket without its tensor slices")
        segments = self._segments(flat, slices)
        keys = [f"{s.index}@{s.start}" for s in slices]
        diff = flat.clone()
        for key, (a, b) in zip(keys, segments, strict=True):
            diff[a:b] -= self._copy(key, flat[a:b])[0].to(flat.device)
        gen = torch.Generator(device=flat.device).manual_seed(
            self.syncs * 1_000_003 + hood.rank * 1009)
        self.syncs += 1
        payload = self.codec.encode(diff, segments, gen)
        wire = _wire(payload)
        sent = self.codec.decode(payload, flat.numel(), segments, flat.dtype)
        exchange = hood.exchange(wire)
        for key, (a, b) in zip(keys, segments, strict=True):
            hat, mix = self.copies[key]
            mine = sent[a:b].to(hat.device)
            hat.add_(mine)
            mix.add_(mine, alpha=hood.self_weight)
        return Pending(exchange, keys, segments)

    def finish(self, work: Pending, flat: torch.Tensor, size: int) -> torch.Tensor:
        received = work.exchange.wait()
        hood = work.exchange.hood
        shapes = self.codec.payload_shapes(flat.numel(), work.segments, flat.dtype)
        out = flat.clone()
        decoded = [self.codec.decode(split(wire, shapes, 1)[0], flat.numel(), work.segments,
                                     flat.dtype) for wire in received]
        for key, (a, b) in zip(work.keys, work.segments, strict=True):
            hat, mix = self.copies[key]
            for weight, theirs in zip(hood.weights, decoded, strict=True):
                mix.add_(theirs[a:b].to(mix.device), alpha=weight)
            out[a:b].add_((mix - hat).to(out.device), alpha=self.gamma)
        return out

    def held_bytes(self) -> int:
        """The public copy and the weighted sum of every slice."""
        return sum(t.numel() * t.element_size() for pair in self.copies.values() for t in pair)

    def state_dict(self) -> dict[str, Any]:
        # Copies: both move in place at every sync.
        return {"copies": {k: [h.clone(), m.clone()] for k, (h, m) in self.copies.items()},
                "syncs": self.syncs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        place = on_host if self.on_cpu else torch.clone
        self.copies = {k: (place(h), place(m)) for k, (h, m) in state.get("copies", {}).items()}
        self.syncs = int(state.get("syncs", 0))

    def resume_problem(self, state: dict[str, Any], check: Any) -> str | None:
        """Public copies are kept per tensor slice of a bucket layout and summed over one
        graph's neighbours: another layout, graph or set of synced tensors cannot use them."""
        if not state.get("copies"):
            return None
        for key in ("sync.bucket_mb", "sync.topology", "sync.average_buffers",
                    "sync.momentum"):
            if key in check.changed:
                return (f"its public copies are kept per tensor slice and graph neighbourhood, "
                        f"which {key} changes")
        return None

    @classmethod
    def merge_states(cls, states: list[dict[str, Any]]) -> dict[str, Any]:
        # Another world size is another graph: the copies restart at 0 from the average.
        return {}
