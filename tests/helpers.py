"""Small helpers shared by tests and the worker scripts they launch (importable from both)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

TINY_STEPS_PER_EPOCH = 512 // 2 // 16
"""recipes/tests/tiny_synthetic.yaml on 2 workers: 512 samples, batch 16."""


class NoTimer:
    """Stands in for the trainer's PhaseTimer where phases are not measured."""

    def phase(self, name: str) -> nullcontext[None]:
        return nullcontext()


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's saved consensus model (``model.pt``)."""
    return torch.load(run_dir / "model.pt", weights_only=True)


def summary(run_dir: Path) -> dict[str, Any]:
    """The run's ``summary.json``."""
    return json.loads((run_dir / "summary.json").read_text())
