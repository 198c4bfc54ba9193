"""Values in ``sync.compression.bits`` bits: a wrapper for any codec that sends values.

``Quantized(inner, bits)`` takes the payload [values, *rest] of a codec that
``carries_values`` (topk, randomk, chunk_topk, and ``quantize``, which sends every element)
and replaces the values by B = 2^bits bin codes plus a codebook, as SparseLoCo does:

- The values are grouped by the segment (tensor) their position falls in (a value in a gap
  between segments joins the segment before; with no segments, one group).
- Per group, offset mu = the values' mean and scale w = 6 sigma / B (sigma their standard
  deviation): the bins tile [mu - 3 sigma, mu + 3 sigma], and a value's code is
  clamp(floor((v - mu + 3 sigma) / w), 0, B - 1) (all 0 when sigma = 0).
- The codebook entry of (group, bin) is the mean of the values with that code, so the
  quantizer keeps each bin's mean exactly; a bin that no value falls in holds 0.
- The receiver only needs the codebook: the decoded value is codebook[group, code]. Offset
  and scale place the bins on the sender and never travel.

Payload: [codebook: float32 (G, B); codes: int32 words, ``bits`` bits per value;
*rest of the inner payload]. For K values in T segments: 4 G B + 4 ceil(K bits / 32) bytes
in place of K element sizes. Statistics run in float64 with sums sorted by group
(``segment_reduce``, no atomics), so every run and device order gives the same payload.
Biased (each bin collapses to its mean): meant to run with error feedback, which then
carries the quantization error too, since it subtracts what was decoded.
"""

from __future__ import annotations

import torch

from localsgd.sync.codecs.base import (
    CODECS,
    Codec,
    Payload,
    Segments,
    Shapes,
    check_input,
)
from localsgd.sync.codecs.packing import pack_bits, packed_words, unpack_bits

MAX_BITS = 8
"""Beyond 8 bits the codebook (2^bits floats per tensor) outweighs what it saves."""


def groups_of(positions: torch.Tensor, segments: Segments) -> tuple[torch.Tensor, int]:
    """(the group of each position, the number of groups): the segment it lies in, or the
    last one starting before it; one group when there are no segments."""
    if not segments:
        return torch.zeros_like(positions), 1
    starts = torch.tensor([s for s, _ in segments], dtype=torch.int64, device=positions.device)
    group = torch.searchsorted(starts, positions, right=True) - 1
    return group.clamp_(min=0), len(segments)


