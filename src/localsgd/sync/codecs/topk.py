"""``topk``: the k largest magnitudes of the bucket travel, as values and int32 indices.

k = max(1, ceil(ratio * n)) over the whole bucket, not per segment (as DGC selects from the
flattened gradient): a tensor whose entries are all small may send nothing, which error
feedback then accumulates until they are large enough. Per-bucket selection also keeps the
payload size a function of the bucket size alone, as ``all_gather`` needs. Biased (the small
entries are always dropped), so it is meant to run with ``error_feedback``.

Ties in magnitude are broken by ``torch.topk``, deterministically on one device.
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
    keep_count,
)


def scatter(payload: Payload, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Values at their indices, zeros elsewhere: the decode of a sparse payload."""
    values, indices = payload.tensors
    out = torch.zeros(numel, dtype=dtype, device=values.device)
    # Indices are distinct, so the scatter has no collisions and no order to depend on.
    out[indices.to(torch.int64)] = values.to(dtype)
    return out


class Sparse(Codec):
    """What top-k and random-k share: k = keep_count(ratio, n) values and int32 indices."""

    carries_values = True

    def positions(self, rest: list[torch.Tensor], numel: int,
                  segments: Segments) -> torch.Tensor:
        (indices,) = rest
        return indices.to(torch.int64)

    def decode(self, payload: Payload, numel: int, segments: Segments,
               dtype: torch.dtype) -> torch.Tensor:
        return scatter(payload, numel, dtype)

    def payload_shapes(self, numel: int, segments: Segments,
                       dtype: torch.dtype = torch.float32) -> Shapes:
        k = keep_count(self.ratio, numel)
        return [((k,), dtype), ((k,), torch.int32)]


@CODECS.register
class TopK(Sparse):
    name = "topk"

    def encode(self, x: torch.Tensor, segments: Segments,
               generator: torch.Generator | None = None) -> Payload:
        """[values: x.dtype, k; indices: int32, k] of the k largest |x|."""
        check_input(x, segments)
        k = keep_count(self.ratio, x.numel())
        indices = torch.topk(x.abs(), k, sorted=False).indices
        return Payload([x[indices], indices.to(torch.int32)])
