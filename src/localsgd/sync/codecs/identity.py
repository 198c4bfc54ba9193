"""``none``: no compression; the bucket itself travels (the exact baseline)."""

from __future__ import annotations

import torch

from localsgd.sync.codecs.base import CODECS, Codec, Payload, Segments, Shapes, check_input


@CODECS.register
class Identity(Codec):
    name = "none"
    segmentwise = True
    unbiased = True

    def encode(self, x: torch.Tensor, segments: Segments,
               generator: torch.Generator | None = None) -> Payload:
        """The payload is ``x`` itself, not a copy: nothing to gain from copying before a
        send, and error feedback's residual is then exactly zero."""
        check_input(x, segments)
        return Payload([x])

    def decode(self, payload: Payload, numel: int, segments: Segments,
               dtype: torch.dtype) -> torch.Tensor:
        """The received bucket, cast to ``dtype`` (the same tensor when already ``dtype``)."""
        (flat,) = payload.tensors
        return flat.to(dtype)

    def payload_shapes(self, numel: int, segments: Segments,
                       dtype: torch.dtype = torch.float32) -> Shapes:
        return [((numel,), dtype)]
