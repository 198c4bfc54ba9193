"""Assemble rank 0's sinks from the recipe."""

from __future__ import annotations

from pathlib import Path

from localsgd.launch.env import DistInfo
from localsgd.recipe import RecipeConfig
from localsgd.report.base import Reporter, Reporters
from localsgd.report.console import ConsoleReporter
from localsgd.report.files import JsonlReporter
from localsgd.report.wandb_sink import WandbReporter, resolve_mode


def build_reporters(cfg: RecipeConfig, run_dir: Path, info: DistInfo) -> Reporters:
    sinks: list[Reporter] = [JsonlReporter(run_dir), ConsoleReporter()]
    # Only rank 0 reports; W&B is imported only when it is used, so a run with it disabled
    # works without the package installed.
    mode = resolve_mode(cfg)
    if info.is_main and mode != "disabled":
        sinks.append(WandbReporter(cfg, run_dir, info, mode=mode))
    return Reporters(sinks)