def group_sums(values: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """The sum of ``values`` over each of ``groups`` ids (0 for an empty one), summed in a
    fixed order: stable sort by id, then one ``segment_reduce``."""
    if values.numel() == 0:
        return values.new_zeros(groups)
    order = torch.argsort(group, stable=True)
    lengths = torch.bincount(group, minlength=groups)
    return torch.segment_reduce(values[order], "sum", lengths=lengths)


def quantize(values: torch.Tensor, group: torch.Tensor, groups: int,
             bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook: float32 (groups, bins), code of each value: int64)."""
    v = values.to(torch.float64)
    count = torch.bincount(group, minlength=groups).to(torch.float64)
    mean = group_sums(v, group, groups) / count.clamp(min=1)
    centred = v - mean[group]
    sigma = (group_sums(centred.square(), group, groups) / count.clamp(min=1)).sqrt()
    width = 6.0 * sigma / bins
    lo = mean - 3.0 * sigma
    safe = torch.where(width > 0, width, torch.ones_like(width))
    raw = torch.floor((v - lo[group]) / safe[group])
    code = torch.where(width[group] > 0, raw.clamp(0, bins - 1), torch.zeros_like(raw))
    code = code.to(torch.int64)
    cell = group * bins + code
    hits = torch.bincount(cell, minlength=groups * bins).to(torch.float64)
    book = group_sums(v, cell, groups * bins) / hits.clamp(min=1)
    return book.to(torch.float32).view(groups, bins), code


class Quantized(Codec):
    """``inner``'s payload with its values in ``bits`` bits and a codebook per segment."""

    def __init__(self, inner: Codec, bits: int) -> None:
        if not inner.carries_values:
            raise ValueError(f"sync.compression.bits: {inner.name} sends no values to quantize")
        if isinstance(bits, bool) or int(bits) != bits or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"sync.compression.bits: must be in 1..{MAX_BITS}, got {bits}")
        super().__init__(inner.ratio, inner.levels, inner.chunk)
        self.inner = inner
        self.bits = int(bits)
        self.bins = 2**self.bits
        self.name = f"{inner.name}+{self.bits}bit"  # type: ignore[misc]
        self.segmentwise = inner.segmentwise  # type: ignore[misc]
        self.error_feedback = inner.error_feedback  # type: ignore[misc]

    def _count(self, numel: int, segments: Segments) -> int:
        shape, _ = self.inner.payload_shapes(numel, segments)[0]
        return int(torch.Size(shape).numel())

    def encode(self, x: torch.Tensor, segments: Segments,
               generator: torch.Generator | None = None) -> Payload:
        check_input(x, segments)
        values, *rest = self.inner.encode(x, segments, generator).tensors
        where = self.inner.positions(rest, x.numel(), segments).to(values.device)
        group, groups = groups_of(where, segments)
        book, code = quantize(values, group, groups, self.bins)
        return Payload([book, pack_bits(code, self.bits), *rest])

    def decode(self, payload: Payload, numel: int, segments: Segments,
               dtype: torch.dtype) -> torch.Tensor:
        book, words, *rest = payload.tensors
        where = self.inner.positions(rest, numel, segments).to(book.device)
        group, _ = groups_of(where, segments)
        code = unpack_bits(words, self.bits, self._count(numel, segments))
        values = book.reshape(-1)[group * self.bins + code]
        return self.inner.decode(Payload([values, *rest]), numel, segments, dtype)

    def payload_shapes(self, numel: int, segments: Segments,
                       dtype: torch.dtype = torch.float32) -> Shapes:
        _, *rest = self.inner.payload_shapes(numel, segments, dtype)
        groups = max(len(segments), 1)
        return [((groups, self.bins), torch.float32),
                ((packed_words(self._count(numel, segments), self.bits),), torch.int32), *rest]

    def __repr__(self) -> str:
        return f"Quantized({self.inner!r}, bits={self.bits})"


def segment_positions(numel: int, segments: Segments, device: torch.device) -> torch.Tensor:
    """Every position inside a segment, in order."""
    if list(segments) == [(0, numel)]:
        return torch.arange(numel, dtype=torch.int64, device=device)
    parts = [torch.arange(a, b, dtype=torch.int64, device=device) for a, b in segments]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


@CODECS.register
class Dense(Codec):
    """``quantize``: every element of every segment is a value (``sync.compression.bits``
    is required); elements in no segment are not sent and decode to 0."""

    name = "quantize"
    segmentwise = True
    carries_values = True

    def encode(self, x: torch.Tensor, segments: Segments,
               generator: torch.Generator | None = None) -> Payload:
        check_input(x, segments)
        return Payload([x[segment_positions(x.numel(), segments, x.device)]])

    def positions(self, rest: list[torch.Tensor], numel: int,
                  segments: Segments) -> torch.Tensor:
        return segment_positions(numel, segments, torch.device("cpu"))

    def decode(self, payload: Payload, numel: int, segments: Segments,
               dtype: torch.dtype) -> torch.Tensor:
        (values,) = payload.tensors
        out = torch.zeros(numel, dtype=dtype, device=values.device)
        out[segment_positions(numel, segments, values.device)] = values.to(dtype)
        return out

    def payload_shapes(self, numel: int, segments: Segments,
                       dtype: torch.dtype = torch.float32) -> Shapes:
        return [((sum(b - a for a, b in segments),), dtype)]
