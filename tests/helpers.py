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


def assert_refused(overrides: list[str], starts: str) -> None:
    """The recipe of ``overrides`` is refused, with one problem starting with ``starts``."""
    import pytest

    from localsgd.config import ConfigError
    from localsgd.recipe import load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert [p for p in err.value.problems if p.startswith(starts)], err.value.problems
