"""Compressed gradients (the DDP comm hook) under real DDP and gloo, against numpy.

Two processes train a small model whose DDP buckets each hold several parameters, with the
hook compressing gradients. Each rank also computes its own local gradients with a plain
copy of the model at the same parameters; the test replays the rule on those in numpy (per
parameter: m = g + r, C(m) = mean |m| times the sign of m, 0 counting as +, r = m - C(m);
the gradient every rank gets is the mean over ranks of C(m)) and compares with the gradient
DDP left in each parameter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from localsgd.sync.accounting import CommMeter
from localsgd.sync.codecs.feedback import ErrorFeedback
from localsgd.sync.grad_compression import CompressedGrads, hook
from localsgd.sync.reducers.compressed import CompressionKeys, build_codec

WORLD = 2
STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 300), nn.Tanh(), nn.Linear(300, 40), nn.Tanh(),
                         nn.Linear(40, 3))


METHODS = ("ef_sign", "bf16")


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        torch.save({m: _train(rank, m) for m in METHODS}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _train(rank: int, method: str) -> dict[str, list]:
    """Local gradients, the gradients DDP left and the bytes sent, per step."""
    model = _model()
    plain = copy.deepcopy(model)
    # A small bucket cap, so buckets hold several parameters and a large one alone.
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.01)
    state = CompressedGrads(CompressionKeys(method=method), CommMeter(), WORLD)
    state.bind(model)
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)
    local, averaged, nbytes = [], [], []
    for _ in range(STEPS):
        x = torch.randn(16, 12, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        plain.load_state_dict(model.state_dict())
        plain.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()
        local.append([p.grad.clone() for p in plain.parameters()])
        opt.zero_grad()
        before = state.meter.flat()["comm/grad/bytes"]
        nn.functional.cross_entropy(ddp(x), y).backward()
        nbytes.append(state.meter.flat()["comm/grad/bytes"] - before)
        averaged.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return {"local": local, "averaged": averaged, "bytes": nbytes}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Both methods in one start of the processes."""
    tmp = tmp_path_factory.mktemp("hook")
    mp.spawn(_worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(params=METHODS)
def run(request: pytest.FixtureRequest, runs: list[dict]) -> tuple[str, list[dict]]:
    return request.param, [r[request.param] for r in runs]


def scaled_sign(m: np.ndarray) -> np.ndarray:
    return float(np.float32(np.abs(m).mean())) * np.where(m >= 0, 1.0, -1.0)


def bf16(m: np.ndarray) -> np.ndarray:
    return torch.from_numpy(m).to(torch.bfloat16).double().numpy()


def test_every_rank_gets_the_mean_of_the_compressed_gradients(
        run: tuple[str, list[dict]]) -> None:
    method, ranks = run
    codec, feedback = (scaled_sign, True) if method == "ef_sign" else (bf16, False)
    shapes = [g.shape for g in ranks[0]["local"][0]]
    residual = [[np.zeros(int(np.prod(s))) for s in shapes] for _ in range(WORLD)]
    for step in range(STEPS):
        for j in range(len(shapes)):
            sent = []
            for r in range(WORLD):
                m = ranks[r]["local"][step][j].double().numpy().ravel() + residual[r][j]
                c = codec(m)
                if feedback:
                    residual[r][j] = m - c
                sent.append(c)
            want = np.mean(sent, axis=0)
            for r in range(WORLD):
                got = ranks[r]["averaged"][step][j].double().numpy().ravel()
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7,
                                           err_msg=f"{method} step {step} param {j} rank {r}")


def test_bytes_are_one_payload_per_bucket(run: tuple[str, list[dict]]) -> None:
    method, ranks = run
    numel = sum(g.numel() for g in ranks[0]["local"][0])
    fp32 = 4 * numel
    for got in ranks[0]["bytes"]:
        if method == "ef_sign":
            # Signs packed per bucket (a few padding words) and one scale per parameter.
            assert numel / 8 <= got <= numel / 8 + 4 * 6 + 4 * 10
            assert got <= fp32 / 25
        else:
            assert got == 2 * numel


@pytest.mark.parametrize(("keys", "decay"), [
    ({"method": "ef_sign"}, 1.0),
    ({"method": "chunk_topk", "chunk": 16, "ratio": 0.25, "bits": 2}, 0.9),
    ({"method": "quantize", "bits": 3}, 0.5),
])
def test_one_payload_for_many_residuals_equals_one_each(keys: dict, decay: float) -> None:
    """compress_split over any grouping equals compressing each tensor on its own, so DDP's
    regrouping of buckets (after the first step, after a resume) changes nothing."""
    codec = build_codec(CompressionKeys(**keys))
    assert codec.segmentwise
    gen = torch.Generator().manual_seed(3)
    sizes = [37, 5, 64, 1]
    split, alone = ErrorFeedback(decay), ErrorFeedback(decay)
    groupings = [[[0, 1, 2, 3]], [[0], [1, 2], [3]], [[2, 3], [0, 1]]]
    for grouping in groupings:
        xs = [torch.randn(n, generator=gen) for n in sizes]
        for keys in grouping:
            flat = torch.cat([xs[k] for k in keys])
            bounds = np.cumsum([0] + [sizes[k] for k in keys])
            segments = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            payload = split.compress_split(keys, flat, codec, segments)
            got = codec.decode(payload, flat.numel(), segments, flat.dtype)
            for k, (a, b) in zip(keys, segments, strict=True):
                one = alone.compress(k, xs[k], codec, [(0, sizes[k])])
                assert torch.equal(got[a:b], codec.decode(one, sizes[k], [(0, sizes[k])],
                                                          flat.dtype))
                assert torch.equal(split.residuals[k], alone.residuals[k])
