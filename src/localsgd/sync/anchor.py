"""The anchor: the model every worker agreed on at the last global sync, one per sync.

A reducer that carries the pseudo-gradient (Delta = anchor - theta) and an update that steps
on it (an outer optimizer) read the same copy; the controller allocates it only when a
chosen part says it uses one, so plain local SGD holds no extra copy. It is taken from the
model where every worker holds one and local steps follow (``take``); only the update moves
it at a sync. Tensors are kept flat, per parameter, in memory order (``flat_view``), as the
averager hands slices over, on the model's device or on the CPU (``sync.state_device=cpu``
or ``sync.outer.state_device=cpu``; pinned where CUDA is available).
"""

from __future__ import annotations

import torch

from localsgd.sync.buckets import flat_view


def on_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in host memory, pinned when CUDA is available (so the copies to and
    from the GPU at each sync can run asynchronously)."""
    host = t.detach().to("cpu", copy=True)
    return host.pin_memory() if torch.cuda.is_available() else host


class Anchor:
    def __init__(self, on_cpu: bool = False) -> None:
        self.on_cpu = on_cpu
        self.tensors: list[torch.Tensor] = []
        """Per parameter, flat in memory order."""
        self.step = -1
        """The step after which it was last set (a sync's seed for random codecs)."""

    def __bool__(self) -> bool:
        return bool(self.tensors)

    def take(self, step: int, params: list[torch.Tensor]) -> None:
        """Every worker holds ``params`` after ``step`` steps: they become the anchor,
        unless the sync that just ended set it already."""
        if step == self.step and self.tensors:
            return
        flats = [flat_view(p.detach()) for p in params]
        if [a.numel() for a in self.tensors] == [f.numel() for f in flats]:
            for a, f in zip(self.tensors, flats, strict=True):
                a.copy_(f)  # same layout: no new allocation at every consensus
        else:
            self.tensors = [self._placed(f) for f in flats]
        self.step = step

    def load(self, tensors: list[torch.Tensor], step: int) -> None:
        """Restore a checkpoint's anchor (flat, or shaped like the parameters)."""
        self.tensors = [self._placed(flat_view(t)) for t in tensors]
        self.step = step

    def _placed(self, t: torch.Tensor) -> torch.Tensor:
        return on_host(t) if self.on_cpu else t.to(t.device, copy=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
