"""``qsgd``: each element as a sign and one of s + 1 levels of its tensor's L2 norm.

With s = 2^levels - 1, an element x of segment d is r = s |x| / ||d||_2 in [0, s], rounded
stochastically to l = floor(r) + Bernoulli(r - floor(r)), so E[l] = r and the decode
||d||_2 * sign(x) * l / s is unbiased: E[decode] = x. No error feedback by default.

Payload: [norms: float32, one per segment; codes: int32 words]. Each element's code is
``levels`` bits of l plus one sign bit above them (bit ``levels`` set = negative), packed
with ``packing`` at 1 + levels bits per element. Rounding uses the float32 norm that
travels, so the decode is unbiased for the norm the receiver actually sees. Elements in no
segment decode to 0.
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
    segment_sums,
)
from localsgd.sync.codecs.packing import pack_bits, packed_words, unpack_bits

MAX_LEVELS = 16
"""Beyond 16 bits the codes outgrow a bfloat16 payload, and s |x| / norm would need more
precision than float32 rounding gives."""


@CODECS.register
class QSGD(Codec):
    name = "qsgd"
    unbiased = True

    def __init__(self, ratio: float = 1.0, levels: int = 8, chunk: int = 4096) -> None:
        super().__init__(ratio, levels, chunk)
        if self.levels > MAX_LEVELS:
            raise ValueError(f"sync.compression.levels: qsgd takes at most {MAX_LEVELS} "
                             f"bits, got {levels}")
        self.s = 2**self.levels - 1
        """The largest level: levels run over 0..s."""

    @property
    def bits(self) -> int:
        """Bits per element in the payload: the level's plus the sign's."""
        return self.levels + 1

    def encode(self, x: torch.Tensor, segments: Segments,
               generator: torch.Generator | None = None) -> Payload:
        """[norms: float32, one per segment; codes: int32 words, 1 + levels bits each]."""
        check_input(x, segments)
        # Rounding in float32 is enough for <= 16-bit levels; float64 input keeps float64.
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        norms = segment_sums(x.to(work).square(), segments).sqrt().to(torch.float32)
        norm = expand(norms.to(work), x.numel(), segments)
        # A zero norm holds only zeros, and a gap decodes to 0: level 0, not 0 / 0.
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        share = torch.where(norm > 0, x.to(work).abs() / safe, torch.zeros_like(norm))
        noise = torch.rand(x.numel(), generator=generator, device=x.device, dtype=work)
        # floor(r + u), u ~ U[0, 1), is floor(r) + 1 with probability r - floor(r). The
        # clamp only bites when the float32 norm rounds below a lone element's magnitude.
        level = torch.floor(self.s * share + noise).clamp_(0, self.s).to(torch.int64)
        code = level | ((x < 0).to(torch.int64) << self.levels)
        return Payload([norms, pack_bits(code, self.bits)])

    def decode(self, payload: Payload, numel: int, segments: Segments,
               dtype: torch.dtype) -> torch.Tensor:
        """norm of the element's segment * sign * level / s."""
        norms, words = payload.tensors
        code = unpack_bits(words, self.bits, numel)
        level = code & self.s
        sign = 1 - 2 * (code >> self.levels)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        scale = expand(norms.to(work), numel, segments) / self.s
        return (scale * (sign * level).to(work)).to(dtype)

    def payload_shapes(self, numel: int, segments: Segments,
                       dtype: torch.dtype = torch.float32) -> Shapes:
        return [((len(segments),), torch.float32),
                ((packed_words(numel, self.bits),), torch.int32)]
