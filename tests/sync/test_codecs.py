"""Codecs for compressed communication, in one process: every expectation is computed here
with numpy (bit streams, per-segment scales, top-k sets, variances), not with the codecs'
own helpers."""

from __future__ import annotations

import io
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from localsgd.sync.codecs.base import CODECS, Codec, keep_count
from localsgd.sync.codecs.feedback import ErrorFeedback
from localsgd.sync.codecs.packing import pack_bits, unpack_bits

METHODS = ["none", "bf16", "sign", "ef_sign", "topk", "randomk", "qsgd", "chunk_topk", "quantize"]
SIZES = [0, 1, 31, 32, 33, 1000, 4097]


def numpy_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """The documented layout built independently: value i's bit j is stream bit i*b + j,
    stream bit k is bit k % 32 of word k // 32 (little-endian bytes, LSB first)."""
    stream = ((values[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    words = -(-len(values) * bits // 32)
    stream = np.concatenate([stream, np.zeros(words * 32 - len(stream), np.uint8)])
    return np.packbits(stream, bitorder="little").view("<u4").astype(np.int64)


def split(n: int, parts: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``parts`` contiguous segments covering [0, n) with random lengths."""
    cuts = np.sort(rng.choice(np.arange(1, n), parts - 1, replace=False))
    bounds = [0, *cuts.tolist(), n]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def make(method: str, ratio: float = 0.25, levels: int = 3) -> Codec:
    return CODECS.get(method)(ratio=ratio, levels=levels)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 32])
def test_pack_unpack_round_trip_and_layout(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for n in SIZES:
        values = rng.integers(0, 2**bits, n, dtype=np.int64)
        words = pack_bits(torch.from_numpy(values), bits)
        assert words.dtype == torch.int32 and words.shape == (math.ceil(n * bits / 32),)
        # Same 32 bits as the numpy layout (int32 -> unsigned, so bit 31 is compared too).
        assert np.array_equal(words.numpy().astype(np.int64) & 0xFFFFFFFF,
                              numpy_pack(values, bits))
        back = unpack_bits(words, bits, n)
        assert back.dtype == torch.int64 and np.array_equal(back.numpy(), values)


def test_pack_bit_31_is_the_int32_sign() -> None:
    ones = pack_bits(torch.ones(32, dtype=torch.int64), 1)
    assert ones.tolist() == [-1]
    top = pack_bits(torch.tensor([0] * 31 + [1]), 1)
    assert top.tolist() == [-(2**31)]
    assert unpack_bits(top, 1, 32).tolist() == [0] * 31 + [1]


def test_sign_matches_numpy_per_segment_and_is_small() -> None:
    rng = np.random.default_rng(0)
    n = 100_000
    segments = split(n, 10, rng)
    x = rng.standard_normal(n) * np.repeat(10.0 ** rng.uniform(-3, 3, 10),
                                           [e - s for s, e in segments])
    x[rng.choice(n, 50, replace=False)] = 0.0  # zero takes the sign +1
    codec = make("sign")
    payload = codec.encode(torch.from_numpy(x), segments, None)
    got = codec.decode(payload, n, segments, torch.float64).numpy()
    expected = np.concatenate([np.abs(x[s:e]).mean() * np.where(x[s:e] >= 0, 1.0, -1.0)
                               for s, e in segments])
    # The scale travels as float32: a relative 2^-24 of rounding.
    np.testing.assert_allclose(got, expected, rtol=2**-23, atol=0)
    assert np.array_equal(np.sign(got), np.where(x >= 0, 1.0, -1.0))
    assert payload.nbytes <= n * 4 / 25
    assert payload.nbytes == math.ceil(n / 32) * 4 + 10 * 4


def test_scaled_codecs_leave_gaps_at_zero() -> None:
    x = torch.arange(1.0, 21.0, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(10)
    segments = [(2, 6), (6, 9), (14, 20)]
    for method in ("sign", "qsgd"):
        codec = make(method)
        out = codec.decode(codec.encode(x, segments, torch.Generator().manual_seed(0)), 20,
                           segments, torch.float64)
        assert out[:2].eq(0).all() and out[9:14].eq(0).all(), method
    sign = make("sign").encode(x, segments, None)
    assert sign.tensors[1].tolist() == pytest.approx([(3 + 4 + 5 + 6) / 4, (7 + 8 + 9) / 3,
                                                      (15 + 16 + 17 + 18 + 19 + 20) / 6])


@pytest.mark.parametrize("method", METHODS)
def test_error_feedback_sent_plus_residual_is_input_plus_old_residual(method: str) -> None:
    rng = np.random.default_rng(1)
    n = 777
    segments = [(0, 100), (100, 101), (101, 700), (700, 777)]
    codec, feedback = make(method), ErrorFeedback()
    generator = torch.Generator().manual_seed(1)
    for key in (0, "b"):
        old = np.zeros(n)
        for step in range(6):
            x = rng.standard_normal(n) * (step + 1)
            payload = feedback.compress(key, torch.from_numpy(x), codec, segments, generator)
            sent = codec.decode(payload, n, segments, torch.float64).numpy()
            new = feedback.residuals[key].numpy()
            scale = max(1.0, np.abs(x + old).max())
            assert np.abs(sent + new - (x + old)).max() <= 1e-12 * scale, (method, step)
            if method == "none":
                assert not new.any()
            old = new.copy()


def test_ef_sign_is_sign_with_feedback_and_every_method_registered() -> None:
    assert sorted(CODECS.names()) == sorted(METHODS)
    assert [m for m in METHODS if CODECS.get(m).error_feedback] == ["ef_sign"]
    assert issubclass(CODECS.get("ef_sign"), CODECS.get("sign"))
    with pytest.raises(ValueError, match="ratio"):
        make("topk", ratio=0.0)
    with pytest.raises(ValueError, match="levels"):
        make("qsgd", levels=0)
    with pytest.raises(ValueError, match="levels"):
        make("qsgd", levels=17)
    with pytest.raises(ValueError, match="segments"):
        make("sign").encode(torch.zeros(10), [(0, 6), (5, 10)], None)


def test_keep_count() -> None:
    for ratio, n in [(0.07, 100), (0.1, 1000), (1 / 3, 10), (0.001, 10), (1.0, 5), (0.5, 7)]:
        exact = math.ceil(Fraction(str(ratio)) * n)
        assert keep_count(ratio, n) == min(n, max(1, exact)), (ratio, n)
    assert keep_count(0.5, 0) == 0


@pytest.mark.parametrize("ratio", [0.01, 0.07, 0.5, 1.0])
def test_topk_keeps_exactly_the_largest_magnitudes(ratio: float) -> None:
    rng = np.random.default_rng(2)
    n = 1000
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-2, 2, n)  # continuous: no ties
    k = max(1, math.ceil(Fraction(str(ratio)) * n))
    codec = make("topk", ratio=ratio)
    payload = codec.encode(torch.from_numpy(x), [(0, 400), (400, n)], None)
    values, indices = payload.tensors
    assert indices.dtype == torch.int32 and len(indices) == k == len(values)
    top = np.argsort(-np.abs(x))[:k]
    assert set(indices.tolist()) == set(top.tolist())
    out = codec.decode(payload, n, [(0, 400), (400, n)], torch.float64).numpy()
    assert np.array_equal(out[top], x[top])
    rest = np.ones(n, bool)
    rest[top] = False
    assert not out[rest].any()


def test_randomk_is_unbiased_with_distinct_indices() -> None:
    rng = np.random.default_rng(3)
    n, draws, ratio = 64, 4000, 0.25
    k = 16
    x = rng.standard_normal(n)
    codec = make("randomk", ratio=ratio)
    generator = torch.Generator().manual_seed(3)
    total = np.zeros(n)
    for _ in range(draws):
        payload = codec.encode(torch.from_numpy(x), [(0, n)], generator)
        indices = payload.tensors[1].tolist()
        assert len(indices) == k == len(set(indices))
        total += codec.decode(payload, n, [(0, n)], torch.float64).numpy()
    mean = total / draws
    # Element i is x_i * n/k with probability k/n, else 0: variance x_i^2 (n/k - 1).
    stderr = np.abs(x) * math.sqrt((n / k - 1) / draws)
    assert np.all(np.abs(mean - x) <= 5 * stderr + 1e-12)
    assert not np.allclose(mean, x, rtol=1e-3)  # it is random: a bug making it exact fails


def test_qsgd_is_unbiased_levels_in_range_and_norm_kept() -> None:
    rng = np.random.default_rng(4)
    n, draws, levels = 60, 4000, 2
    s = 2**levels - 1
    segments = [(0, 20), (20, 21), (21, 60)]
    x = rng.standard_normal(n)
    x[5] = 0.0
    norms = np.array([np.linalg.norm(x[a:b]) for a, b in segments])
    norm = np.repeat(norms, [b - a for a, b in segments])
    r = s * np.abs(x) / norm
    codec = make("qsgd", levels=levels)
    # Segments are quantised independently, so one bucket of `draws` copies of x (each
    # copy's tensors its own segments) is `draws` independent draws in one encode.
    tiled = [(i * n + a, i * n + b) for i in range(draws) for a, b in segments]
    payload = codec.encode(torch.from_numpy(np.tile(x, draws)), tiled,
                           torch.Generator().manual_seed(4))
    sent_norms, words = payload.tensors
    np.testing.assert_allclose(sent_norms.numpy(), np.tile(norms, draws), rtol=2**-23)
    code = unpack_bits(words, levels + 1, n * draws).numpy().reshape(draws, n)
    level, negative = code & s, code >> levels
    assert np.all((level == np.floor(r)) | (level == np.ceil(r)))
    assert np.all(level <= s) and np.all(negative == (x < 0))
    out = codec.decode(payload, n * draws, tiled, torch.float64).numpy().reshape(draws, n)
    np.testing.assert_allclose(out, norm * np.where(x < 0, -1, 1) * level / s, rtol=2**-22)
    mean = out.mean(0)
    p = r - np.floor(r)
    stderr = norm / s * np.sqrt(p * (1 - p) / draws)
    assert np.all(np.abs(mean - x) <= 5 * stderr + 1e-6 * norm)
    assert not np.allclose(mean, x, rtol=1e-4)  # it is random: a bug making it exact fails
    for (a, b), full in zip(segments, norms, strict=True):
        assert np.linalg.norm(mean[a:b]) == pytest.approx(full, rel=0.02)
    # QSGD's variance bound, summed over segments: E||Q(d) - d||^2 <= min(n/s^2,
    # sqrt(n)/s) ||d||^2.
    bound = sum(min((b - a) / s**2, math.sqrt(b - a) / s) * nm**2
                for (a, b), nm in zip(segments, norms, strict=True))
    assert np.sum((out - x) ** 2) / draws <= bound
    # The generator drives the rounding: the same seed repeats a payload, the next draw
    # of one generator does not.
    generator = torch.Generator().manual_seed(9)
    first, second = (codec.encode(torch.from_numpy(x), segments, generator) for _ in "ab")
    again = codec.encode(torch.from_numpy(x), segments, torch.Generator().manual_seed(9))
    assert torch.equal(first.tensors[1], again.tensors[1])
    assert not torch.equal(first.tensors[1], second.tensors[1])


def test_bf16_round_trip_within_2_to_minus_8() -> None:
    rng = np.random.default_rng(5)
    n = 10_000
    x = rng.standard_normal(n) * 10.0 ** rng.uniform(-30, 30, n)
    codec = make("bf16")
    payload = codec.encode(torch.from_numpy(x), [(0, n)], None)
    assert payload.tensors[0].dtype == torch.bfloat16 and payload.nbytes == 2 * n
    out = codec.decode(payload, n, [(0, n)], torch.float64).numpy()
    assert np.all(np.abs(out - x) <= 2.0**-8 * np.abs(x))
    assert np.abs(out - x).max() > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_payload_shapes_are_known_before_the_data(method: str, dtype: torch.dtype) -> None:
    codec = make(method, ratio=0.3, levels=5)
    for n in SIZES:
        for segments in ([(0, n)], [(0, n // 3), (n // 3, n)], [(0, n // 2)], []):
            expected = codec.payload_shapes(n, segments, dtype)
            buffer = codec.empty_payload(n, segments, dtype)
            assert [(tuple(t.shape), t.dtype) for t in buffer.tensors] == expected
            for seed in (0, 1):  # two ranks, different data and randomness: same shapes
                x = torch.randn(n, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(seed)).to(dtype)
                payload = codec.encode(x, segments, torch.Generator().manual_seed(seed))
                got = [(tuple(t.shape), t.dtype) for t in payload.tensors]
                assert got == expected, (method, n, segments)
                assert payload.nbytes == sum(math.prod(shape) * torch.empty(0, dtype=dt)
                                             .element_size() for shape, dt in expected)
                assert codec.decode(payload, n, segments, dtype).shape == (n,)


def test_error_feedback_state_dict_round_trips_bitwise() -> None:
    codec, feedback = make("ef_sign"), ErrorFeedback()
    segments = [(0, 30), (30, 50)]
    inputs = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    for key in (0, 1, "head"):
        for x in inputs[:3]:
            feedback.compress(key, x, codec, segments)
    buffer = io.BytesIO()
    torch.save(feedback.state_dict(), buffer)
    buffer.seek(0)
    resumed = ErrorFeedback()
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.residuals.keys() == feedback.residuals.keys()
    for key, residual in feedback.residuals.items():
        assert torch.equal(resumed.residuals[key], residual)
    for x in inputs[3:]:
        a = feedback.compress("head", x, codec, segments).tensors
        b = resumed.compress("head", x, codec, segments).tensors
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert torch.equal(resumed.residuals["head"], feedback.residuals["head"])


def test_merge_states_is_the_mean_with_missing_keys_as_zero() -> None:
    rng = np.random.default_rng(6)
    old = [{0: rng.standard_normal(8), 1: rng.standard_normal(3)},
           {0: rng.standard_normal(8)},
           {0: rng.standard_normal(8), 1: rng.standard_normal(3)}]
    states = [{"residuals": {k: torch.from_numpy(v).float() for k, v in r.items()}}
              for r in old]
    merged = ErrorFeedback.merge_states(states)["residuals"]
    assert set(merged) == {0, 1}
    for key in (0, 1):
        expected = sum(r[key].astype(np.float32).astype(np.float64) for r in old if key in r)
        assert merged[key].dtype == torch.float32
        np.testing.assert_allclose(merged[key].numpy(), expected / 3, rtol=1e-6)
    # What the averaged model is owed (the mean residual) is kept, whatever the new size.
    owed = sum(s["residuals"][0] for s in states) / 3
    torch.testing.assert_close(merged[0], owed)
    assert ErrorFeedback.merge_states([]) == {"residuals": {}}
    with pytest.raises(ValueError, match="shapes"):
        ErrorFeedback.merge_states([{"residuals": {0: torch.zeros(2)}},
                                    {"residuals": {0: torch.zeros(3)}}])
    feedback = ErrorFeedback()
    feedback.load_state_dict({})
    assert feedback.residuals == {}
