"""``chunk_topk``: the k largest magnitudes of every fixed-size chunk, indices in few bits.

Each segment (one original tensor) is cut into chunks of ``chunk`` elements (the last one of
a segment may be shorter); every chunk of length L keeps its k = keep_count(ratio, L)
largest magnitudes, as SparseLoCo does per 4096-element chunk. An index only has to name
its place inside its chunk, so it travels in b = max(1, ceil(log2 chunk)) bits (12 for
4096), bit-packed with ``packing``; where each chunk starts is known to the receiver from
the segments alone.

Payload: [values: x.dtype, K; offsets: int32 words, K values of b bits], K the sum of every
chunk's k: a function of the segment lengths only, as ``all_gather`` needs. Bytes:
K * element_size + 4 * ceil(K * b / 32). Values come segment by segment, chunk by chunk.

Work and statistics stay inside a segment, so the codec is ``segmentwise``: error feedback
keeps one residual per tensor, and the result of a tensor does not depend on its bucket.
Elements in no segment are never sent (they decode to 0). The payload starts with its
values, so ``sync.compression.bits`` quantizes them (``quantize.Quantized``).
"""

from __future__ import annotations

import functools

import torch

from localsgd.sync.codecs.base import (
    CODECS,
    Codec,
    Payload,
    Segments,
    Shapes,
    check_input,
    keep_count,
)
from localsgd.sync.codecs.packing import pack_bits, packed_words, unpack_bits


def index_bits(chunk: int) -> int:
    """Bits that name a place in a chunk of ``chunk`` elements: ceil(log2 chunk), >= 1."""
    return max(1, (chunk - 1).bit_length())


@functools.lru_cache(maxsize=256)
def layout(segments: tuple[tuple[int, int], ...], chunk: int,
           ratio: float) -> tuple[torch.Tensor, int]:
    """(the bucket position of the chunk start of every kept value, in payload order; K).

    Cached: a sync sends the same buckets every time."""
    starts: list[torch.Tensor] = []
    for start, end in segments:
        n = end - start
        full = n // chunk
        if full:
            keep = keep_count(ratio, chunk)
            firsts = start + torch.arange(full, dtype=torch.int64) * chunk
            starts.append(firsts.repeat_interleave(keep))
        tail = n - full * chunk
        if tail:
            starts.append(torch.full((keep_count(ratio, tail),), start + full * chunk,
                                     dtype=torch.int64))
    flat = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.int64)
    return flat, flat.numel()


@CODECS.register
class ChunkTopK(Codec):
    name = "chunk_topk"
    segmentwise = True
    carries_values = True

    @property
    def bits(self) -> int:
        """Bits of one index inside its chunk."""
        return index_bits(self.chunk)

    def _layout(self, segments: Segments) -> tuple[torch.Tensor, int]:
        return layout(tuple((int(a), int(b)) for a, b in segments), self.chunk, self.ratio)

    def encode(self, x: torch.Tensor, segments: Segments,
               generator: torch.Generator | None = None) -> Payload:
        """[values: x.dtype, K; offsets inside their chunk: int32 words, b bits each]."""
        check_input(x, segments)
        values: list[torch.Tensor] = []
        offsets: list[torch.Tensor] = []
        c = self.chunk
        for start, end in segments:
            full = (end - start) // c
            if full:
                block = x[start:start + full * c].view(full, c)
                top = torch.topk(block.abs(), keep_count(self.ratio, c), dim=1,
                                 sorted=False).indices
                values.append(block.gather(1, top).reshape(-1))
                offsets.append(top.reshape(-1))
            tail = x[start + full * c:end]
            if tail.numel():
                top = torch.topk(tail.abs(), keep_count(self.ratio, tail.numel()),
                                 sorted=False).indices
                values.append(tail[top])
                offsets.append(top)
        kept = torch.cat(values) if values else x.new_zeros(0)
        where = (torch.cat(offsets) if offsets
                 else torch.zeros(0, dtype=torch.int64, device=x.device))
        return Payload([kept, pack_bits(where, self.bits)])

    def positions(self, rest: list[torch.Tensor], numel: int,
                  segments: Segments) -> torch.Tensor:
        (words,) = rest
        starts, k = self._layout(segments)
        return starts.to(words.device) + unpack_bits(words, self.bits, k)

    def decode(self, payload: Payload, numel: int, segments: Segments,
               dtype: torch.dtype) -> torch.Tensor:
        values, words = payload.tensors
        out = torch.zeros(numel, dtype=dtype, device=values.device)
        # Places are distinct within a chunk and chunks are disjoint: no collisions.
        out[self.positions([words], numel, segments)] = values.to(dtype)
        return out

    def payload_shapes(self, numel: int, segments: Segments,
                       dtype: torch.dtype = torch.float32) -> Shapes:
        _, k = self._layout(segments)
        return [((k,), dtype), ((packed_words(k, self.bits),), torch.int32)]
