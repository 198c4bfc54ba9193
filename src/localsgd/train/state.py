"""Trainer progress that checkpoints carry, and the random number generators' state."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainState:
    epoch: int = 0
    """Completed epochs."""
    epoch_step: int = 0
    """Optimizer steps completed inside the current epoch (mid-epoch checkpoints)."""
    best_acc: float = 0.0
    best_loss: float | None = None
    """Lowest eval/loss so far (None before the first evaluation)."""
    time_to_target: float | None = None
    elapsed: float = 0.0
    """Wall seconds spent before this process started (resumed runs)."""
    epoch_seconds: float = 0.0
    epoch_comm_bytes: float = 0.0
    """comm/bytes when the current epoch began (for comm/epoch_bytes)."""
    stats: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    """This epoch's [train loss sum, correct, samples] on this rank."""

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "best_acc": self.best_acc,
                "best_loss": self.best_loss,
                "time_to_target": self.time_to_target, "elapsed": self.elapsed,
                "epoch_seconds": self.epoch_seconds, "epoch_comm_bytes": self.epoch_comm_bytes,
                "stats": self.stats.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.epoch_step = int(state["epoch"]), int(state["epoch_step"])
        self.best_acc, self.time_to_target = float(state["best_acc"]), state["time_to_target"]
        self.best_loss = state.get("best_loss")
        self.elapsed, self.epoch_seconds = float(state["elapsed"]), float(state["epoch_seconds"])
        self.epoch_comm_bytes = float(state["epoch_comm_bytes"])
        self.stats.copy_(state["stats"])


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
