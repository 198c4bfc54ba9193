"""Compressed gradients for mini-batch steps: a DDP comm hook around the codecs.

Each gradient bucket DDP hands over is compressed (one scale per parameter for sign and
QSGD), error feedback adding what earlier steps dropped when the method asks for it, the
payloads of all workers are all-gathered as one byte tensor, and every worker decodes all of
them and takes their mean as the bucket's gradient. So sign SGD, EF-sign SGD and DGC-style
top-k / random-k / QSGD run as PyTorch's PowerSGD hook does: on the gradient averaged over
workers, before the optimizer (momentum and weight decay come after, unlike the paper's
code, which compresses the optimizer's update). Bytes are counted as ``grad``: what this
rank sends. The residuals and the random draws' counter are in the DDP engine's checkpoint
state, so a resume is bitwise exact; a resume with another world size takes the mean of the
old residuals, as the engine merges every state.

No ``from __future__ import annotations`` here: DDP checks the hook's ``bucket`` annotation
against ``dist.GradBucket`` itself, not its name.
"""

import time
from typing import Any

import torch
import torch.distributed as dist

from localsgd.sync.accounting import CommMeter
from localsgd.sync.codecs.feedback import ErrorFeedback
from localsgd.sync.reducers.compressed import build_codec, exchange, split, uses_feedback


class CompressedGrads:
    """The state of the hook: codec, residuals, and how many buckets it has compressed."""

    def __init__(self, keys: Any, meter: CommMeter, world_size: int) -> None:
        self.codec = build_codec(keys)
        self.feedback = ErrorFeedback() if uses_feedback(keys) else None
        self.meter = meter
        self.world_size = world_size
        self.calls = 0
        """Buckets compressed so far: seeds each random draw alike on every worker."""

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        segments, pos = [], 0
        for grad in bucket.gradients():
            segments.append((pos, pos + grad.numel()))
            pos += grad.numel()
        gen = torch.Generator(device=buf.device).manual_seed(self.calls)
        self.calls += 1
        if self.feedback is not None:
            # DDP rebuilds its buckets after the first step; a new layout starts afresh.
            key = f"{bucket.index()}:{buf.numel()}"
            payload = self.feedback.compress(key, buf, self.codec, segments, gen)
        else:
            payload = self.codec.encode(buf, segments, gen)
        start = time.perf_counter()
        work, gathered = exchange(payload, None, self.world_size)
        nbytes = payload.nbytes
        shapes = self.codec.payload_shapes(buf.numel(), segments, buf.dtype)

        def done(_: torch.futures.Future[Any]) -> torch.Tensor:
            total = torch.zeros_like(buf)
            for theirs in split(gathered, shapes, self.world_size):
                total += self.codec.decode(theirs, buf.numel(), segments, buf.dtype)
            buf.copy_(total.div_(self.world_size))
            self.meter.record("grad", nbytes, time.perf_counter() - start)
            return buf

        return work.get_future().then(done)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls,
                "feedback": self.feedback.state_dict() if self.feedback else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
        if self.feedback is not None:
            self.feedback.load_state_dict(state.get("feedback", {}))


def hook(state: CompressedGrads, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The function DDP calls (``register_comm_hook(state, hook)``)."""
    return state(bucket)
