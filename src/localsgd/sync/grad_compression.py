"""Compressed gradients for mini-batch steps: a DDP comm hook around the codecs.

Each parameter's gradient in a bucket DDP hands over is compressed (its own scale for sign
and QSGD, its own top-k), error feedback adding what earlier steps dropped when the method
asks for it, the payloads of a bucket's parameters from all workers are all-gathered as one
byte tensor, and every worker decodes all of
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
from localsgd.sync.codecs.base import Payload
from localsgd.sync.codecs.feedback import ErrorFeedback
from localsgd.sync.reducers.compressed import build_codec, exchange, split, uses_feedback


class CompressedGrads:
    """The state of the hook: codec, residuals, and the steps it has compressed.

    Each parameter's gradient is compressed on its own (its own scale, top-k and residual,
    its own random draw): DDP regroups its buckets after the first step (and again after a
    resume), and per-parameter compression makes the result independent of the grouping,
    so a resume is bitwise exact. A bucket's payloads still travel in one all-gather.
    """

    def __init__(self, keys: Any, meter: CommMeter, world_size: int) -> None:
        self.codec = build_codec(keys)
        self.feedback = ErrorFeedback() if uses_feedback(keys) else None
        self.meter = meter
        self.world_size = world_size
        self.steps = 0
        """Steps whose gradients were compressed: with the parameter, seeds its draw."""
        self.index: dict[int, int] = {}

    def bind(self, module: torch.nn.Module) -> None:
        """Number the parameters (residuals and draws are per parameter)."""
        self.index = {id(p): i for i, p in enumerate(module.parameters())}

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        spans: list[tuple[int, int, int]] = []  # (parameter, first element, numel)
        pos = 0
        for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
            spans.append((self.index[id(param)], pos, grad.numel()))
            pos += grad.numel()
        tensors: list[torch.Tensor] = []
        shapes: list[Any] = []
        for i, first, n in spans:
            x = buf[first:first + n]
            whole = [(0, n)]
            gen = torch.Generator(device=buf.device).manual_seed(self.steps * 1_000_003 + i)
            if self.feedback is not None:
                payload = self.feedback.compress(i, x, self.codec, whole, gen)
            else:
                payload = self.codec.encode(x, whole, gen)
            tensors += payload.tensors
            shapes.append(self.codec.payload_shapes(n, whole, buf.dtype))
        if bucket.is_last():
            self.steps += 1
        start = time.perf_counter()
        sent = Payload(tensors)
        work, gathered = exchange(sent, None, self.world_size)
        flat_shapes = [shape for per in shapes for shape in per]

        def done(_: torch.futures.Future[Any]) -> torch.Tensor:
            total = torch.zeros_like(buf)
            for theirs in split(gathered, flat_shapes, self.world_size):
                at = 0
                for (_i, first, n), per in zip(spans, shapes, strict=True):
                    part = Payload(theirs.tensors[at:at + len(per)])
                    at += len(per)
                    total[first:first + n] += self.codec.decode(part, n, [(0, n)], buf.dtype)
            buf.copy_(total.div_(self.world_size))
            self.meter.record("grad", sent.nbytes, time.perf_counter() - start)
            return buf

        return work.get_future().then(done)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps,
                "feedback": self.feedback.state_dict() if self.feedback else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        if self.feedback is not None:
            self.feedback.load_state_dict(state.get("feedback", {}))


def hook(state: CompressedGrads, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The function DDP calls (``register_comm_hook(state, hook)``)."""
    return state(bucket)
