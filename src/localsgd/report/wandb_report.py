"""A W&B report comparing the runs of one experiment group.

``build_report`` only assembles the report object (no network), so its panels, axes and run
filter are testable offline; ``save_report`` publishes it and is the only part that talks to
the W&B server.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from localsgd.report.wandb_sink import MODE_ALIASES


@dataclass(frozen=True)
class PanelSpec:
    title: str
    x: str
    """History key on the x axis (the same keys the training sink logs)."""
    y: tuple[str, ...]


# The paper's comparisons: accuracy per epoch, per second and per byte, plus how far local
# models drift apart between averages.
PANELS: tuple[PanelSpec, ...] = (
    PanelSpec("Test accuracy vs epoch", "epoch", ("eval/acc",)),
    PanelSpec("Test accuracy vs training time (s)", "time/wall_s", ("eval/acc",)),
    PanelSpec("Test accuracy vs bytes communicated per worker", "comm/bytes", ("eval/acc",)),
    PanelSpec("Training loss (epoch mean) vs epoch", "epoch", ("train/loss",)),
    PanelSpec("Consensus distance at each average vs step", "step",
              ("sync/consensus_distance",)),
    PanelSpec("Local steps per period vs step", "step", ("sync/period",)),
)

# Language models: validation loss and bits per byte at equal tokens, time and bytes.
LM_PANELS: tuple[PanelSpec, ...] = (
    PanelSpec("Validation loss vs tokens", "tokens", ("eval/loss",)),
    PanelSpec("Validation bits per byte vs tokens", "tokens", ("eval/bpb",)),
    PanelSpec("Validation loss vs training time (s)", "time/wall_s", ("eval/loss",)),
    PanelSpec("Validation loss vs bytes communicated per worker", "comm/bytes",
              ("eval/loss",)),
    PanelSpec("Training loss (rank 0) vs step", "step", ("train/loss_rank0",)),
    PanelSpec("Consensus distance at each average vs step", "step",
              ("sync/consensus_distance",)),
)

LM_FRONTIER: tuple[tuple[str, str, str], ...] = (
    ("Final validation loss vs bytes per worker (one point per run)", "comm/bytes",
     "eval/loss"),
    ("Final validation loss vs training time (one point per run)", "time/wall_s",
     "eval/loss"),
)

# The study's frontier: one point per run, from the runs' summaries.
FRONTIER: tuple[tuple[str, str, str], ...] = (
    ("Final test accuracy vs bytes per worker (one point per run)", "comm/bytes", "eval/acc"),
    ("Final test accuracy vs training time (one point per run)", "time/wall_s", "eval/acc"),
)

def build_report(project: str, entity: str | None, group: str,
                 title: str | None = None, task: str = "classify") -> Any:
    """The report object: one panel grid over the runs of ``group`` in ``project``.

    ``entity`` None leaves it empty; ``save_report`` fills in the account's default entity,
    which needs the network and so cannot happen here. ``task="lm"`` draws the language
    model panels (validation loss and bits per byte against tokens, time and bytes).
    """
    if "'" in group:
        # wandb-workspaces stores filters as a string with the value in single quotes and
        # no escaping: such a group would give a filter that matches nothing or fails.
        raise ValueError(f"group {group!r}: W&B report filters cannot hold a single quote")
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    runset = wr.Runset(entity=entity or "", project=project, name=group,
                       filters=expr.And(expr.Metric("Group") == group))
    panels = [
        wr.LinePlot(title=p.title, x=p.x, y=list(p.y), layout=wr.Layout(w=12, h=8))
        for p in (LM_PANELS if task == "lm" else PANELS)
    ] + [wr.ScatterPlot(title=title, x=x, y=y, layout=wr.Layout(w=12, h=8))
         for title, x, y in (LM_FRONTIER if task == "lm" else FRONTIER)]
    return wr.Report(
        project=project,
        entity=entity or "",
        title=title or f"localsgd: {group}",
        description=f"Runs of experiment group '{group}' (one W&B run per training launch).",
        blocks=[
            wr.MarkdownBlock(text=(
                "Validation loss (nats per token) and bits per byte against tokens seen, "
                "training time and communicated bytes, the training loss and the consensus "
                "distance; then every run's final validation loss against its bytes and its "
                "training time." if task == "lm" else
                "Test accuracy against epochs, training time and communicated bytes, the "
                "training loss, the consensus distance (mean distance of the worker "
                "models to their average, measured at every model average) and the length "
                "of each local period; then every run's final accuracy against its bytes "
                "and its training time (the frontier of a study).")),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ],
    )


def resolve_report_mode(mode: str | None = None) -> str:
    """Explicit mode, else WANDB_MODE, else online: publishing is this command's purpose."""
    raw = (mode or os.environ.get("WANDB_MODE", "") or "online").strip().lower()
    return MODE_ALIASES.get(raw, raw)


def save_report(report: Any, mode: str | None = None) -> str | None:
    """Publish the report when W&B is online; returns its URL, or None when not online."""
    if resolve_report_mode(mode) != "online":
        return None
    if not report.entity:
        import wandb

        entity = wandb.Api().default_entity
        report.entity = entity
        for block in report.blocks:
            for runset in getattr(block, "runsets", []):
                runset.entity = runset.entity or entity
    report.save()
    return str(report.url)


def report_main(project: str, group: str, entity: str | None = None,
                title: str | None = None, mode: str | None = None,
                task: str = "classify") -> int:
    """CLI entry for ``localsgd report``: 0 on success, 1 when W&B refused, 2 without it."""
    try:
        report = build_report(project, entity, group, title, task)
    except ImportError:
        print("localsgd: error: reports need wandb-workspaces; pip install 'localsgd[wandb]'",
              file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"localsgd: error: {exc}", file=sys.stderr)
        return 2
    try:
        url = save_report(report, mode)
    except Exception as exc:  # network, auth, unknown entity/project: all reported the same
        print(f"localsgd: error: could not save the W&B report ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 1
    if url is None:
        count = len(LM_PANELS if task == "lm" else PANELS)
        print(f"W&B is {resolve_report_mode(mode)}: report '{report.title}' built with "
              f"{count} panels but not saved; set WANDB_MODE=online to publish it",
              file=sys.stderr)
        return 0
    print(url)
    return 0
