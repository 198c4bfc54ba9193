"""What every codec shares: the payload, the codec interface, its registry and segment math.

A codec turns one flat bucket (several tensors concatenated) into a few tensors that travel
and back into a dense bucket. It is pure tensor code: it never talks to other processes, so
the reducer can ``all_gather`` payloads, decode each rank's and average them, and the tests
can prove every codec in one process. Every rank's payload for a bucket of the same size has
the same shapes and dtypes (``payload_shapes`` says which before anything is received), as
``all_gather`` needs.

Segments are the ``(start, end)`` of each original tensor inside the bucket. Scale-based
codecs (sign, qsgd) keep one scale per segment, as the paper's code does per tensor, so a
large layer does not drown a small bias in one bucket-wide scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from localsgd.registry import Registry

Segments = Sequence[tuple[int, int]]
"""(start, end) of each original tensor inside a flat bucket."""

Shapes = list[tuple[tuple[int, ...], torch.dtype]]
"""(shape, dtype) of each payload tensor, in payload order."""

CODECS: Registry[type] = Registry("sync.compression.method", "localsgd.sync.codecs")
"""Every codec, by the ``sync.compression.method`` value that chooses it."""

MAX_NUMEL = 2**31 - 1
"""Indices travel as int32, so a bucket holds fewer elements than this."""


@dataclass
class Payload:
    """The tensors one rank sends for one bucket."""

    tensors: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes this rank sends: the sum of numel * element_size over the tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors)


class Codec:
    """Base of every codec: encode a flat bucket, decode a payload, size a payload ahead.

    Subclasses set ``name`` (the ``sync.compression.method`` value) and register with
    ``@CODECS.register``. Every constructor takes the same keys, so the caller builds any
    codec as ``CODECS.get(method)(ratio=..., levels=..., chunk=...)``; a codec ignores keys
    it does not read.

    A codec whose payload starts with a tensor of values (``carries_values``: the kept
    entries of a sparsifier, or every element) says where each value sits in the bucket
    (``positions``); ``quantize.Quantized`` then wraps it to send those values in a few bits,
    so any such codec composes with the quantizer without a class per pair.
    """

    name: ClassVar[str]
    error_feedback: ClassVar[bool] = False
    """Whether the method implies error feedback (``ef_sign``); wrap with ``ErrorFeedback``."""
    unbiased: ClassVar[bool] = False
    """Whether E[decode(encode(x))] = x over the codec's randomness."""
    segmentwise: ClassVar[bool] = False
    """Whether each segment decodes as if it had been encoded on its own: deterministic
    work per element with statistics per segment (sign, bf16, none). Such a codec can take
    many tensors in one call and give each the same result, whichever tensors share it."""
    carries_values: ClassVar[bool] = False
    """Whether the payload is [values, *rest] with ``positions`` defined: a quantizer can
    then stand in for the values tensor."""

    def __init__(self, ratio: float = 1.0, levels: int = 8, chunk: int = 4096) -> None:
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"sync.compression.ratio: must be in (0, 1], got {ratio}")
        if isinstance(levels, bool) or int(levels) != levels or levels < 1:
            raise ValueError(f"sync.compression.levels: must be an integer >= 1, got {levels}")
        if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
            raise ValueError(f"sync.compression.chunk: must be an integer >= 1, got {chunk}")
        self.ratio = float(ratio)
        self.levels = int(levels)
        self.chunk = int(chunk)

    def encode(self, x: torch.Tensor, segments: Segments,
               generator: torch.Generator | None = None) -> Payload:
        """The payload standing for the flat floating tensor ``x``.

        ``segments`` are the original tensors inside ``x``; per-tensor scales are computed
        per segment. ``generator`` drives random codecs (None: torch's global RNG); it must
        live on ``x``'s device.
        """
        raise NotImplementedError

    def decode(self, payload: Payload, numel: int, segments: Segments,
               dtype: torch.dtype) -> torch.Tensor:
        """The dense flat tensor (``numel`` elements of ``dtype``) the payload stands for."""
        raise NotImplementedError

    def positions(self, rest: list[torch.Tensor], numel: int,
                  segments: Segments) -> torch.Tensor:
        """For a codec that ``carries_values``: the int64 position in the bucket of each
        value, from the payload's other tensors ``rest`` (what the receiver has)."""
        raise NotImplementedError(f"{self.name} sends no values tensor to quantize")

    def payload_shapes(self, numel: int, segments: Segments,
                       dtype: torch.dtype = torch.float32) -> Shapes:
        """(shape, dtype) of each payload tensor for a bucket of ``numel`` elements of
        ``dtype`` (the dtype of the ``x`` that will be encoded), known before any data, so a
        receiver can allocate its ``all_gather`` buffers."""
        raise NotImplementedError

    def empty_payload(self, numel: int, segments: Segments, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Payload:
        """An uninitialised payload of the right shapes: a receive buffer."""
        return Payload([torch.empty(shape, dtype=dt, device=device)
                        for shape, dt in self.payload_shapes(numel, segments, dtype)])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, ratio={self.ratio}, "
                f"levels={self.levels})")


