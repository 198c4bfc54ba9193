"""Small helpers shared by tests and the worker scripts they launch (importable from both)."""

from __future__ import annotations

from contextlib import nullcontext

TINY_STEPS_PER_EPOCH = 512 // 2 // 16
"""recipes/tests/tiny_synthetic.yaml on 2 workers: 512 samples, batch 16."""


class NoTimer:
    """Stands in for the trainer's PhaseTimer where phases are not measured."""

    def phase(self, name: str) -> nullcontext[None]:
        return nullcontext()
