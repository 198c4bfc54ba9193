"""Result plots from local records: ``localsgd plot RUN_DIR [RUN_DIR ...] [--out DIR]``.

Series are extracted first (``collect_series``) and drawn second (``draw``), so tests and
notebooks can check exactly what a figure shows without reading pixels.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from localsgd.report.files import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Series = tuple[list[float], list[float]]
"""(xs, ys) of one run in one plot, sorted by x."""


@dataclass(frozen=True)
class PlotSpec:
    name: str
    """File stem of the PNG."""
    event: str
    """Records of this event feed the plot ("eval": mid-epoch and epoch-end evaluations)."""
    x: str
    y: str
    title: str
    xlabel: str
    ylabel: str
    x_scale: float = 1.0
    """Drawn x = recorded x / x_scale (bytes shown as MiB); series keep recorded units."""
    y2: str | None = None
    """A second metric of the same records, drawn dashed against a right-hand axis."""
    y2label: str = ""


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("acc_vs_epoch", "epoch", "epoch", "eval/acc", "Test accuracy vs epoch",
             "epoch", "test accuracy"),
    PlotSpec("acc_vs_time", "epoch", "time/wall_s", "eval/acc", "Test accuracy vs training time",
             "wall-clock training time (s)", "test accuracy"),
    PlotSpec("acc_vs_bytes", "epoch", "comm/bytes", "eval/acc",
             "Test accuracy vs communication", "data communicated per worker (MiB)",
             "test accuracy", x_scale=2.0**20),
    PlotSpec("loss_vs_epoch", "epoch", "epoch", "train/loss", "Training loss vs epoch",
             "epoch", "training loss (epoch mean)"),
    # Language models (records with tokens): validation loss at equal tokens, time, bytes.
    PlotSpec("val_loss_vs_tokens", "eval", "tokens", "eval/loss",
             "Validation loss vs tokens", "tokens seen (all workers, millions)",
             "validation loss (nats per token)", x_scale=1e6, y2="eval/bpb",
             y2label="bits per byte (dashed)"),
    PlotSpec("val_loss_vs_time", "eval", "time/wall_s", "eval/loss",
             "Validation loss vs training time", "wall-clock training time (s)",
             "validation loss (nats per token)"),
    PlotSpec("val_loss_vs_bytes", "eval", "comm/bytes", "eval/loss",
             "Validation loss vs communication", "data communicated per worker (MiB)",
             "validation loss (nats per token)", x_scale=2.0**20),
    PlotSpec("consensus_vs_step", "sync", "step", "sync/consensus_distance",
             "Consensus distance at each model average", "optimizer step",
             "mean distance of workers to their average", y2="sync/period",
             y2label="local steps in the period that ended (dashed)"),
)


def secondary(spec: PlotSpec) -> PlotSpec | None:
    """The spec of ``spec``'s right-hand series, keyed ``<name>+<y2>`` in collect_series."""
    if spec.y2 is None:
        return None
    return dataclasses.replace(spec, name=f"{spec.name}+{spec.y2}", y=spec.y2, y2=None)

# The record that identifies a point: a resumed run appends re-done epochs and syncs to
# metrics.jsonl, and the later record of the same epoch/step replaces the earlier one.
# A sync is its step and action: an overlapped run can land a sync and take the final
# average at the same step.
_IDENTITY = {"epoch": ("epoch",), "sync": ("step", "sync/action"), "eval": ("step",)}
# Evaluations happen inside epochs ("eval" records) and at epoch ends ("epoch" records).
_EVENTS = {"eval": ("eval", "epoch")}


class PlotError(ValueError):
    """A run directory cannot be plotted; the message says which and why."""


def run_algorithm(run_dir: Path) -> str:
    """The run's sync algorithm from its saved recipe ("?" when unreadable)."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        return str(config["sync"]["algorithm"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "?"


def _series(records: list[dict[str, Any]], spec: PlotSpec) -> Series:
    ident = _IDENTITY[spec.event]
    points: dict[tuple[Any, ...], tuple[float, float]] = {}
    for r in records:
        if r.get("event") in _EVENTS.get(spec.event, (spec.event,)) and spec.x in r \
                and spec.y in r and (spec.event != "eval" or "tokens" in r):
            key = tuple(r.get(k, r[spec.x]) for k in ident)
            points[key] = (float(r[spec.x]), float(r[spec.y]))
    # By step (or epoch); a tie keeps the order the records were written in.
    ordered = [p for _, p in sorted(points.items(), key=lambda kv: kv[0][0])]
    return [p[0] for p in ordered], [p[1] for p in ordered]


def collect_series(run_dirs: list[str | Path]) -> dict[str, dict[str, Series]]:
    """{plot name: {run label: (xs, ys)}}; runs without data for a plot are left out."""
    specs = [*PLOTS, *(s for s in map(secondary, PLOTS) if s is not None)]
    out: dict[str, dict[str, Series]] = {spec.name: {} for spec in specs}
    labels: set[str] = set()
    for raw in run_dirs:
        run_dir = Path(raw)
        if not (run_dir / "metrics.jsonl").is_file():
            raise PlotError(f"'{run_dir}' has no metrics.jsonl; pass run directories written "
                            "by training (run.dir)")
        records = read_metrics(run_dir)
        # Legend label: directory name and algorithm; the full path only when two runs in
        # different parents share a name.
        algorithm = run_algorithm(run_dir)
        label = f"{run_dir.name} ({algorithm})"
        if label in labels:
            label = f"{run_dir} ({algorithm})"
        labels.add(label)
        for spec in specs:
            xs, ys = _series(records, spec)
            if xs:
                out[spec.name][label] = (xs, ys)
    return out


def draw(spec: PlotSpec, series: dict[str, Series],
         right: dict[str, Series] | None = None) -> Figure:
    """One figure with a line per run, on the Agg canvas.

    Built without pyplot: no global backend switch, no figure registry to leak from.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {}
    for label, (xs, ys) in series.items():
        (line,) = ax.plot([x / spec.x_scale for x in xs], ys, marker="o", markersize=3,
                          label=label)
        colors[label] = line.get_color()
    if right:
        twin = ax.twinx()
        for label, (xs, ys) in right.items():
            twin.step([x / spec.x_scale for x in xs], ys, where="pre", linestyle="--",
                      alpha=0.6, color=colors.get(label))
        twin.set_ylabel(spec.y2label)
    ax.set_title(spec.title)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def write_plots(run_dirs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write one PNG per plot that has data; returns the paths written."""
    if not run_dirs:
        raise PlotError("no run directories given")
    data = collect_series(run_dirs)
    out_dir = Path(out) if out is not None else Path(run_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for spec in PLOTS:
        if not data[spec.name]:
            continue  # e.g. consensus distance of mini-batch SGD runs, which never average
        path = out_dir / f"{spec.name}.png"
        extra = secondary(spec)
        draw(spec, data[spec.name], data[extra.name] if extra else None).savefig(path, dpi=120)
        written.append(path)
    if not written:
        raise PlotError("no epoch or sync records yet in " + ", ".join(map(str, run_dirs)))
    return written


def plot_runs(run_dirs: list[str], out: str | None) -> int:
    """CLI entry: 0 with the written paths on stdout, 2 with a message on stderr."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("localsgd: error: plotting needs matplotlib; pip install 'localsgd[plot]'",
              file=sys.stderr)
        return 2
    try:
        paths = write_plots(list(run_dirs), out)
    except (PlotError, OSError, ValueError) as exc:
        print(f"localsgd: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0
