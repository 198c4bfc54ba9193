"""Compressed model averaging: the paper's local (EF-)sign, top-k, random-k and QSGD variants,
and SparseLoCo's chunked top-k with quantized values under decayed error feedback.

At a global sync every worker compresses its pseudo-gradient since the last consensus, d_i =
anchor - theta_i, which the averager hands over (the sync's one anchor; per tensor; with
error feedback the residual of earlier syncs is added first and the part the codec dropped
is kept for the next one), the payloads of all workers are exchanged with one all-gather per
bucket (signs bit-packed, sparse payloads as values and indices: ``comm/bytes`` counts what
really travels), and every worker decodes all of them alike and takes

    theta <- anchor - mean_i decode(payload_i),        anchor <- theta

so the workers agree bit for bit after each sync, on a model that is not their exact average
(the consensus distance is not known, unless ``sync.consensus_every`` measures the true
one). The reducer returns mean_i decode(payload_i), the compressed pseudo-gradient, so any
update applies it: ``copy`` takes anchor - that, ``outer`` steps on it (DiLoCo with a
compressed outer gradient). Only parameters are compressed: BatchNorm statistics and
momentum (with ``sync.momentum=average``) travel exactly, through the mean, or not at all
between syncs with ``sync.average_buffers=false`` (the SparseLoCo recipe's choice). Intra-node
averages of hierarchical SGD are exact means too (within a node uncompressed, across nodes
compressed); the anchor is the last global consensus. Evaluation between syncs shows the
anchor (the last sync's model) and a run that ends mid-period ends with one more compressed
sync, so no fp32 model travels; ``sync.compression.exact_average`` asks for the exact
average for both.

Memory: the sync's anchor (one copy of the parameters, shared with an outer update) and,
with error feedback, the residual (another). Both are in the checkpoint; on a world-size
change the anchor (the same on every worker) is kept and the residuals are merged by the
codec library's rule. A checkpoint written with another reducer has no anchor: at a sync
boundary the model is the anchor (every worker holds it), mid-period the resume is refused
(``resume_problem``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from localsgd.config.domains import AT_LEAST_ONE, NON_NEGATIVE, Choice, Range, domain
from localsgd.registry import Facts, need
from localsgd.sync.anchor import Anchor, on_host
from localsgd.sync.capabilities import ALL_WORKERS, CONSENSUS
from localsgd.sync.codecs.base import CODECS, MAX_NUMEL, Codec, Payload
from localsgd.sync.codecs.feedback import ErrorFeedback
from localsgd.sync.codecs.quantize import MAX_BITS, Quantized
from localsgd.sync.parts import REDUCERS, state_on_cpu
from localsgd.sync.reducers.base import DELTA, Reducer


@dataclass
class CompressionKeys:
    method: str = domain(Choice(CODECS.names, key="sync.compression.method"), "none")
    """What travels at a sync (model deltas) and, in mini-batch steps on DDP, for gradients:
    none | bf16 | sign | ef_sign | topk | randomk | chunk_topk | qsgd | quantize."""
    ratio: float = domain(Range(0, 1, lo_open=True), 0.01)
    """Fraction of the elements top-k and random-k keep (of each chunk for chunk_topk), in
    (0, 1]."""
    levels: int = domain(AT_LEAST_ONE, 4)
    """QSGD: bits per magnitude; 2^levels - 1 quantization levels (>= 1)."""
    chunk: int = domain(Range(1, MAX_NUMEL), 4096)
    """chunk_topk: elements per chunk of each tensor; each chunk keeps its own top
    ratio * chunk, and an index travels in ceil(log2 chunk) bits (12 for 4096)."""
    bits: int = domain(Range(0, MAX_BITS), 0)
    """Quantize the values a sparse method sends (topk, randomk, chunk_topk), or every
    element with method=quantize, to this many bits (1..8) with a codebook of bin means per
    tensor; 0 sends values at full precision."""
    error_feedback: bool = False
    """Keep what the codec dropped and add it to the next payload (ef_sign always does)."""
    feedback_decay: float = domain(Range(0, 1), 1.0)
    """beta in e <- beta e + delta before each payload (SparseLoCo: 0.95, standing in for
    outer momentum); 1 is plain error feedback. Read only with error feedback."""
    exact_average: bool = False
    """Evaluate the exact fp32 average between syncs and end on it (one full-precision
    all-reduce each); false evaluates the last sync's model and ends with a compressed sync."""


@dataclass
class CompressedKeys:
    compression: CompressionKeys = field(default_factory=CompressionKeys)
    """Compressed communication (sync.reducer=auto picks compressed when method != none)."""
    consensus_every: int = domain(NON_NEGATIVE, 0)
    """With a gossip topology (ring, torus, expander) or compression: measure the true
    consensus distance (one exact all-reduce of the parameters, counted as comm/consensus)
    at every N-th sync; 0 never, and sync records then carry no distance. Evaluation and the
    final model use the exact average either way."""


