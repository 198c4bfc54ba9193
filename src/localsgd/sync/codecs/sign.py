"""``sign`` and ``ef_sign``: one bit per element plus one float32 scale per tensor.

Each segment d (one original tensor) travels as ||d||_1 / numel(d) * sign(d): its signs
bit-packed 32 to an int32 word (``packing``; bit 1 = negative) and its mean absolute value.
The sign of 0 is taken as +1, so a zero costs no extra symbol (it decodes to +scale; error
feedback carries that error to the next sync). Elements in no segment decode to 0.

The reducer averages the decoded payloads of all ranks: the mean of scaled signs. That is
not signSGD's majority vote, which sends back only the sign of the sum of signs (one bit
again, cheap both ways, but biased: it drops every magnitude and how lopsided the vote
was). The mean of scaled signs keeps each rank's magnitude and the vote's margin, at the
price of a dense result.

``ef_sign`` is the same codec with ``error_feedback = True``: the caller wraps it in
``ErrorFeedback`` (m = d + m; send C(m); m -= C(m)), which makes the biased sign converge.
The payload is 1/32 of float32 for the signs plus 4 bytes per segment.
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
    expand,
    segment_lengths,
    segment_sums,
)
from localsgd.sync.codecs.packing import pack_bits, packed_words, unpack_bits


@CODECS.register
class Sign(Codec):
    name = "sign"
    segmentwise = True

    def encode(self, x: torch.Tensor, segments: Segments,
               generator: torch.Generator | None = None) -> Payload:
        """[signs: int32 words, 1 bit per element; scales: float32, one per segment]."""
        check_input(x, segments)
        lengths = torch.tensor(segment_lengths(segments), dtype=torch.float64).to(x.device)
        # An empty segment has nothing to scale: 0, not 0 / 0.
        scales = segment_sums(x.abs(), segments) / lengths.clamp(min=1)
        return Payload([pack_bits(x < 0, 1), scales.to(torch.float32)])

    def decode(self, payload: Payload, numel: int, segments: Segments,
               dtype: torch.dtype) -> torch.Tensor:
        """scale of the element's segment times +1 (bit 0) or -1 (bit 1)."""
        words, scales = payload.tensors
        negative = unpack_bits(words, 1, numel)
        signs = (1 - 2 * negative).to(dtype)
        return expand(scales.to(dtype), numel, segments) * signs

    def payload_shapes(self, numel: int, segments: Segments,
                       dtype: torch.dtype = torch.float32) -> Shapes:
        return [((packed_words(numel, 1),), torch.int32), ((len(segments),), torch.float32)]


@CODECS.register
class EFSign(Sign):
    """The sign codec chosen with error feedback (the paper's EF-sign)."""

    name = "ef_sign"
    error_feedback = True
