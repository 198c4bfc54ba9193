"""``bf16``: the bucket travels as bfloat16, 2 bytes per element.

Round to nearest even keeps 8 significant bits, so every element comes back within a
relative 2^-8 of itself; the range is float32's, so unlike float16 nothing overflows.
Deterministic rounding is slightly biased; error feedback (``error_feedback``) removes that.
"""

from __future__ import annotations

import torch

from localsgd.sync.codecs.base import CODECS, Codec, Payload, Segments, Shapes, check_input


@CODECS.register
class BFloat16(Codec):
    name = "bf16"
    segmentwise = True

    def encode(self, x: torch.Tensor, segments: Segments,
               generator: torch.Generator | None = None) -> Payload:
        check_input(x, segments)
        return Payload([x.to(torch.bfloat16)])

    def decode(self, payload: Payload, numel: int, segments: Segments,
               dtype: torch.dtype) -> torch.Tensor:
        (flat,) = payload.tensors
        return flat.to(dtype)

    def payload_shapes(self, numel: int, segments: Segments,
                       dtype: torch.dtype = torch.float32) -> Shapes:
        return [((numel,), torch.bfloat16)]