def build_codec(keys: CompressionKeys) -> Codec:
    """The method's codec, its values quantized when ``bits`` asks (no class per pair)."""
    codec = CODECS.get(keys.method)(ratio=keys.ratio, levels=keys.levels, chunk=keys.chunk)
    return Quantized(codec, keys.bits) if keys.bits and codec.carries_values else codec


def uses_feedback(keys: CompressionKeys) -> bool:
    return keys.error_feedback or bool(getattr(CODECS.get(keys.method), "error_feedback", False))


def build_feedback(keys: CompressionKeys) -> ErrorFeedback | None:
    return ErrorFeedback(keys.feedback_decay) if uses_feedback(keys) else None


def compression_warnings(keys: CompressionKeys) -> list[str]:
    """Keys set away from their defaults that the chosen method never reads."""
    codec = CODECS.find(keys.method)
    if codec is None or keys.method == "none":
        return []
    out = []
    if keys.bits and not codec.carries_values:
        out.append(f"sync.compression.bits: has no effect with sync.compression.method="
                   f"{keys.method} and is ignored (only topk, randomk, chunk_topk and "
                   "quantize send values to quantize)")
    if keys.feedback_decay != 1.0 and not uses_feedback(keys):
        out.append("sync.compression.feedback_decay: has no effect without error feedback "
                   "and is ignored (set sync.compression.error_feedback=true)")
    if keys.chunk != 4096 and keys.method != "chunk_topk":
        out.append(f"sync.compression.chunk: has no effect with sync.compression.method="
                   f"{keys.method} and is ignored (only chunk_topk reads it)")
    return out


def check_compression(keys: CompressionKeys) -> list[str]:
    p: list[str] = []
    check = need(p)
    if CODECS.find(keys.method) is None:
        p.append(CODECS.unknown(keys.method))
    check(keys.method != "qsgd" or keys.levels <= 16,
          f"sync.compression.levels: qsgd packs 1 + levels bits per element, at most 17; "
          f"got levels={keys.levels}")
    check(keys.method != "quantize" or keys.bits > 0,
          "sync.compression.bits: method=quantize sends every element in sync.compression."
          "bits bits; set it to 1..8")
    return p


GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
"""torch 2.14 renamed all_gather_into_tensor; older releases only know that name."""


def exchange(payload: Payload, group: Any, world: int) -> tuple[Any, torch.Tensor]:
    """Start an all-gather of ``payload`` as one byte tensor; (work, gathered bytes)."""
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in payload.tensors])
    out = torch.empty(world * flat.numel(), dtype=torch.uint8, device=flat.device)
    return GATHER(out, flat, group=group, async_op=True), out


def split(gathered: torch.Tensor, shapes: list[tuple[tuple[int, ...], torch.dtype]],
          world: int) -> list[Payload]:
    """The ``world`` payloads in a gathered byte tensor."""
    out: list[Payload] = []
    for rank_bytes in gathered.view(world, -1):
        tensors, pos = [], 0
        for shape, dtype in shapes:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            # A copy: the slice may start off the dtype's alignment.
            tensors.append(rank_bytes[pos:pos + n].clone().view(dtype).reshape(shape))
            pos += n
        out.append(Payload(tensors))
    return out


@dataclass
class Pending:
    work: Any
    gathered: torch.Tensor
    segments: list[tuple[int, int]]


