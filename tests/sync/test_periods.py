"""Period rules: QSR's sequence of periods against its formula over whole LR schedules.

The learning rates are computed here in closed form (warmup line, step decay, half cosine),
independently of ``LRCurve`` and torch's schedulers.
"""

from __future__ import annotations

import copy
import math

import pytest
from helpers import assert_refused
from threads import run_workers

from localsgd.config import ConfigError
from localsgd.config.schema import LRDecay, LRScheduleConfig
from localsgd.recipe import load_config
from localsgd.sync.config import SyncConfig
from localsgd.sync.controller import SyncController
from localsgd.sync.periods.fixed import Fixed
from localsgd.sync.periods.qsr import QSR, UNBOUNDED
from localsgd.sync.schedules.base import GLOBAL
from localsgd.train.optim import LRCurve

SPE, EPOCHS, BASE_LR, PEAK = 50, 8, 0.1, 0.4
WARM = 1


def closed_form(decay: LRDecay) -> list[float]:
    total, warm = SPE * EPOCHS, WARM * SPE
    out = []
    for s in range(total + 1):
        if s < warm:
            start = BASE_LR / PEAK
            out.append(PEAK * (start + (1 - start) * s / warm))
        elif decay == LRDecay.multistep:
            out.append(PEAK * 0.1 ** sum(s >= m * SPE for m in (4, 6)))
        else:
            t = min(s - warm, total - warm)
            out.append(PEAK * (1 + math.cos(math.pi * t / (total - warm))) / 2)
    return out


def expected_ends(lrs: list[float], alpha: float, base: int, start: int) -> list[int]:
    ends, s = [start], start
    while s < len(lrs) - 1:
        lr = lrs[s]
        s += UNBOUNDED if lr <= 0 else max(base, math.floor((alpha / lr) ** 2))
        ends.append(s)
    return ends


@pytest.mark.parametrize("decay", [LRDecay.multistep, LRDecay.cosine])
@pytest.mark.parametrize("algorithm", ["local", "post_local"])
def test_qsr_periods_follow_the_formula_over_a_whole_schedule(decay: LRDecay,
                                                              algorithm: str) -> None:
    schedule_cfg = LRScheduleConfig(warmup_epochs=WARM, decay=decay,
                                    milestones=[4, 6] if decay == LRDecay.multistep else [])
    curve = LRCurve(schedule_cfg, BASE_LR, PEAK, SPE, EPOCHS)
    lrs = closed_form(decay)
    assert max(abs(curve(s) - lr) for s, lr in enumerate(lrs)) < 1e-12
    alpha, base = 0.417, 2
    start = 0 if algorithm == "local" else 75
    ends = expected_ends(lrs, alpha, base, start)
    # No period sits on a floor boundary, where round-off could flip it either way.
    for e in ends[:-1]:
        if lrs[e] > 0:
            x = (alpha / lrs[e]) ** 2
            assert abs(x - round(x)) > 1e-9
    cfg = SyncConfig(algorithm=algorithm, period=base, period_rule="qsr", qsr_alpha=alpha,
                     switch_step=start if algorithm == "post_local" else None)
    rule = QSR(cfg, curve)
    schedule = SyncController.schedule_for(cfg, SPE).with_rule(rule)
    total = SPE * EPOCHS
    syncs = [k for k in range(1, total + 1) if schedule.action_after(k) == GLOBAL]
    assert syncs == [e for e in ends[1:] if e <= total]
    # Few local steps at the peak, many after decay: the rule actually varies the period.
    periods = {schedule.effective_period(s) for s in range(start, total)}
    assert min(periods) == base and max(periods) > 4 * base
    for s in range(start, total):
        i = max(j for j, e in enumerate(ends) if e <= s)
        assert schedule.effective_period(s) == ends[i + 1] - ends[i]


def test_fixed_rule_keeps_every_schedule_unchanged() -> None:
    for kw in ({"algorithm": "local", "period": 3},
               {"algorithm": "post_local", "period": 4, "switch_step": 5},
               {"algorithm": "hierarchical", "period": 2, "block_period": 3}):
        cfg = SyncConfig(**kw)  # type: ignore[arg-type]
        plain = SyncController.schedule_for(cfg, 10)
        ruled = copy.copy(plain).with_rule(Fixed(cfg))
        assert [plain.action_after(k) for k in range(60)] == [
            ruled.action_after(k) for k in range(60)]
        assert [plain.effective_period(k) for k in range(60)] == [
            ruled.effective_period(k) for k in range(60)]


def qsr_sync(**kw: object) -> SyncConfig:
    return SyncConfig(topology="threads", reducer="threads", algorithm="local", period=1,
                      period_rule="qsr", **kw)  # type: ignore[arg-type]


def decaying(step: int) -> float:
    return 0.4 if step < 6 else 0.1


def test_qsr_runs_on_workers_and_checkpoints_its_periods() -> None:
    workers, _ = run_workers(qsr_sync(qsr_alpha=0.5), steps=20, lr_at=decaying)
    # lr 0.4: max(1, floor(1.5625)) = 1; from step 6, lr 0.1: floor(25) = 25 > the run.
    assert [e.step for e in workers[0].controller.events] == [1, 2, 3, 4, 5, 6]
    state = workers[0].controller.state_dict()["parts"]["period_rule"]
    assert state["ends"][:7] == [0, 1, 2, 3, 4, 5, 6]
    other = QSR(qsr_sync(qsr_alpha=0.7), decaying)
    other.bind(0, 1)
    with pytest.raises(ConfigError, match="sync.qsr_alpha: the checkpoint's sync periods end"):
        other.load_state_dict(state)
    same = QSR(qsr_sync(qsr_alpha=0.5), decaying)
    same.bind(0, 1)
    same.load_state_dict(state)
    assert same.is_sync(6) and not same.is_sync(7)
    assert QSR.merge_states([state, state]) == {}


@pytest.mark.parametrize(("overrides", "text"), [
    (["sync.algorithm=local", "sync.period_rule=qsr"], "sync.qsr_alpha: sync.period_rule=qsr "
                                                       "needs a positive alpha"),
    (["sync.algorithm=minibatch", "sync.period_rule=qsr", "sync.qsr_alpha=0.1"],
     "sync.period_rule=qsr with sync.algorithm=minibatch: qsr needs ruled_period"),
    (["sync.algorithm=local", "sync.period=4", "sync.period_rule=qsr", "sync.qsr_alpha=0.1",
      "sync.overlap_steps=1", "sync.fragments=2"],
     "sync.runner=overlapped with sync.period_rule=qsr: "
     "overlapped needs fixed_period"),
    (["sync.algorithm=local", "sync.period_rule=qrs"], "sync.period_rule: unknown value 'qrs'"),
])
def test_bad_period_rule_settings(overrides: list[str], text: str) -> None:
    assert_refused(overrides, text)


def test_qsr_alpha_without_qsr_warns() -> None:
    with pytest.warns(UserWarning, match="sync.qsr_alpha: has no effect with "
                                         "sync.period_rule=fixed"):
        load_config(None, ["sync.algorithm=local", "sync.qsr_alpha=0.2"])
