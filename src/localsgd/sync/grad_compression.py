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
from localsgd.sync.reducers.compressed import build_codec, build_feedback, exchange, split

Unit = tuple[int, int, list[tuple[int, int]], list[Any]]
"""A piece of a bucket encoded in one call: (first element, numel, segments inside it,
payload shapes)."""


class CompressedGrads:
    """The state of the hook: codec, residuals, and the steps it has compressed.

    Each parameter's gradient is compressed on its own (its own scale, top-k and residual,
    its own random draw): DDP regroups its buckets after the first step (and again after a
    resume), and per-parameter compression makes the result independent of the grouping,
    so a resume is bitwise exact. A bucket's payload travels in one all-gather.
    """

    def __init__(self, keys: Any, meter: CommMeter, world_size: int) -> None:
        self.codec = build_codec(keys)
        self.feedback = build_feedback(keys)
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
        units, sent = self._encode(buf, spans)
        if bucket.is_last():
            self.steps += 1
        start = time.perf_counter()
        work, gathered = exchange(sent, None, self.world_size)
        shapes = [shape for _, _, _, per in units for shape in per]

        def done(_: torch.futures.Future[Any]) -> torch.Tensor:
            total = torch.zeros_like(buf)
            for theirs in split(gathered, shapes, self.world_size):
                at = 0
                for first, n, segments, per in units:
                    part = Payload(theirs.tensors[at:at + len(per)])
                    at += len(per)
                    total[first:first + n] += self.codec.decode(part, n, segments, buf.dtype)
            buf.copy_(total.div_(self.world_size))
            self.meter.record("grad", sent.nbytes, time.perf_counter() - start)
            return buf

        return work.get_future().then(done)

    def _encode(self, buf: torch.Tensor,
                spans: list[tuple[int, int, int]]) -> tuple[list[Unit], Payload]:
        """This rank's payload for a bucket, and the units it decodes in.

        A segmentwise codec (sign, bf16) encodes the whole bucket at once, one segment per
        parameter: each parameter's result is its own either way, and one call costs far
        less CPU than one per parameter. Other codecs (top-k per parameter, random draws
        seeded per parameter) take one call each.
        """
        if self.codec.segmentwise:
            segments = [(first, first + n) for _, first, n in spans]
            if self.feedback is not None:
                keys = [i for i, _, _ in spans]
                payload = self.feedback.compress_split(keys, buf, self.codec, segments)
            else:
                payload = self.codec.encode(buf, segments)
            shapes = self.codec.payload_shapes(buf.numel(), segments, buf.dtype)
            return [(0, buf.numel(), segments, shapes)], payload
        units: list[Unit] = []
        tensors: list[torch.Tensor] = []
        for i, first, n in spans:
            x = buf[first:first + n]
            whole = [(0, n)]
            gen = torch.Generator(device=buf.device).manual_seed(self.steps * 1_000_003 + i)
            if self.feedback is not None:
                payload = self.feedback.compress(i, x, self.codec, whole, gen)
            else:
                payload = self.codec.encode(x, whole, gen)
            tensors += payload.tensors
            units.append((first, n, whole, self.codec.payload_shapes(n, whole, buf.dtype)))
        return units, Payload(tensors)

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
