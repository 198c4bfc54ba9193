"""``randomk``: k uniformly random entries of the bucket travel, rescaled to be unbiased.

k = max(1, ceil(ratio * n)) distinct indices drawn uniformly without replacement from the
whole bucket with the caller's generator. Each entry is kept with probability k / n, so
its value travels multiplied by n / k and the decode is unbiased: E[decode] = x.

The rescaling has a cost: the variance grows with n / k, and the operator is not a
contraction (||C(x) - x||^2 = (n / k - 1) ||x||^2 in expectation), so error feedback over
it can grow without bound once k < n / 2; unbiased averaging is how it is meant to be used.
Ranks seeded alike pick the same indices (then the values could be all-reduced); ranks
seeded apart sample independently, which is what the variance reduction of averaging needs.
"""

from __future__ import annotations

import torch

from localsgd.sync.codecs.base import (
    CODECS,
    Payload,
    Segments,
    check_input,
    keep_count,
)
from localsgd.sync.codecs.topk import Sparse


@CODECS.register
class RandomK(Sparse):
    name = "randomk"
    unbiased = True

    def encode(self, x: torch.Tensor, segments: Segments,
               generator: torch.Generator | None = None) -> Payload:
        """[values * n / k: x.dtype, k; indices: int32, k] at k random distinct indices."""
        check_input(x, segments)
        n = x.numel()
        k = keep_count(self.ratio, n)
        indices = torch.randperm(n, generator=generator, device=x.device)[:k]
        values = x[indices] * (n / k) if k else x[indices]
        return Payload([values, indices.to(torch.int32)])