@REDUCERS.register
class Compressed(Reducer):
    name = "compressed"
    shards = True
    """Runs across replica groups on each rank's own shard, which the codec takes for the
    tensor (statistics per shard; ``sync/sharding.py``)."""
    exact = False
    carries = DELTA
    """Buffers and momentum that travel with the parameters take the exact mean."""
    uses_anchor = True
    Config = CompressedKeys

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        keys = cfg.compression
        p = check_compression(keys)
        if keys.method == "none":
            p.append("sync.reducer: compressed needs sync.compression.method (sign, ef_sign, "
                     "topk, randomk, chunk_topk, qsgd, quantize or bf16); or use "
                     "sync.reducer=auto")
        return p

    @classmethod
    def provides(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        return frozenset({CONSENSUS})

    @classmethod
    def needs(cls, cfg: Any, facts: Facts) -> frozenset[str]:
        # Payloads are all-gathered from every worker.
        return frozenset({ALL_WORKERS})

    def __init__(self, cfg: Any) -> None:
        self.keys = cfg.compression
        self.codec = build_codec(self.keys)
        self.feedback = build_feedback(self.keys)
        self.anchor: Anchor | None = None
        """The sync's anchor (bound by the controller): saved with this part's state."""
        self.sync_point_views = not self.keys.exact_average
        self.on_cpu = state_on_cpu(cfg.state_device)
        """Whether the residuals live in host memory between syncs (sync.state_device)."""

    def bind(self, anchor: Anchor | None) -> None:
        self.anchor = anchor

    @property
    def seed(self) -> int:
        """The step the anchor was taken at: random codecs draw from it."""
        return self.anchor.step if self.anchor is not None else 0

    def payload_bytes(self, flat: torch.Tensor, group: Any = None, slices: Any = None) -> int:
        segments = ([(s.pos, s.pos + s.local.numel()) for s in slices] if slices is not None
                    else [(0, flat.numel())])
        return sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                   for s, d in self.codec.payload_shapes(flat.numel(), segments, flat.dtype))

    def start(self, flat: torch.Tensor, group: Any, slices: Any = None) -> Pending:
        """``flat`` holds this worker's pseudo-gradient of the parameter slices ``slices``."""
        if slices is None:
            raise RuntimeError("compressed reducer: a bucket without its parameter slices")
        spans = [(s.index, s.start, s.pos, s.local.numel()) for s in slices]
        segments = [(pos, pos + n) for _, _, pos, n in spans]
        # A different random-k draw at every sync and bucket, the same on every resume.
        gen = torch.Generator(device=flat.device).manual_seed(
            self.seed * 1_000_003 + spans[0][0] * 1009 + spans[0][1])
        if self.feedback is not None and self.codec.segmentwise:
            # One residual per parameter slice, whatever bucket it travels in: with no
            # tensor split across buckets, sync.bucket_mb changes nothing.
            keys = [f"param{index}@{first}" for index, first, _, _ in spans]
            self._migrate(f"{spans[0][0]}:{spans[0][1]}:{flat.numel()}", keys, segments)
            payload = self.feedback.compress_split(keys, flat, self.codec, segments)
        elif self.feedback is not None:
            key = f"{spans[0][0]}:{spans[0][1]}:{flat.numel()}"
            payload = self.feedback.compress(key, flat, self.codec, segments, gen)
        else:
            payload = self.codec.encode(flat, segments, gen)
        if self.feedback is not None and self.on_cpu:
            self.feedback.residuals = {k: r if r.device.type == "cpu" else on_host(r)
                                       for k, r in self.feedback.residuals.items()}
        work, gathered = self.gather(payload, group)
        return Pending(work, gathered, segments)

    def _migrate(self, bucket_key: str, keys: list[str],
                 segments: list[tuple[int, int]]) -> None:
        """A residual that an older checkpoint kept for the whole bucket, split per slice."""
        assert self.feedback is not None
        old = self.feedback.residuals.pop(bucket_key, None)
        if old is not None:
            for key, (a, b) in zip(keys, segments, strict=True):
                self.feedback.residuals[key] = old[a:b]

    def gather(self, payload: Payload, group: Any) -> tuple[Any, torch.Tensor]:
        """Start the all-gather of this worker's payload over ``group``: (work, bytes of
        every worker's payload in rank order)."""
        return exchange(payload, group, dist.get_world_size(group))

    def finish(self, work: Pending, flat: torch.Tensor, size: int) -> torch.Tensor:
        work.work.wait()
        shapes = self.codec.payload_shapes(flat.numel(), work.segments, flat.dtype)
        payloads = split(work.gathered, shapes, size)
        total = torch.zeros_like(flat)
        for payload in payloads:
            total += self.codec.decode(payload, flat.numel(), work.segments, flat.dtype)
        # Every worker decodes the same payloads alike, so they agree on the result.
        return total / size

    def held_bytes(self) -> int:
        """Memory kept between syncs besides the anchor: the error-feedback residuals."""
        tensors = self.feedback.residuals.values() if self.feedback else []
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict[str, Any]:
        # Copies: the anchor is updated in place at every sync.
        anchor = [a.clone() for a in self.anchor.tensors] if self.anchor is not None else []
        return {"anchor": anchor, "seed": self.seed,
                "feedback": self.feedback.state_dict() if self.feedback else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("anchor") and self.anchor is not None:
            self.anchor.load(list(state["anchor"]), int(state.get("seed", 0)))
        if self.feedback is not None:
            self.feedback.load_state_dict(state.get("feedback", {}))

    def resume_problem(self, state: dict[str, Any], check: Any) -> str | None:
        """A checkpoint without an anchor (written with another reducer) is continued from a
        sync boundary only: every worker holds the checkpoint's model, so it is the anchor,
        exactly, with no residual owed, as right after a compressed sync that ended there.
        Mid-period the model of the last sync is gone. Residuals of codecs that are not
        segmentwise (and those of older checkpoints) are kept per averaging bucket, so they
        need the bucket layout that wrote them; the others are kept per parameter."""
        if not state.get("anchor") and not check.consensus:
            return ("resuming mid-period needs the anchor (the model of the last sync) it "
                    "never kept")
        residuals = state.get("feedback", {}).get("residuals") or {}
        by_bucket = not self.codec.segmentwise or any(
            not str(k).startswith("param") for k in residuals)
        if (self.feedback is not None and residuals and by_bucket
                and "sync.bucket_mb" in check.changed):
            return ("its error-feedback residuals are kept per averaging bucket, which "
                    "sync.bucket_mb lays out")
        return None

    @classmethod
    def merge_states(cls, states: list[dict[str, Any]]) -> dict[str, Any]:
        if not states:
            return {}
        return {"anchor": states[0].get("anchor", []), "seed": states[0].get("seed", 0),
                "feedback": ErrorFeedback.merge_states([s.get("feedback", {}) for s in states])}
