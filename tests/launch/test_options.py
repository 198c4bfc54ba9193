"""The torchrun options localsgd reads are checked before any agent or worker starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from localsgd import cli
from localsgd.config import ConfigError
from localsgd.study.runner import check_study
from localsgd.study.spec import load_study

TINY = REPO / "recipes" / "tests" / "tiny_synthetic.yaml"
BAD = [
    (["--nproc-per-node=0"], "--nproc-per-node: must be an integer >= 1"),
    (["--nproc-per-node=-2"], "--nproc-per-node: must be"),
    (["--nproc-per-node=abc"], "--nproc-per-node: must be"),
    (["--nnodes=0"], "--nnodes: must be an integer N >= 1, or MIN:MAX"),
    (["--nnodes=3:1"], "--nnodes: must be"),
    (["--nnodes=1:2:3"], "--nnodes: must be"),
    (["--nnodes=x"], "--nnodes: must be"),
    (["--nnodes=2", "--node-rank=2"], "--node-rank: must be an integer in [0, --nnodes)"),
    (["--max-restarts=-1"], "--max-restarts: must be an integer >= 0"),
]


@pytest.mark.parametrize(("options", "line"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_option_is_one_line_and_nothing_starts(
        options: list[str], line: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import localsgd.launch.run as launch_run

    launched: list[Any] = []
    # The launcher itself (torchrun's agent, or the multi-node rendezvous that would wait for
    # the other node) is replaced: only reaching it is under test.
    monkeypatch.setattr(launch_run, "_launch", lambda args, timeout_s: launched.append(args))
    assert cli.main(["run", "--standalone", *options, str(TINY)]) == 2
    problems = [p for p in capsys.readouterr().err.splitlines() if p.startswith("  - ")]
    assert len(problems) == 1 and problems[0].startswith(f"  - {line}"), problems
    assert not launched


def test_good_options_reach_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    import localsgd.launch.run as launch_run

    launched: list[Any] = []
    # The launcher itself (torchrun's agent, or the multi-node rendezvous that would wait for
    # the other node) is replaced: only reaching it is under test.
    monkeypatch.setattr(launch_run, "_launch", lambda args, timeout_s: launched.append(args))
    for options in (["--nproc-per-node=auto"], ["--nnodes=1:2", "--nproc-per-node=2"],
                    ["--nnodes=2", "--node-rank=1", "--max-restarts=0"]):
        assert cli.main(["run", *options, str(TINY)]) == 0
    assert len(launched) == 3


@pytest.mark.parametrize(("text", "line"), [
    ("launch: [--standalone, --nproc-per-node=0]\n", "launch: --nproc-per-node: must be"),
    ("launch: [--max-restarts=-3]\n", "launch: --max-restarts: must be"),
    ("dir: ''\n", "dir: must be a non-empty path"),
])
def test_a_study_launch_list_and_dir_are_checked(tmp_path: Path, text: str, line: str) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(f"name: s\nrecipe: {TINY}\ngrid:\n  seed: [0]\n{text}")
    with pytest.raises(ConfigError) as err:
        problems = check_study(load_study(path))
        raise ConfigError(problems)
    assert [p for p in err.value.problems if p.startswith(line)], err.value.problems
