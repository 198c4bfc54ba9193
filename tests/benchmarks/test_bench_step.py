"""bench_step.py's quick mode for real (gloo processes), and its host clock."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_group, worker_env

sys.path.insert(0, str(REPO / "benchmarks"))
import step_harness  # noqa: E402

SETUPS = {"1 worker", "2 workers H=4", "2 workers H=1"}


@pytest.mark.slow  # three benchmark launches of gloo workers: about a minute
def test_quick_mode_measures_every_setup_and_averages_exactly(tmp_path: Path) -> None:
    out, check = tmp_path / "step.json", tmp_path / "check"
    check.mkdir()
    proc = run_group([sys.executable, "benchmarks/bench_step.py", "--quick", "--out", str(out),
                      "--check-dir", str(check)], env=worker_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cases = json.loads(out.read_text())["cases"]
    assert {c["setup"] for c in cases} == SETUPS
    for c in cases:
        for key in ("median_hand", "median_localsgd", "ratio", "paired_ratio",
                    "median_hand_cpu_ms", "median_localsgd_cpu_ms", "cpu_ratio",
                    "cpu_paired_ratio"):
            assert math.isfinite(c[key]) and c[key] > 0, (c["setup"], key, c[key])
        ours, hand = c["ms_per_step"]["localsgd"], c["ms_per_step"]["hand"]
        for part in ("engine", "model forward", "backward", "optimizer step",
                     "sync controller", "trainer loop"):
            assert ours[part] >= -1e-9, (c["setup"], part, ours)  # a float-rounding zero
        assert ours["model forward"] > 0 and hand["model forward"] > 0
        parts = sum(v for k, v in ours.items() if k != "total")
        assert math.isclose(parts, ours["total"], rel_tol=1e-9)
    for period in (4, 1):
        states = {(r, w): torch.load(check / f"simplecnn_H{period}_rank{r}_{w}.pt")
                  for r in (0, 1) for w in ("pre", "post")}
        pre0, pre1 = states[0, "pre"], states[1, "pre"]
        assert any(not torch.equal(pre0[k], pre1[k]) for k in pre0)  # ranks trained apart
        for k in pre0:
            # (a + b) / 2 rounds once in float32 as in float64 then float32: exact match.
            mean = ((pre0[k].double() + pre1[k].double()) / 2).to(pre0[k].dtype)
            assert torch.equal(states[0, "post"][k], mean), k
            assert torch.equal(states[1, "post"][k], mean), k


def test_component_clock_counts_time_exclusive_of_wrapped_callees() -> None:
    clock = step_harness.ComponentClock()
    inner = clock.timed(lambda: time.sleep(0.03), "inner")

    def outer_body() -> None:
        time.sleep(0.02)
        inner()

    outer = clock.timed(outer_body, "outer")
    inner()  # before the window: not counted
    clock.start()
    outer()
    clock.stop()
    assert set(clock.totals) == {"outer", "inner"}
    assert 0.02 <= clock.totals["outer"] < 0.03 + 0.02 and clock.totals["inner"] >= 0.03
    assert clock.totals["outer"] + clock.totals["inner"] <= clock.window


def test_component_clock_cuts_calls_open_at_the_window_edges() -> None:
    """A call that spans start() counts only from there; one still open at stop() counts up
    to it, so the parts add up to the window."""
    clock = step_harness.ComponentClock()

    def body() -> None:
        time.sleep(0.01)
        clock.start()
        time.sleep(0.02)
        clock.stop()
        time.sleep(0.01)

    clock.timed(body, "spanning")()
    assert math.isclose(clock.totals["spanning"], clock.window, rel_tol=1e-9)
    assert clock.window >= 0.02


def test_window_takes_cpu_time_of_busy_steps_and_not_of_waiting() -> None:
    """Between its edges the window's CPU time grows with work the process does, not with
    time it spends asleep (as waiting for a core or a peer would be)."""
    case = step_harness.Case("simplecnn", 8, 8, 1, 1, warmup=1, steps=1)
    window = step_harness.Window(case, torch.device("cpu"))
    window.after_step(1)
    busy_until = time.process_time() + 0.05
    while time.process_time() < busy_until:
        pass
    time.sleep(0.2)
    window.after_step(2)
    assert 0.05 <= window.cpu_seconds < 0.05 + 0.1
    assert window.seconds >= 0.25
