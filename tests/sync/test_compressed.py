"""Compressed model averaging under real gloo all-gathers (4 processes), against numpy.

The expectations replay the paper's rules independently: each worker's delta from the last
consensus d_i = anchor - theta_i, error feedback m_i = d_i + r_i, a per-tensor scaled sign
(mean |m| times the sign, 0 counting as +) or the k largest magnitudes, the new model
anchor - mean_i C(m_i) on every worker, and r_i = m_i - C(m_i).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_refused
from procs import Record, Scenario, run_processes
from threads import scaled_sign

from localsgd.sync.reducers.compressed import CompressionKeys
from localsgd.sync.updates.outer import OuterOptimizerKeys

K = 4


def local(method: str, **kw: object) -> dict[str, object]:
    extra = {k: v for k, v in kw.items() if k in ("ratio", "levels", "error_feedback")}
    rest = {k: v for k, v in kw.items() if k not in extra}
    return {"algorithm": "local", "period": 2,
            "compression": CompressionKeys(method=method, **extra), **rest}  # type: ignore[arg-type]


SCENARIOS = [
    Scenario("sign", local("sign"), steps=6),
    Scenario("ef_sign", local("ef_sign"), steps=6, resume_at=3, finish=True),
    # The paper's EF-sign SGD: a sync after every step, so each delta is that step's update.
    Scenario("ef_sign_h1", local("ef_sign", period=1), steps=5),
    Scenario("topk_ef", local("topk", ratio=0.1, error_feedback=True), steps=6),
    Scenario("randomk", local("randomk", ratio=0.25), steps=4),
    Scenario("qsgd", local("qsgd", levels=3), steps=4),
    Scenario("bf16", local("bf16"), steps=4),
    Scenario("hier", {"algorithm": "hierarchical", "period": 1, "block_period": 2,
                      "compression": CompressionKeys(method="ef_sign")},
             steps=4, local_world=2),
    # DiLoCo with a compressed outer gradient (Nesterov), resumed mid-period from one anchor.
    Scenario("ef_sign_outer", local("ef_sign", update="outer",
                                    outer=OuterOptimizerKeys(lr=0.7, momentum=0.9,
                                                             nesterov=True)),
             steps=6, resume_at=3),
    # Overlapped: a checkpoint at step 5 holds the compressed average of step 4 in flight.
    Scenario("ef_sign_overlap", local("ef_sign", period=4, overlap_steps=2), steps=8,
             resume_at=5, finish=True),
    # Resumes with another codec (mid-period) and with compression turned on (at a boundary).
    Scenario("ef_sign_to_bf16", local("ef_sign"), steps=6, resume_at=3,
             resume_with=local("bf16")),
    Scenario("none_to_ef_sign", local("none"), steps=6, resume_at=4,
             resume_with=local("ef_sign")),
    # SparseLoCo: chunked top-k, 2-bit values, decayed error feedback, outer SGD; resumed
    # mid-period with its residuals owed.
    Scenario("sparseloco", {"algorithm": "local", "period": 2, "update": "outer",
                            "compression": CompressionKeys(
                                method="chunk_topk", chunk=16, ratio=0.25, bits=2,
                                error_feedback=True, feedback_decay=0.9),
                            "outer": OuterOptimizerKeys(lr=1.0, momentum=0.0)},
             steps=6, resume_at=3, finish=True),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Record]]:
    return run_processes(K, SCENARIOS, tmp_path_factory.mktemp("compressed"))


def top_k(m: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(m)
    keep = np.argsort(-np.abs(m), kind="stable")[:k]
    out[keep] = m[keep]
    return out


def bf16(m: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(m).to(torch.bfloat16).double().numpy()


def check_sync(anchor: np.ndarray, before: np.ndarray, after: np.ndarray,
               residual: list[np.ndarray], codec, feedback: bool,
               decay: float = 1.0) -> np.ndarray:
    """One compressed sync: every worker must hold anchor - mean_i C(d_i + decay r_i);
    updates the residuals and returns the new anchor."""
    sent = []
    for i in range(K):
        m = anchor - before[i] + (decay * residual[i] if feedback else 0.0)
        c = codec(m)
        residual[i] = m - c
        sent.append(c)
    new = anchor - np.mean(sent, axis=0)
    for i in range(K):
        np.testing.assert_allclose(after[i], new, rtol=1e-6, atol=1e-9)
    return after[0]


def replay(ranks: list[dict[str, Record]], name: str, codec, feedback: bool,
           period: int = 2, decay: float = 1.0) -> None:
    """Check every step of scenario ``name`` against the rule, with ``codec`` in numpy."""
    recs = [r[name] for r in ranks]
    anchor = _initial(recs)
    residual = [np.zeros(66) for _ in recs]
    for t in range(len(recs[0].after)):
        before = np.stack([r.before[t].numpy() for r in recs])
        after = np.stack([r.after[t].numpy() for r in recs])
        if (t + 1) % period:
            np.testing.assert_array_equal(after, before)
            continue
        anchor = check_sync(anchor, before, after, residual, codec, feedback, decay)


def _initial(recs: list[Record]) -> np.ndarray:
    """The model every worker started from (FakeTarget seeds it alike)."""
    from threads import FakeTarget

    return FakeTarget(0).flat().numpy()


def test_local_sign_sgd_follows_the_scaled_sign_rule(ranks: list[dict[str, Record]]) -> None:
    replay(ranks, "sign", scaled_sign, feedback=False)


def test_local_ef_sign_sgd_follows_the_rule_with_error_feedback(
        ranks: list[dict[str, Record]]) -> None:
    replay(ranks, "ef_sign", scaled_sign, feedback=True)


def test_ef_sign_sgd_compresses_every_update_with_error_feedback(
        ranks: list[dict[str, Record]]) -> None:
    replay(ranks, "ef_sign_h1", scaled_sign, feedback=True, period=1)


def test_top_k_with_error_feedback_keeps_the_k_largest(ranks: list[dict[str, Record]]) -> None:
    replay(ranks, "topk_ef", lambda m: top_k(m, math.ceil(0.1 * 66)), feedback=True)


def test_bf16_sends_rounded_deltas(ranks: list[dict[str, Record]]) -> None:
    replay(ranks, "bf16", bf16, feedback=False)


@pytest.mark.parametrize("name", ["randomk", "qsgd"])
def test_random_codecs_leave_every_worker_on_the_same_model(
        ranks: list[dict[str, Record]], name: str) -> None:
    recs = [r[name] for r in ranks]
    for t in (1, 3):
        assert all(np.array_equal(r.after[t].numpy(), recs[0].after[t].numpy()) for r in recs)
        assert not np.array_equal(recs[0].after[t].numpy(), recs[1].before[t].numpy())


def test_ef_sign_under_a_nesterov_outer_step_follows_the_rule(
        ranks: list[dict[str, Record]]) -> None:
    """Delta = mean_i C(anchor - theta_i + r_i), u <- 0.9 u + Delta, anchor -= 0.7 (Delta +
    0.9 u): gamma is 1 here (no inner LR schedule), so both conventions agree."""
    recs = [r["ef_sign_outer"] for r in ranks]
    anchor, u = _initial(recs), np.zeros(66)
    residual = [np.zeros(66) for _ in recs]
    for t in range(6):
        before = np.stack([r.before[t].numpy() for r in recs])
        after = np.stack([r.after[t].numpy() for r in recs])
        if (t + 1) % 2:
            np.testing.assert_array_equal(after, before)
            continue
        sent = []
        for i in range(K):
            m = anchor - before[i] + residual[i]
            sent.append(scaled_sign(m))
            residual[i] = m - sent[-1]
        delta = np.mean(sent, axis=0)
        u = 0.9 * u + delta
        anchor = anchor - 0.7 * (delta + 0.9 * u)
        for row in after:
            np.testing.assert_allclose(row, anchor, rtol=1e-9, atol=1e-12)
    for rec in recs:
        assert all(np.array_equal(a.numpy(), b.numpy())
                   for a, b in zip(rec.after[3:], rec.resumed_after, strict=True))


def test_overlapped_ef_sign_resumes_bitwise_with_its_average_in_flight(
        ranks: list[dict[str, Record]]) -> None:
    for r in ranks:
        rec = r["ef_sign_overlap"]
        assert len(rec.resumed_after) == 3
        assert all(np.array_equal(a.numpy(), b.numpy())
                   for a, b in zip(rec.after[5:], rec.resumed_after, strict=True))
        # Landed at step 6 (index 5) as a correction: the models moved, yet stay apart.
        assert not np.array_equal(rec.after[5].numpy(), rec.before[5].numpy())
    finals = [r["ef_sign_overlap"].final.numpy() for r in ranks]
    for f in finals:
        np.testing.assert_array_equal(f, finals[0])
    # Bytes: two syncs of packed signs for the parameters, exact for the buffer, then the
    # run's final sync, compressed alike: no fp32 copy of the parameters travels.
    assert ranks[0]["ef_sign_overlap"].comm["comm/average/bytes"] == 3 * (3 * 4 + 3 * 4 + 3 * 8)


def test_sparseloco_follows_the_rule_resumes_bitwise_and_sends_the_formula(
        ranks: list[dict[str, Record]]) -> None:
    from test_sparseloco import np_sent  # the numpy codec of the thread-tier replay

    replay(ranks, "sparseloco", np_sent, True, decay=0.9)
    recs = [r["sparseloco"] for r in ranks]
    for rec in recs:
        assert all(np.array_equal(a.numpy(), b.numpy())
                   for a, b in zip(rec.after[3:], rec.resumed_after, strict=True))
    # Per sync: chunks of 16 of the tensors (40, 21, 5) keep 4+4+2, 4+2, 2 = 18 values:
    # 3 codebooks of 4 float32, 18 2-bit codes in 2 words, 18 4-bit places in 3 words; the
    # float64 buffer (3 values) travels exactly. 3 syncs (the last one a boundary, so the
    # final model only averages the buffer exactly).
    per_sync = 3 * 4 * 4 + 2 * 4 + 3 * 4 + 3 * 8
    assert ranks[0]["sparseloco"].comm["comm/average/bytes"] == 3 * per_sync + 3 * 8


def test_bytes_are_the_packed_payloads(ranks: list[dict[str, Record]]) -> None:
    sign = ranks[0]["sign"].comm
    # Per sync: 66 signs in 3 int32 words + 3 float32 scales; the float64 BatchNorm-like
    # buffer (3 values) travels exactly.
    assert sign["comm/average/bytes"] == 3 * (3 * 4 + 3 * 4 + 3 * 8)
    topk = ranks[0]["topk_ef"].comm
    assert topk["comm/average/bytes"] == 3 * (7 * 8 + 7 * 4 + 3 * 8)
    # The syncs' true consensus distance is unknown without an exact average: not logged.
    assert all(math.isnan(d) for _, _, d in ranks[0]["sign"].events)


def test_ef_sign_resumes_bitwise_and_ends_on_the_exact_average(
        ranks: list[dict[str, Record]]) -> None:
    for r in ranks:
        rec = r["ef_sign"]
        assert all(np.array_equal(a.numpy(), b.numpy())
                   for a, b in zip(rec.after[3:], rec.resumed_after, strict=True))
    finals = [r["ef_sign"].final.numpy() for r in ranks]
    for f in finals:
        np.testing.assert_array_equal(f, finals[0])


def test_hierarchical_averages_nodes_exactly_and_compresses_across_them(
        ranks: list[dict[str, Record]]) -> None:
    recs = [r["hier"] for r in ranks]
    anchor = _initial(recs)
    residual = [np.zeros(66) for _ in recs]
    for t in range(4):
        before = np.stack([r.before[t].numpy() for r in recs])
        after = np.stack([r.after[t].numpy() for r in recs])
        if (t + 1) % 2:  # intra-node: the exact mean of each node's two workers
            for node in (0, 2):
                mean = before[node:node + 2].mean(axis=0)
                for i in (node, node + 1):
                    np.testing.assert_allclose(after[i], mean, rtol=0, atol=1e-12)
            continue
        anchor = check_sync(anchor, before, after, residual, scaled_sign, True)


@pytest.mark.parametrize(("overrides", "text"), [
    (["sync.algorithm=local", "sync.compression.method=sing"],
     "sync.compression.method: unknown value 'sing'; did you mean 'sign'"),
    (["sync.algorithm=local", "sync.compression.method=topk", "sync.compression.ratio=0"],
     "sync.compression.ratio: must be in (0, 1]"),
    (["sync.algorithm=local", "sync.compression.method=qsgd", "sync.compression.levels=0"],
     "sync.compression.levels: must be >= 1"),
    (["sync.algorithm=local", "sync.compression.method=sign", "sync.topology=ring"],
     "sync.reducer=compressed with sync.topology=ring: compressed needs all_workers"),
    (["sync.algorithm=local", "sync.compression.method=sign", "sync.consensus_every=-2"],
     "sync.consensus_every: must be >= 0"),
    (["sync.algorithm=post_local", "sync.switch_epoch=1", "sync.compression.method=ef_sign",
      "engine.name=deepspeed", "engine.deepspeed_config=deepspeed_configs/zero0_fp32.json"],
     "sync.compression.method: ef_sign compresses mini-batch gradients through DDP"),
])
def test_bad_compression_settings_are_one_line_each(overrides: list[str], text: str) -> None:
    assert_refused(overrides, text)


def test_compression_with_zero_stage_1_is_refused(tmp_path: Path) -> None:
    import json

    ds = tmp_path / "zero1.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert_refused(["sync.compression.method=ef_sign", "engine.name=deepspeed",
                    f"engine.deepspeed_config={ds}"],
                   f"engine.deepspeed_config: '{ds}' sets zero_optimization.stage=1, but "
                   "sync.compression.method=ef_sign")


def test_another_codec_mid_period_continues_from_the_checkpoint_anchor(
        ranks: list[dict[str, Record]]) -> None:
    """ef_sign's checkpoint after step 3 keeps the anchor of the sync at 2; bf16 (no error
    feedback) then syncs at 4: theta = anchor - mean_i bf16(anchor - theta_i)."""
    recs = [r["ef_sign_to_bf16"] for r in ranks]
    anchor = recs[0].after[1].numpy()
    before = [r.resumed_before[0] for r in recs]  # step 4's models before its sync
    sent = [torch.from_numpy(anchor).sub(b).to(torch.bfloat16).double().numpy()
            for b in before]
    for r in recs:
        np.testing.assert_allclose(r.resumed_after[0].numpy(), anchor - np.mean(sent, 0),
                                   rtol=0, atol=1e-12)


def test_compression_turned_on_at_a_boundary_anchors_on_the_model(
        ranks: list[dict[str, Record]]) -> None:
    """A mean checkpoint at the sync of step 4 resumed with ef_sign: the anchor is that
    model and no residual is owed, so the sync at 6 sends scaled signs of the deltas."""
    recs = [r["none_to_ef_sign"] for r in ranks]
    anchor = recs[0].after[3].numpy()
    assert all(np.array_equal(r.after[3].numpy(), anchor) for r in recs)
    sent = [scaled_sign(anchor - r.resumed_before[1].numpy()) for r in recs]
    for r in recs:
        np.testing.assert_allclose(r.resumed_after[1].numpy(), anchor - np.mean(sent, 0),
                                   rtol=0, atol=1e-6)
