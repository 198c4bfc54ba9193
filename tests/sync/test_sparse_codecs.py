"""Chunked top-k, the value quantizer and decayed error feedback, in one process: every
expectation is computed here with numpy (chunk layout, top-k sets, bin statistics, bit
streams, byte counts), not with the codecs' own helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from localsgd.sync.codecs.base import Codec
from localsgd.sync.codecs.feedback import ErrorFeedback
from localsgd.sync.reducers.compressed import CompressionKeys, build_codec

SEGMENTS = [(0, 9000), (9000, 9001), (9001, 9017), (9017, 13113), (13113, 13500)]
"""A large tensor (2 full chunks of 4096 and a tail), a scalar, a bias, one exact chunk."""
N = 13500


def codec(method: str, bits: int = 0, ratio: float = 1 / 64, chunk: int = 4096) -> Codec:
    return build_codec(CompressionKeys(method=method, bits=bits, ratio=ratio, chunk=chunk))


def np_keep(ratio: float, n: int) -> int:
    return min(n, max(1, math.ceil(ratio * n * (1 - 1e-12))))


def np_unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """The documented bit stream read back: stream bit k is bit k % 32 of word k // 32."""
    unsigned = words.astype(np.int64) & 0xFFFFFFFF
    stream = ((unsigned[:, None] >> np.arange(32)) & 1).reshape(-1)[: n * bits]
    return (stream.reshape(n, bits) << np.arange(bits)).sum(1)


def np_chunks(segments: list[tuple[int, int]], chunk: int) -> list[tuple[int, int]]:
    out = []
    for a, b in segments:
        out += [(s, min(s + chunk, b)) for s in range(a, b, chunk)]
    return out


def heavy_tailed(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 2, n)  # continuous: no ties


@pytest.mark.parametrize(("chunk", "ratio"), [(4096, 1 / 64), (4096, 0.03), (1000, 0.01),
                                              (64, 0.1), (1, 1.0)])
def test_chunk_topk_keeps_exactly_the_k_largest_of_every_chunk(chunk: int, ratio: float) -> None:
    x = heavy_tailed(N, 1)
    c = codec("chunk_topk", ratio=ratio, chunk=chunk)
    payload = c.encode(torch.from_numpy(x), SEGMENTS)
    values, words = (t.numpy() for t in payload.tensors)
    bits = max(1, math.ceil(math.log2(chunk)))
    chunks = np_chunks(SEGMENTS, chunk)
    k_total = sum(np_keep(ratio, b - a) for a, b in chunks)
    assert values.shape == (k_total,) and words.dtype == np.int32
    assert words.shape == (math.ceil(k_total * bits / 32),)
    offsets = np_unpack(words, bits, k_total)
    pos = 0
    for a, b in chunks:
        k = np_keep(ratio, b - a)
        mine = offsets[pos:pos + k]
        assert np.all(mine < b - a)
        expected = np.argsort(-np.abs(x[a:b]))[:k]
        assert set(mine.tolist()) == set(expected.tolist()), (a, b)
        np.testing.assert_array_equal(values[pos:pos + k], x[a + mine])
        pos += k
    dense = c.decode(payload, N, SEGMENTS, torch.float64).numpy()
    kept = np.zeros(N, bool)
    pos = 0
    for a, b in chunks:
        k = np_keep(ratio, b - a)
        kept[a + offsets[pos:pos + k]] = True
        pos += k
    np.testing.assert_array_equal(dense[kept], x[kept])
    assert not dense[~kept].any()


def np_quantize(values: np.ndarray, groups: np.ndarray, n_groups: int,
                bits: int) -> tuple[np.ndarray, np.ndarray]:
    """SparseLoCo's quantizer as described: per group, bins of 6 sigma / B from mu - 3 sigma,
    each decoded as the mean of its members (float32 codebook)."""
    bins = 2**bits
    book = np.zeros((n_groups, bins))
    code = np.zeros(len(values), np.int64)
    for g in range(n_groups):
        mine = groups == g
        v = values[mine]
        if not len(v):
            continue
        mu, sigma = v.mean(), v.std()
        c = (np.clip(np.floor((v - (mu - 3 * sigma)) / (6 * sigma / bins)), 0, bins - 1)
             if sigma > 0 else np.zeros(len(v)))
        code[mine] = c
        for b in range(bins):
            if np.any(c == b):
                book[g, b] = v[c == b].mean()
    return book.astype(np.float32), code


@pytest.mark.parametrize(("method", "bits"), [("chunk_topk", 2), ("chunk_topk", 1),
                                              ("topk", 3), ("randomk", 2), ("quantize", 4),
                                              ("quantize", 8)])
def test_quantized_decode_equals_numpy(method: str, bits: int) -> None:
    x = heavy_tailed(N, 2)
    inner, quant = codec(method, ratio=0.02), codec(method, bits=bits, ratio=0.02)
    gen = (torch.Generator().manual_seed(5) for _ in "ab")  # randomk: the same draw
    plain = inner.decode(inner.encode(torch.from_numpy(x), SEGMENTS, next(gen)), N, SEGMENTS,
                         torch.float64).numpy()
    payload = quant.encode(torch.from_numpy(x), SEGMENTS, next(gen))
    got = quant.decode(payload, N, SEGMENTS, torch.float64).numpy()
    where = np.flatnonzero(plain)  # the positions the sparsifier kept (values are nonzero)
    starts = np.array([a for a, _ in SEGMENTS])
    groups = np.searchsorted(starts, where, side="right") - 1
    book, code = np_quantize(plain[where], groups, len(SEGMENTS), bits)
    np.testing.assert_allclose(payload.tensors[0].numpy(), book, rtol=1e-6, atol=0)
    expected = np.zeros(N)
    expected[where] = book[groups, code]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert np.count_nonzero(got[np.setdiff1d(np.arange(N), where)]) == 0
    # The codes travel truly packed: bits per kept value, no more.
    assert payload.tensors[1].numel() == math.ceil(len(where) * bits / 32)
    assert len(np.unique(got[where])) <= len(SEGMENTS) * 2**bits


