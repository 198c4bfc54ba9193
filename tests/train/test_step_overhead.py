"""What one local step of the trainer costs on the host beyond a hand-written loop: aten ops
launched and Python calls made per step, tiny model, one worker and 2 workers between syncs.

On a GPU a small model's step is bound by the host: every extra op is a kernel launch and
every extra call is host time (docs/benchmarks.md, "Step time against a hand-written
loop"). The budgets are the hand loop's counts, measured in the same run, plus a margin.
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import free_port
from step_counts import Counter, count, count_two_workers

ATEN_MARGIN = 6
"""aten ops per step allowed beyond the hand loop's (e.g. detaching the loss, the step's
scoped profiler label)."""
CALL_MARGIN = 60
"""Python calls per step allowed beyond the hand loop's: the trainer's step, the engine's
forward/backward and optimizer step, the controller's questions, the phase timer."""

MEASURED = ("2026-12-03 (torch 2.14.1), before the step overhead work: 1 worker: the trainer "
            "launched 235 aten ops and made 267 Python calls per step, the hand loop 163 and "
            "148; 2 workers H=16 between syncs: trainer 223 and 272, hand loop 163 and 148.")
"""What the budgets were set against."""


def over_budget(counts: dict[str, dict[str, float]]) -> list[str]:
    ours, hand = counts["localsgd"], counts["hand"]
    problems = []
    if ours["aten_ops"] > hand["aten_ops"] + ATEN_MARGIN:
        problems.append(f"aten ops per step: {ours['aten_ops']} > hand {hand['aten_ops']} + "
                        f"{ATEN_MARGIN}")
    if ours["python_calls"] > hand["python_calls"] + CALL_MARGIN:
        problems.append(f"Python calls per step: {ours['python_calls']} > hand "
                        f"{hand['python_calls']} + {CALL_MARGIN}")
    return problems


def test_counter_counts_ops_and_calls_of_a_known_loop() -> None:
    """Each window step runs exactly 3 aten::add_ and two Python function calls (bump and
    the counter's own after_step, which the loops under test make too)."""
    counter, x, one = Counter(), torch.zeros(3), torch.ones(3)

    def bump() -> None:
        for _ in range(3):
            x.add_(one)  # a tensor: a Python number would add its conversion's 4 ops

    for step in range(1, 11):
        bump()
        counter.after_step(step)
    per = counter.per_step()
    assert per["aten_ops"] == 3
    assert per["python_calls"] == 2


def test_one_worker_step_is_close_to_the_hand_loop() -> None:
    counts = {"hand": count("hand", 1), "localsgd": count("localsgd", 1)}
    assert counts["hand"]["aten_ops"] > 0 and counts["hand"]["python_calls"] > 0
    assert not over_budget(counts), (over_budget(counts), counts)


def test_two_worker_local_step_is_close_to_the_hand_loop(tmp_path: Path) -> None:
    counts = count_two_workers(tmp_path, [free_port(), free_port()])
    assert counts["hand"]["aten_ops"] > 0 and counts["hand"]["python_calls"] > 0
    assert not over_budget(counts), (over_budget(counts), counts)
