"""Bucketing: stream tensors through one preallocated flat buffer per dtype and device.

Large tensors go in slices, so reducing a model of any size never copies it whole: extra
memory is one bucket per dtype/device, and a model of N elements takes ceil(N / capacity)
buckets.

Tensors are flattened in memory order (``flat_view``), not in index order: a channels_last
convolution weight is dense but not contiguous, so ``view(-1)`` refuses it and
``reshape(-1)`` returns a copy, into which a write would be silently lost. Every rank holds
the same layout, so element k of one rank's flat view is element k of every other's and an
element-wise average is the same whichever order the elements travel in.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch

Segment = tuple[int, int, int]
"""(index of the tensor, first element, end element) of one slice in a bucket."""


def flat_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of ``t``'s elements in the order they lie in memory: writing to it writes
    ``t``. Works for any dense layout (contiguous, channels_last, or another permutation);
    a tensor with gaps or overlaps has no such view and is refused."""
    if t.is_contiguous():
        return t.view(-1)
    # Dimensions by decreasing stride is the order the elements are stored in; for a dense
    # tensor that permutation is contiguous (dimensions of size 1 may sit anywhere).
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    dense = t.permute(order)
    if not dense.is_contiguous():
        raise ValueError(f"cannot flatten a tensor of shape {tuple(t.shape)} with strides "
                         f"{t.stride()} in place: its elements are not one dense block")
    return dense.view(-1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``flat_view`` of ``t`` detached; engines hand over ``.data``, which needs no detach
    (one more op a tensor at every sync), and a contiguous tensor no function call."""
    if t.requires_grad:
        t = t.detach()
    return t.view(-1) if t.is_contiguous() else flat_view(t)


def segments(sizes: list[int], capacity: int) -> Iterator[list[Segment]]:
    """Group slices of tensors with ``sizes`` elements into buckets of <= ``capacity``."""
    bucket: list[Segment] = []
    used = 0
    for i, numel in enumerate(sizes):
        start = 0
        while start < numel:
            take = min(numel - start, capacity - used)
            bucket.append((i, start, start + take))
            used += take
            start += take
            if used == capacity:
                yield bucket
                bucket, used = [], 0
    if bucket:
        yield bucket


def floating_groups(tensors: list[torch.Tensor], select: Collection[int] | None = None,
                    ) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Indices of the floating tensors (those in ``select``, default all) per dtype and
    device, in first-seen order: the same on every rank, so collectives line up. Integer
    tensors (BatchNorm's batch counter) advance identically on every worker and never
    travel."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        if t.is_floating_point() and (select is None or i in select):
            groups.setdefault((t.dtype, t.device), []).append(i)
    return groups


@dataclass
class Slice:
    index: int
    """Position of the tensor in the list handed to ``Bucketer.fill``."""
    start: int
    """First element of the slice within that tensor."""
    pos: int
    """First element of the slice within the bucket."""
    local: torch.Tensor
    """The tensor's own elements (a view: writing to it writes the tensor)."""
    packed: torch.Tensor
    """The same elements inside the bucket."""


@dataclass
class Bucket:
    flat: torch.Tensor
    slices: list[Slice]


class Bucketer:
    def __init__(self, bucket_mb: float) -> None:
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def capacity(self, dtype: torch.dtype) -> int:
        """Elements of ``dtype`` in one bucket."""
        return max(1, self.bucket_bytes // torch.empty((), dtype=dtype).element_size())

    def buffer(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(self.capacity(dtype), dtype=dtype, device=device)
        return self.buffers[key]

    def fill(self, tensors: list[torch.Tensor]) -> Iterator[Bucket]:
        """Buckets holding copies of the floating tensors in ``tensors``, one at a time.

        Integer tensors (BatchNorm's batch counter) are skipped: they advance identically on
        every worker. A bucket is valid until the next one is requested.
        """
        for (dtype, device), idx in floating_groups(tensors).items():
            buf = self.buffer(dtype, device)
            flat = [_flat(tensors[i]) for i in idx]
            for segs in segments([t.numel() for t in flat], buf.numel()):
                sizes = [end - start for _, start, end in segs]
                view = buf[:sum(sizes)]
                # Whole tensors go in as they are, and one cat fills the bucket: one kernel
                # and one call for any number of tensors, where a copy each costs a launch.
                sources = [flat[j] if end - start == flat[j].numel() else flat[j][start:end]
                           for j, start, end in segs]
                if len(sources) == 1:
                    view.copy_(sources[0])
                else:
                    torch.cat(sources, out=view)
                slices: list[Slice] = []
                pos = 0
                for (j, start, _), src, packed in zip(segs, sources, view.split(sizes),
                                                      strict=True):
                    slices.append(Slice(idx[j], start, pos, src, packed))
                    pos += packed.numel()
                yield Bucket(view, slices)
