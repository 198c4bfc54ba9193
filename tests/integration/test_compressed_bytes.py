"""A compressed job's whole traffic, fixed costs included, as the engine accounts it.

Two real torchrun jobs of 50 steps of local SGD with H=4 (the tiny synthetic recipe, 2
workers): exact fp32 averages, and EF-sign. With the compressed path for evaluation (the
last sync's model, which every worker holds) and for the final model (one more compressed
sync), no fp32 copy of the parameters travels in the EF-sign job after start-up.
"""

from __future__ import annotations

from pathlib import Path

from conftest import synthetic_args, torchrun
from helpers import summary

JOB = ["sync.algorithm=local", "sync.period=4", "train.max_steps=50", "train.epochs=4"]
"""50 steps (16 per epoch): 12 syncs, then the final model at step 50, mid-period."""


def test_ef_sign_job_sends_under_a_fifth_of_the_fp32_job(tmp_path: Path) -> None:
    totals = {}
    for name, extra in (("fp32", []), ("ef_sign", ["sync.compression.method=ef_sign"])):
        run = tmp_path / name
        torchrun(synthetic_args(run, *JOB, *extra))
        s = summary(run)
        totals[name] = s
    fp32, ef = totals["fp32"], totals["ef_sign"]
    ratio = ef["comm/bytes"] / fp32["comm/bytes"]
    print(f"whole-job bytes: fp32 {fp32['comm/bytes']:.0f}, ef_sign {ef['comm/bytes']:.0f}, "
          f"ratio {ratio:.3f}")
    assert ratio <= 0.2
    # 12 syncs and the final model: all compressed (about 1/32), where the fp32 job sends
    # 13 fp32 averages. The rest of the EF-sign job is start-up (the initial broadcast).
    assert fp32["comm/average/calls"] == ef["comm/average/calls"]
    assert ef["comm/average/bytes"] <= fp32["comm/average/bytes"] / 25
    assert ef["comm/other/bytes"] == fp32["comm/other/bytes"]
