"""Recipe and study files are read with limits: every bad file is one line, exit 2, fast."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, worker_env
from omegaconf import OmegaConf

from localsgd.cli import main
from localsgd.config.files import MAX_BYTES, MAX_DEPTH, MAX_NODES
from localsgd.recipe import RecipeConfig

TINY = REPO / "recipes" / "tests" / "tiny_synthetic.yaml"


def laughs(levels: int, fan: int = 10) -> str:
    """The nested-alias pattern: a few hundred bytes that expand to ``fan**levels`` values."""
    lines = ["name: x", "l0: &l0 [" + ", ".join(["lol"] * fan) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]"
              for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, float]:
    """``localsgd check ...`` in this process: (exit code, stderr, seconds)."""
    import localsgd.recipe  # noqa: F401 - the time bounds are for reading, not importing

    start = time.perf_counter()
    code = main(["check", *map(str, args)])
    seconds = time.perf_counter() - start
    return code, capsys.readouterr().err, seconds


def one_line(err: str) -> str:
    """The single problem line of a refused recipe."""
    assert err.startswith("localsgd: error: Recipe is not valid (1 problem):\n"), err
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err, err
    return lines[1].removeprefix("  - ")


@pytest.mark.parametrize(("text", "expected"), [
    (laughs(9), f"expands to more than {MAX_NODES} YAML nodes"),
    # Merge keys copy what they name: each level merges the previous one twice.
    ("name: x\nm0: &m0 {a: 1, b: 2}\n" + "".join(
        f"m{i}: &m{i} {{<<: [*m{i - 1}], k{i}: [*m{i - 1}, *m{i - 1}]}}\n"
        for i in range(1, 40)), f"expands to more than {MAX_NODES} YAML nodes"),
    # A flat list within the size cap but past the node bound: refused while composing.
    ("name: x\nl: [" + ",".join(["1"] * (MAX_NODES + 10)) + "]\n",
     f"expands to more than {MAX_NODES} YAML nodes"),
    ("name: x\nl: " + "[" * (MAX_DEPTH + 5) + "]" * (MAX_DEPTH + 5) + "\n",
     f"nests more than {MAX_DEPTH} levels deep"),
    ("name: x\nl: &a [1, *a]\n", "alias *a at line 2 is used inside the node it names"),
], ids=["nested-aliases", "merge-keys", "flat-list", "deep", "cycle"])
def test_expanding_documents_are_refused_fast(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert path.stat().st_size <= MAX_BYTES
    code, err, seconds = check(capsys, path)
    line = one_line(err)
    assert code == 2 and line.startswith(f"recipe file '{path}' {expected}"), line
    assert seconds < 1.0, seconds


def test_node_count_is_the_expanded_size(tmp_path: Path) -> None:
    # 10**4 values plus their 1111 lists and the top mapping's nodes stay under the bound and
    # load in full; one more level (10**5 values) is refused.
    from localsgd.config.files import read_mapping

    (tmp_path / "ok.yaml").write_text(laughs(4))
    loaded = read_mapping(tmp_path / "ok.yaml")
    flat = str(loaded["l3"]).count("lol")
    assert flat == 10**4
    (tmp_path / "bad.yaml").write_text(laughs(5))
    with pytest.raises(Exception, match="expands to more than"):
        read_mapping(tmp_path / "bad.yaml")


def test_size_cap_is_checked_before_reading(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:  # sparse: 50 MiB on paper, nothing written
        f.truncate(50 * 2**20)
    code, err, seconds = check(capsys, big)
    assert code == 2 and one_line(err) == (
        f"recipe file '{big}' is 50.0 MiB; recipe files are limited to 1 MiB")
    assert seconds < 1.0
    # Just under the cap is read (and parsed) as usual.
    edge = tmp_path / "edge.yaml"
    body = TINY.read_text() + "# padding\n"
    edge.write_text(body + "#" * (MAX_BYTES - len(body.encode()) - 1) + "\n")
    assert edge.stat().st_size == MAX_BYTES
    code, err, seconds = check(capsys, edge)
    assert code == 0, err
    edge.write_text(edge.read_text() + "#\n")
    assert check(capsys, edge)[0] == 2


def test_a_directory_is_named_as_such(capsys: pytest.CaptureFixture[str],
                                      tmp_path: Path) -> None:
    code, err, _ = check(capsys, tmp_path)
    assert code == 2 and one_line(err).startswith(
        f"recipe file '{tmp_path}' is a directory, not a file; pass the path of a YAML file")
    code, err, _ = check(capsys, tmp_path / "missing.yaml")
    assert "does not exist" in one_line(err)
    (tmp_path / "f").write_text("x")
    code, err, _ = check(capsys, tmp_path / "f" / "r.yaml")
    assert "does not exist (a part of the path is a file" in one_line(err)


@pytest.mark.timeout(20)
def test_a_fifo_is_refused_without_blocking(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    code, err, seconds = check(capsys, fifo)  # no writer: opening it would block forever
    assert code == 2 and one_line(err).startswith(
        f"recipe file '{fifo}' is a named pipe (FIFO), not a file")
    assert seconds < 1.0


def test_a_socket_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # AF_UNIX paths are short; pytest's tmp_path can exceed the limit.
    with tempfile.TemporaryDirectory(dir="/tmp") as d, socket.socket(socket.AF_UNIX) as s:
        path = Path(d) / "r.yaml"
        s.bind(str(path))
        code, err, _ = check(capsys, path)
    assert code == 2 and one_line(err).startswith(f"recipe file '{path}' is a socket")


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Run the block without root's power to read anything (as nobody), when root."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unreadable_files_and_directories(capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        root = Path(d)
        root.chmod(0o755)
        secret = root / "secret.yaml"
        secret.write_text(TINY.read_text())
        secret.chmod(0)
        closed = root / "closed"
        closed.mkdir()
        (closed / "r.yaml").write_text(TINY.read_text())
        closed.chmod(0)
        try:
            with unprivileged():
                code, err, _ = check(capsys, secret)
                code2, err2, _ = check(capsys, closed / "r.yaml")
        finally:
            closed.chmod(0o755)
    assert code == 2 and one_line(err) == (
        f"recipe file '{secret}' cannot be read (permission denied); make it readable "
        "(chmod a+r) or copy it")
    assert code2 == 2 and one_line(err2).startswith(
        f"recipe file '{closed / 'r.yaml'}' cannot be reached (permission denied on a "
        "directory of the path)")


def test_base_includes_and_study_files_have_the_same_limits(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "lol.yaml").write_text(laughs(9))
    top = tmp_path / "top.yaml"
    top.write_text("base: lol.yaml\ntrain:\n  epochs: 1\n")
    code, err, seconds = check(capsys, top)
    assert code == 2 and one_line(err).startswith(
        f"recipe file '{tmp_path / 'lol.yaml'}' (named by 'base' in {top.resolve()}) expands "
        "to more than")
    assert seconds < 1.0
    top.write_text("base: .\n")
    assert "is a directory, not a file" in one_line(check(capsys, top)[1])
    study = tmp_path / "study.yaml"
    study.write_text(laughs(9))
    start = time.perf_counter()
    code = main(["study", str(study)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"localsgd: error: Study {study} is not valid")
    assert f"study file '{study}' expands to more than {MAX_NODES} YAML nodes" in err
    assert time.perf_counter() - start < 1.0
    code = main(["study", str(tmp_path)])
    assert code == 2 and f"study file '{tmp_path}' is a directory" in capsys.readouterr().err


def test_a_key_below_a_value_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code, err, _ = check(capsys, TINY, "sync.outer.lr.x=1")
    assert code == 2 and one_line(err) == (
        "sync.outer.lr.x: unknown key; 'sync.outer.lr' is a value, not a section (set it with "
        "sync.outer.lr=...)")
    # Every value of the schema, with a key below it (and two levels below): never an
    # empty list of valid keys, always the value named.
    schema = OmegaConf.structured(RecipeConfig)
    leaves = [k for k in _keys(schema) if not any(o.startswith(k + ".") for o in _keys(schema))]
    code = main(["check", str(TINY), *(f"{k}.zz=1" for k in leaves), f"{leaves[0]}.a.b=1"])
    err = capsys.readouterr().err
    lines = [line.removeprefix("  - ") for line in err.splitlines()[1:]]
    assert code == 2 and len(lines) == len(leaves) + 1
    for key, line in zip([*leaves, f"{leaves[0]}.a"], lines, strict=True):
        assert line.startswith(f"{key.removesuffix('.a')}.") and (
            f"'{key.removesuffix('.a')}' is a value, not a section" in line), line
    assert "valid keys here: \n" not in err and not err.rstrip().endswith("valid keys here:")


def _keys(node: object, prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in node.keys():  # type: ignore[attr-defined]
        full = f"{prefix}.{key}" if prefix else str(key)
        out.append(full)
        child = node._get_node(key)  # type: ignore[attr-defined]
        if OmegaConf.is_dict(child):
            out += _keys(child, full)
    return out


def test_localsgd_check_subprocess_refuses_nested_aliases(tmp_path: Path) -> None:
    path = tmp_path / "lol.yaml"
    path.write_text(laughs(9))
    assert path.stat().st_size < 1024
    proc = subprocess.run([sys.executable, "-m", "localsgd", "check", str(path)], cwd=REPO,
                          env=worker_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert one_line(proc.stderr).startswith(f"recipe file '{path}' expands to more than")
    assert stat.S_ISREG(path.stat().st_mode)