def check_input(x: torch.Tensor, segments: Segments) -> None:
    """Refuse what no codec can encode: a non-flat or non-float ``x``, bad segments."""
    if x.dim() != 1:
        raise ValueError(f"codecs encode a flat 1-D bucket, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"codecs encode floating tensors, got {x.dtype}")
    check_segments(x.numel(), segments)


def check_segments(numel: int, segments: Segments) -> None:
    """Segments must be sorted, disjoint and inside [0, numel); gaps between them are
    allowed (padding) and are not represented by scale-based codecs (they decode to 0)."""
    if numel > MAX_NUMEL:
        raise ValueError(f"a bucket holds at most {MAX_NUMEL} elements, got {numel}")
    last = 0
    for start, end in segments:
        if not last <= start <= end <= numel:
            raise ValueError(f"segments must be sorted, disjoint and inside [0, {numel}); "
                             f"got {list(segments)}")
        last = end


def keep_count(ratio: float, numel: int) -> int:
    """k = max(1, ceil(ratio * numel)), at most ``numel`` (0 for an empty bucket).

    The product is shrunk by a relative 1e-12 before rounding up, so float error in e.g.
    0.07 * 100 = 7.000000000000001 does not keep one element more than asked.
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(ratio * numel * (1.0 - 1e-12))))


def _pieces(numel: int, segments: Segments) -> tuple[list[int], list[int]]:
    """A partition of [0, numel) into segments and gaps: (index of each piece's segment,
    len(segments) for a gap; length of each piece)."""
    index: list[int] = []
    lengths: list[int] = []
    pos = 0
    for i, (start, end) in enumerate(segments):
        if start > pos:
            index.append(len(segments))
            lengths.append(start - pos)
        index.append(i)
        lengths.append(end - start)
        pos = end
    if numel > pos:
        index.append(len(segments))
        lengths.append(numel - pos)
    return index, lengths


def segment_sums(values: torch.Tensor, segments: Segments) -> torch.Tensor:
    """The float64 sum of ``values`` over each segment, in one pass.

    One kernel whatever the number of segments, no atomics (so the same on every run), each
    segment summed on its own: its sum does not depend on what else is in the bucket or
    where, so a tensor gets the same scale whichever tensors share its bucket. float64 keeps
    a large segment's sum accurate.
    """
    device = values.device
    if values.numel() == 0:
        return torch.zeros(len(segments), dtype=torch.float64, device=device)
    index, lengths = _pieces(values.numel(), segments)
    sums = torch.segment_reduce(values.to(torch.float64), "sum",
                                lengths=torch.tensor(lengths, dtype=torch.int64).to(device))
    picked = [j for j, i in enumerate(index) if i < len(segments)]
    return sums[torch.tensor(picked, dtype=torch.int64).to(device)]


def segment_lengths(segments: Segments) -> list[int]:
    """The number of elements of each segment."""
    return [end - start for start, end in segments]


def expand(per_segment: torch.Tensor, numel: int, segments: Segments) -> torch.Tensor:
    """A flat tensor of ``numel`` elements holding each segment's value over its segment
    and 0 in the gaps between segments."""
    index, lengths = _pieces(numel, segments)
    values = torch.cat([per_segment, per_segment.new_zeros(1)])
    device = per_segment.device
    picked = values[torch.tensor(index, dtype=torch.int64).to(device)]
    # output_size spares the device a sync to learn the length it already knows.
    return torch.repeat_interleave(picked, torch.tensor(lengths, dtype=torch.int64).to(device),
                                   output_size=numel)
