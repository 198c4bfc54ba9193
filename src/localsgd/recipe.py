"""The whole recipe: general sections plus the ``sync`` and ``engine`` sections composed from
their registered parts; loading, checking and the launch-time checks.

Every recipe YAML is merged onto ``RecipeConfig()``; each component later receives only its
own section (``cfg.model``, ``cfg.sync``, ...). Problems are collected from the schema merge,
every field's domain (``localsgd.config.domains``, declared next to the field), the rules
between keys and each chosen part's own check, and raised together as one ``ConfigError``.
Keys that no chosen part reads are reported once as ``ConfigWarning``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from localsgd.config.domain_check import domain_problems, with_defaults
from localsgd.config.domains import NAME, Range, domain
from localsgd.config.errors import ConfigError, ConfigWarning
from localsgd.config.load import merge_recipe, to_yaml
from localsgd.config.schema import (
    DataConfig,
    DistConfig,
    LRScheduleConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    WandbConfig,
)
from localsgd.config.validate import general_rules
from localsgd.engines import EngineConfig, check_engine
from localsgd.registry import Facts
from localsgd.sync.config import SyncConfig, check_sync
from localsgd.sync.parts import SCHEDULES
from localsgd.tasks import task_rules


@dataclass
class RecipeConfig:
    name: str = domain(NAME, "run")
    """Recipe name: default run directory and W&B group."""
    seed: int = domain(Range(0, 2**63 - 1), 0)
    """Seed for model init, data partition and augmentation (torch takes 64-bit seeds)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)  # type: ignore[valid-type]
    engine: EngineConfig = field(default_factory=EngineConfig)  # type: ignore[valid-type]
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def facts(cfg: RecipeConfig, world_size: int | None = None,
          local_world_size: int | None = None) -> Facts:
    """What the sync and engine parts may know of the rest of the recipe and the launch."""
    schedule = SCHEDULES.find(cfg.sync.algorithm)
    return Facts(epochs=cfg.train.epochs, micro_batch=cfg.data.batch_size,
                 grad_accum=cfg.train.grad_accum,
                 local_steps=schedule is not None and schedule.has_local_steps(cfg.sync),
                 algorithm=cfg.sync.algorithm, optimizer=str(cfg.optim.name.value),
                 precision=str(cfg.model.precision.value), topology=str(cfg.sync.topology),
                 compression=str(getattr(getattr(cfg.sync, "compression", None), "method",
                                         "none")),
                 channels_last=bool(cfg.model.channels_last),
                 compile_backend=str(cfg.train.compile_backend) if cfg.train.compile else None,
                 grad_clip=float(cfg.optim.grad_clip),
                 replica_group=str(getattr(cfg.sync, "replica_group", "1")),
                 engine=str(cfg.engine.name),
                 world_size=world_size, local_world_size=local_world_size)


def check_parts(cfg: RecipeConfig, known: Facts) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the ``sync`` and ``engine`` sections, by their chosen parts."""
    sync_problems, sync_warnings = check_sync(cfg.sync, known)
    engine_problems, engine_warnings = check_engine(cfg.engine, known)
    return sync_problems + engine_problems, sync_warnings + engine_warnings


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RecipeConfig:
    """The checked, resolved recipe, or one ConfigError listing every problem.

    Keys with no effect under the chosen parts are reported as ``ConfigWarning``s.
    """
    cfg, errors = merge_recipe(RecipeConfig, path, overrides)
    assert isinstance(cfg, RecipeConfig)
    outside = domain_problems(cfg)
    # A key outside its domain gets that one message. The rules between keys see its
    # default instead, as for a leaf that failed to merge, so none of them trips on it.
    flagged = {key for key, _ in outside}
    ruled = with_defaults(cfg, flagged) if flagged else cfg
    problems, notes = check_parts(ruled, facts(ruled))
    # Nor does a key whose value failed to merge (it holds its default now).
    named = flagged | {e.split(":")[0] for e in errors}
    errors += [message for _, message in outside]
    errors += [p for p in general_rules(ruled) + task_rules(ruled) + problems
               if p.split(":")[0].split("[")[0] not in named]
    if errors:
        raise ConfigError(errors)
    for note in notes:
        warnings.warn(note, ConfigWarning, stacklevel=2)
    return cfg


def validate_launch(cfg: RecipeConfig, world_size: int, local_world_size: int) -> None:
    """The parts' checks again, now that the launcher's world and node sizes are known."""
    problems, _ = check_parts(cfg, facts(cfg, world_size, local_world_size))
    if problems:
        raise ConfigError(problems)


__all__ = ["RecipeConfig", "load_config", "to_yaml", "validate_launch"]
