"""Small helpers shared by tests and the worker scripts they launch (importable from both)."""

from __future__ import annotations

import json
import subprocess
import sys
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


def wandb_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of the run's one offline W&B file, as W&B's own reader prints it."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                          str(files[0])], capture_output=True, text=True, timeout=60,
                         check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
