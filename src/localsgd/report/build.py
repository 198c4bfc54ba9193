"""Assemble rank 0's sinks from the recipe."""

from __future__ import annotations

from pathlib import Path

from localsgd.config.schema import RecipeConfig
from localsgd.dist.env import DistInfo
from localsgd.report.base import Reporter, Reporters
from localsgd.report.console import ConsoleReporter
from localsgd.report.files import JsonlReporter


def build_reporters(cfg: RecipeConfig, run_dir: Path, info: DistInfo) -> Reporters:
    sinks: list[Reporter] = [JsonlReporter(run_dir), ConsoleReporter()]
    return Reporters(sinks)
