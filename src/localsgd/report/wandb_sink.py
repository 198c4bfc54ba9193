"""Weights & Biases sink: mirrors every local record into a W&B run owned by rank 0.

W&B is an optional mirror; metrics.jsonl stays the record of truth. Hence three rules:

* Any W&B failure (missing package, bad key, no network, service crash) warns once and turns
  the sink into a no-op; training and the local records go on.
* Nothing from the environment reaches W&B: the config is the resolved recipe plus a few
  launch facts computed here, and code/git/metadata/console/requirements capture is off.
* Offline by default: without ``wandb.mode`` or ``WANDB_MODE`` a run never needs the network.

Steps: the trainer's records do not arrive in step order ("sync" records of an epoch follow
its "step" records and share steps with them and with the "epoch" record). W&B drops rows
whose explicit ``step=`` goes backwards, so the sink never passes ``step=``: each record is
one history row (W&B's ``_step`` is just a row counter) and the optimizer step travels as the
metric ``step``, declared the default x axis. Custom x axes have no ordering requirement.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

if TYPE_CHECKING:  # keeps `localsgd report` from importing torch
    from localsgd.launch.env import DistInfo
    from localsgd.recipe import RecipeConfig


class WandbSinkWarning(RuntimeWarning):
    """W&B could not be used; the run continues with local records only."""


# Keys that serve as x axes in dashboards. "step" is the default one; eval/acc can be plotted
# against each of the others because the epoch record carries them all.
AXES = ("step", "epoch", "samples", "tokens", "time/wall_s", "comm/bytes")

# Default x axis per key prefix. W&B matches globs in arbitrary order (a Go map), so the
# prefixes must not overlap; exact names (AXES, "lr") take precedence over globs.
# Evaluation happens once per epoch, and epochs are what runs with different worker counts
# or sync periods have in common, so eval/* defaults to epoch; everything else to step.
GLOB_AXES = {
    "train/*": "step",
    "sync/*": "step",
    "comm/*": "step",
    "time/*": "step",
    "throughput/*": "step",
    "eval/*": "epoch",
}

# An epoch record's "sync/consensus_distance" is the mean over that epoch's syncs, while a
# "sync" record's is one sync's value. In one W&B series they would zig-zag, so the epoch
# mean gets its own name in W&B (metrics.jsonl keeps the trainer's keys).
EPOCH_MEAN_DISTANCE = "sync/consensus_distance_epoch_mean"

# Language models evaluate every few steps and compare runs at equal tokens seen: their
# eval/* series default to the tokens axis instead.
TOKEN_GLOB_AXES = {**GLOB_AXES, "eval/*": "tokens"}

MODE_ALIASES = {"dryrun": "offline", "run": "online"}


def resolve_mode(cfg: RecipeConfig, environ: dict[str, str] | None = None) -> str:
    """wandb.mode if set, else WANDB_MODE if set, else offline."""
    if cfg.wandb.mode is not None:
        return cfg.wandb.mode.value
    env = os.environ if environ is None else environ
    raw = env.get("WANDB_MODE", "").strip().lower()
    if not raw:
        return "offline"
    return MODE_ALIASES.get(raw, raw)


def to_row(record: dict[str, Any]) -> dict[str, Any]:
    """The W&B history row for one trainer record."""
    row = {k: v for k, v in record.items() if k != "event"}
    if record.get("event") == "epoch" and "sync/consensus_distance" in row:
        row[EPOCH_MEAN_DISTANCE] = row.pop("sync/consensus_distance")
    return row


def run_config(cfg: RecipeConfig, info: DistInfo | None) -> dict[str, Any]:
    """The resolved recipe (enums as strings) plus launch facts worth filtering runs by."""
    config = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)
    assert isinstance(config, dict)
    if info is not None:
        config["launch"] = {
            "world_size": info.world_size,
            "local_world_size": info.local_world_size,
            "num_nodes": info.num_nodes,
            "backend": info.backend,
            "device": info.device.type,
        }
    return config


def _settings(wandb: Any, mode: str) -> Any:
    return wandb.Settings(
        mode=mode,
        # Nothing about the machine, the code or the process leaves it: metadata holds argv,
        # host, user and executable; requirements can hold index URLs with tokens; console
        # capture would copy whatever anything prints. The recipe and launch facts are
        # logged explicitly instead.
        disable_code=True,
        save_code=False,
        disable_git=True,
        disable_job_creation=True,
        x_disable_machine_info=True,
        x_disable_meta=True,
        x_save_requirements=False,
        console="off",
        # The console sink already prints per-epoch lines; skip W&B's end-of-run tables.
        quiet=True,
        # With no key and a terminal attached W&B would prompt; rank 0 waiting on a prompt
        # would stall every other rank in its next collective.
        login_timeout=30.0,
    )


class WandbReporter:
    """Reporter mirroring records, config and summary into one W&B run."""

    def __init__(self, cfg: RecipeConfig, run_dir: Path, info: DistInfo | None = None,
                 mode: str | None = None) -> None:
        self._run: Any = None
        self._warned = False
        self.mode = mode or resolve_mode(cfg)
        try:
            self._start(cfg, Path(run_dir), info)
        except (Exception, SystemExit) as exc:  # W&B must never end the training job
            self._fail("could not start", exc)

    @property
    def active(self) -> bool:
        return self._run is not None

    def _start(self, cfg: RecipeConfig, run_dir: Path, info: DistInfo | None) -> None:
        import wandb

        w = cfg.wandb
        run = wandb.init(
            project=w.project,
            entity=w.entity,
            group=w.group or cfg.name,
            job_type=cfg.sync.algorithm,
            name=w.name or run_dir.resolve().name,
            tags=list(w.tags),
            notes=w.notes,
            config=run_config(cfg, info),
            dir=str(run_dir),
            settings=_settings(wandb, self.mode),
        )
        if run is None or getattr(run, "disabled", False):
            # W&B turned itself off (e.g. a login prompt timed out); say so once.
            raise RuntimeError("W&B disabled itself during wandb.init (no login?)")
        self._run = run  # from here on a failure must finish the run (see _fail)
        run.define_metric("step")
        for axis in AXES[1:]:
            run.define_metric(axis, step_metric="step")
        run.define_metric("lr", step_metric="step")
        from localsgd.tasks import build_task

        globs = TOKEN_GLOB_AXES if build_task(cfg).unit == "tokens" else GLOB_AXES
        for glob, axis in globs.items():
            run.define_metric(glob, step_metric=axis)

    def _fail(self, what: str, exc: BaseException, finish: bool = True) -> None:
        run, self._run = self._run, None
        if not self._warned:
            self._warned = True
            warnings.warn(f"W&B {what} ({type(exc).__name__}: {exc}); W&B logging is off for "
                          "this run, local records (metrics.jsonl) continue",
                          WandbSinkWarning, stacklevel=3)
        if run is not None and finish:
            # Close what W&B has so far; its own atexit hook would otherwise try again later.
            try:
                run.finish(exit_code=1)
            except Exception:
                pass  # already disabled and warned

    def log(self, record: dict[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._run.log(to_row(record))
        except Exception as exc:
            self._fail("logging failed", exc)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is None:
            return
        try:
            # None means "never happened" (e.g. target accuracy not reached): leave it out
            # rather than show a null that reads like a logging bug.
            self._run.summary.update({k: v for k, v in values.items() if v is not None})
        except Exception as exc:
            self._fail("summary failed", exc)

    def close(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as exc:
            self._fail("finish failed", exc, finish=False)
