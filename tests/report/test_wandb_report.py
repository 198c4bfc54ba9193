"""The W&B report definition, checked offline (building it needs no network)."""

from __future__ import annotations

from typing import Any

import pytest
import wandb_workspaces.reports.v2 as wr
from wandb_workspaces import expr

from localsgd.report.wandb_report import PANELS, build_report, report_main, save_report


def _grid(report: Any) -> Any:
    (grid,) = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    return grid


def test_panels_axes_and_metrics() -> None:
    report = build_report("localsgd", "team", "cifar10-resnet20")
    panels = [p for p in _grid(report).panels if isinstance(p, wr.LinePlot)]
    scatters = [p for p in _grid(report).panels if isinstance(p, wr.ScatterPlot)]
    assert {(p.x, p.y) for p in scatters} == {("comm/bytes", "eval/acc"),
                                              ("time/wall_s", "eval/acc")}
    got = {(p.x, tuple(p.y)) for p in panels}
    assert got == {("epoch", ("eval/acc",)), ("time/wall_s", ("eval/acc",)),
                   ("comm/bytes", ("eval/acc",)), ("epoch", ("train/loss",)),
                   ("step", ("sync/consensus_distance",)), ("step", ("sync/period",))}
    assert len(panels) == len(PANELS)
    # The serialised panels name our history keys, not W&B's "_step" row counter.
    configs = [p._to_model().config for p in panels]
    assert [c.x_axis for c in configs] == ["epoch", "time/wall_s", "comm/bytes", "epoch", "step",
                                           "step"]
    assert all(c.metrics for c in configs)


def test_runs_filtered_to_group() -> None:
    report = build_report("localsgd", "team", "cifar10-resnet20", title="My title")
    (runset,) = _grid(report).runsets
    assert (report.project, report.entity, report.title) == ("localsgd", "team", "My title")
    assert (runset.project, runset.entity) == ("localsgd", "team")
    (flt,) = expr.string_to_filterexpr_list(runset.filters)
    backend = flt.to_model()
    assert (backend.key.section, backend.key.name, backend.op, backend.value) == (
        "run", "group", "=", "cifar10-resnet20")


def test_group_with_single_quote_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="single quote"):
        build_report("localsgd", None, "it's")
    assert report_main("localsgd", "it's", mode="offline") == 2
    assert "single quote" in capsys.readouterr().err


def test_not_saved_unless_online(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    def no_network(self: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("save() must not be called offline")

    monkeypatch.setattr(wr.Report, "save", no_network)
    report = build_report("localsgd", None, "g")  # entity None must not hit the network
    assert report.entity == ""
    assert save_report(report, "offline") is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert report_main("localsgd", "g") == 0
    assert "not saved" in capsys.readouterr().err


def test_save_failure_is_reported(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    def refused(self: Any, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(wr.Report, "save", refused)
    assert report_main("localsgd", "g", entity="team", mode="online") == 1
    assert "no route to host" in capsys.readouterr().err