def closed_form(method: str, bits: int, ratio: float, chunk: int,
                segments: list[tuple[int, int]], esize: int) -> int:
    """Bytes of one payload by the formula of docs/compression.md."""
    numel = segments[-1][1] if segments else 0
    if method == "chunk_topk":
        k = sum(np_keep(ratio, b - a) for a, b in np_chunks(segments, chunk))
        rest = 4 * math.ceil(k * max(1, math.ceil(math.log2(chunk))) / 32)
    elif method == "topk":
        k = np_keep(ratio, numel) if numel else 0
        rest = 4 * k
    else:  # quantize
        k, rest = sum(b - a for a, b in segments), 0
    values = (4 * max(len(segments), 1) * 2**bits + 4 * math.ceil(k * bits / 32) if bits
              else k * esize)
    return values + rest


@pytest.mark.parametrize(("method", "bits"), [("chunk_topk", 0), ("chunk_topk", 2),
                                              ("chunk_topk", 7), ("topk", 2), ("quantize", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_payload_bytes_equal_the_closed_form(method: str, bits: int, dtype: torch.dtype) -> None:
    for chunk in (4096, 100, 2):
        for segments in (SEGMENTS, [(0, 1)], [(0, 5000)], [(0, 4096), (4096, 8192)]):
            n = segments[-1][1]
            c = codec(method, bits=bits, ratio=1 / 64, chunk=chunk)
            x = torch.from_numpy(heavy_tailed(n, 3)).to(dtype)
            payload = c.encode(x, segments)
            expected = closed_form(method, bits, 1 / 64, chunk, segments, x.element_size())
            assert payload.nbytes == expected, (method, bits, chunk, segments)
            shapes = c.payload_shapes(n, segments, dtype)
            assert [(tuple(t.shape), t.dtype) for t in payload.tensors] == shapes


def test_sparseloco_encoding_is_112_bytes_per_4096_values_plus_a_codebook() -> None:
    """k = 64 of 4096 (1.56%): 64 x 12-bit places + 64 x 2-bit codes = 112 bytes, and one
    codebook of 4 float32 per tensor: about 146x fewer bytes than fp32 for a large tensor."""
    n = 4096 * 64
    c = codec("chunk_topk", bits=2)
    payload = c.encode(torch.randn(n), [(0, n)])
    assert payload.nbytes == 64 * 112 + 16
    assert 145 < 4 * n / payload.nbytes < 4 * 4096 / 112


@pytest.mark.parametrize(("method", "bits"), [("chunk_topk", 2), ("topk", 2), ("quantize", 3),
                                              ("chunk_topk", 0), ("ef_sign", 0)])
@pytest.mark.parametrize("beta", [0.95, 0.5, 0.0])
def test_decayed_feedback_sent_plus_residual_is_input_plus_decayed_residual(
        method: str, bits: int, beta: float) -> None:
    c, feedback = codec(method, bits=bits, ratio=0.05, chunk=512), ErrorFeedback(beta)
    old = np.zeros(N)
    rng = np.random.default_rng(4)
    for step in range(5):
        x = rng.standard_normal(N) * (step + 1)
        payload = feedback.compress("w", torch.from_numpy(x), c, SEGMENTS)
        sent = c.decode(payload, N, SEGMENTS, torch.float64).numpy()
        new = feedback.residuals["w"].numpy()
        memory = x + beta * old
        assert np.abs(sent + new - memory).max() <= 1e-12 * max(1.0, np.abs(memory).max())
        if step and method != "quantize":
            assert np.abs(new).max() > 0  # something was dropped and is owed
        old = new.copy()
    # The split form (one residual per segment, segmentwise codecs) keeps the same rule.
    if c.segmentwise:
        split = ErrorFeedback(beta)
        keys = [f"p{i}" for i in range(len(SEGMENTS))]
        x = torch.from_numpy(rng.standard_normal(N))
        for _ in range(3):
            whole = ErrorFeedback(beta)
            whole.residuals = {"w": torch.cat([split.residuals[k] for k in keys])} \
                if split.residuals else {}
            a = whole.compress("w", x, c, SEGMENTS)
            b = split.compress_split(keys, x, c, SEGMENTS)
            assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors, strict=True))


def test_decay_one_is_plain_feedback_bitwise() -> None:
    c = codec("chunk_topk", bits=2, chunk=256)
    plain, one = ErrorFeedback(), ErrorFeedback(1.0)
    rng = np.random.default_rng(7)
    for _ in range(4):
        x = torch.from_numpy(rng.standard_normal(N)).float()
        a, b = plain.compress(0, x, c, SEGMENTS), one.compress(0, x, c, SEGMENTS)
        assert all(torch.equal(u, v) for u, v in zip(a.tensors, b.tensors, strict=True))
        assert torch.equal(plain.residuals[0], one.residuals[0])
    with pytest.raises(ValueError, match="feedback_decay"):
        ErrorFeedback(1.5)
