"""Syncs of channels_last tensors (``model.channels_last``), in process on thread workers.

A channels_last convolution weight, and the momentum and gradients made from it, are dense
but not contiguous. Every sync rule must give the same numbers, bit for bit, as for the
contiguous layout, and write into the tensors themselves rather than into a copy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from threads import FakeTarget, Worker, run_workers

from localsgd.sync.buckets import flat_view
from localsgd.sync.config import SyncConfig
from localsgd.sync.updates.outer import OuterOptimizerKeys

SHAPES = [(40,), (4, 3, 2, 3), (5,)]
"""A 4-D tensor between two flat ones, so slices before and after it are checked too."""


def sync(**kw: object) -> SyncConfig:
    return SyncConfig(topology="threads", reducer="threads", **kw)  # type: ignore[arg-type]


CASES = {
    "blocking": sync(algorithm="local", period=3, momentum="average"),
    "hierarchical": sync(algorithm="hierarchical", period=2, block_period=2),
    "overlapped": sync(algorithm="local", period=4, overlap_steps=2, momentum="average"),
    "fragments": sync(algorithm="local", period=4, overlap_steps=1, fragments=2),
    "outer": sync(algorithm="local", period=3, update="outer",
                  outer=OuterOptimizerKeys(lr=0.7, momentum=0.9, nesterov=True)),
}


def targets(channels_last: bool) -> Callable[[int], FakeTarget]:
    return lambda rank: FakeTarget(rank, SHAPES, channels_last=channels_last)


@pytest.mark.parametrize("case", list(CASES))
def test_channels_last_tensors_sync_bitwise_like_contiguous_ones(case: str) -> None:
    plain, _ = run_workers(CASES[case], steps=10, finish=True, target=targets(False))
    last, _ = run_workers(CASES[case], steps=10, finish=True, target=targets(True))
    for a, b in zip(plain, last, strict=True):
        weight, momentum = b.target.params[1], b.target.momentum[1]
        assert not weight.is_contiguous()
        assert weight.is_contiguous(memory_format=torch.channels_last)
        assert momentum.is_contiguous(memory_format=torch.channels_last)
        assert all(torch.equal(x, y) for x, y in zip(a.whole_after, b.whole_after,
                                                        strict=True))
        assert all(torch.equal(x, y) for x, y in zip(a.target.tensors(), b.target.tensors(),
                                                        strict=True))
    # Not vacuous: the syncs moved the 4-D tensor (a lost write would leave it local).
    assert any(not torch.equal(w.before[t], w.after[t]) for w in last for t in range(10))
    assert all(torch.equal(w.target.params[1], last[0].target.params[1]) for w in last)


def test_the_averaged_copy_takes_the_layout_of_the_model() -> None:
    copies: dict[int, torch.nn.Module] = {}

    def evaluate(w: Worker, t: int) -> None:
        if t != 4:  # between the syncs at steps 3 and 6
            return
        out = torch.nn.Module()
        for i, p in enumerate(w.target.params):
            out.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros_like(p)))
        out.register_buffer("b", torch.zeros(3, dtype=torch.float64))
        out.register_buffer("n", torch.zeros((), dtype=torch.long))
        w.controller.averaged_copy(w.target, out)
        copies[w.rank] = out
        # A copy laid out otherwise would receive the elements in the wrong places.
        wrong = torch.nn.Module()
        for i, p in enumerate(w.target.params):
            wrong.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(p.shape,
                                                                             dtype=p.dtype)))
        wrong.register_buffer("b", torch.zeros(3, dtype=torch.float64))
        wrong.register_buffer("n", torch.zeros((), dtype=torch.long))
        with pytest.raises(ValueError, match="memory layout"):
            w.controller.averaged_copy(w.target, wrong)

    # Rank by rank the bad call raises before its collective, so the workers stay aligned.
    workers, _ = run_workers(sync(algorithm="local", period=3), steps=5, between=evaluate,
                             target=targets(True))
    got = torch.cat([p.detach().reshape(-1) for p in copies[0].parameters()])
    expected = np.mean([w.after[4].numpy() for w in workers], axis=0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_flat_view_is_the_tensor_in_memory_order() -> None:
    t = torch.arange(24.0).reshape(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    flat = flat_view(t)
    assert flat.data_ptr() == t.data_ptr() and flat.numel() == t.numel()
    flat.add_(1)  # a view: the tensor itself changes
    assert torch.equal(t, torch.arange(1.0, 25.0).reshape(2, 3, 2, 2))
    assert torch.equal(flat, t.permute(0, 2, 3, 1).reshape(-1))
    with pytest.raises(ValueError, match="not one dense block"):
        flat_view(torch.zeros(4, 4)[:, ::2])
