"""Every recipe key declares its domain, and every value outside it is one line naming the key.

The cases are generated from the schema itself: each leaf key of the resolved recipe (the
general sections and every registered part's keys), and for each declared domain the values
just outside it (below and above its bounds, zero, negative, nan, inf, a 64-bit overflow,
wrong types, wrong list lengths, bad list items, empty or NUL strings). They run in-process
through ``localsgd.cli.main``, the function the console script calls, for ``localsgd check``
and for ``localsgd run`` (whose check comes before any worker is started); a small sample
also runs as real subprocesses.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO, worker_env

from localsgd import cli
from localsgd.config.domain_check import keys, undeclared
from localsgd.config.domains import DOMAIN, INT64, Choice, Domain, Items, Length, Range, Text
from localsgd.engines.registry import ENGINES
from localsgd.recipe import RecipeConfig, load_config
from localsgd.sync.parts import PART_KINDS

ENABLE: dict[tuple[str, str], list[str]] = {
    ("sync.algorithm", "local"): ["sync.algorithm=local", "sync.period=2"],
    ("sync.algorithm", "post_local"): ["sync.algorithm=post_local", "sync.switch_epoch=0"],
    ("sync.algorithm", "hierarchical"): ["sync.algorithm=hierarchical"],
    ("sync.period_rule", "qsr"): ["sync.algorithm=local", "sync.period_rule=qsr",
                                  "sync.qsr_alpha=1.0"],
    ("sync.topology", "ring"): ["sync.algorithm=local", "sync.topology=ring"],
    ("sync.topology", "torus"): ["sync.algorithm=local", "sync.topology=torus"],
    ("sync.topology", "expander"): ["sync.algorithm=local", "sync.topology=expander"],
    ("sync.reducer", "compressed"): ["sync.algorithm=local", "sync.compression.method=sign"],
    ("sync.reducer", "choco"): ["sync.algorithm=local", "sync.topology=ring",
                                "sync.reducer=choco"],
    ("sync.update", "outer"): ["sync.algorithm=local", "sync.update=outer"],
    ("sync.runner", "overlapped"): ["sync.algorithm=local", "sync.period=4",
                                    "sync.overlap_steps=1"],
    ("engine.name", "deepspeed"): ["engine.name=deepspeed",
                                   "engine.deepspeed_config=deepspeed_configs/zero0_fp32.json"],
}
"""Overrides that choose each part that reads keys of its own (and are valid alone)."""


def _registry(selector: str) -> Any:
    return ENGINES if selector == "engine.name" else dict(PART_KINDS.values())[
        selector.removeprefix("sync.")]


def part_owners() -> dict[str, tuple[str, str]]:
    """Recipe key -> (selector key, part name) of a registered part reading it (the first
    in ENABLE's order, then in the registries')."""
    owners: dict[str, tuple[str, str]] = {}
    chosen = [*ENABLE, *((f"sync.{key}", name) for key, reg in PART_KINDS.values()
                         for name in reg.names()), *(("engine.name", n) for n in ENGINES.names())]
    for selector, name in chosen:
        section = selector.split(".")[0]
        for doc in keys(_registry(selector).get(name).Config):
            owners.setdefault(f"{section}.{doc.key}", (selector, name))
    return owners


OWNERS = part_owners()


def test_every_field_declares_its_domain() -> None:
    missing = undeclared(RecipeConfig)
    assert not missing, (
        f"{missing}: every number, string and list field declares the values it accepts next "
        "to its type, e.g. `batch: int = domain(AT_LEAST_ONE, 8)` from "
        "localsgd.config.domains (see the README's 'Every key declares its domain')")


def test_every_part_with_keys_can_be_chosen_here() -> None:
    """A new part with keys of its own gets its enabling overrides above, so that its keys
    are tried with the part chosen."""
    assert set(OWNERS.values()) <= set(ENABLE), set(OWNERS.values()) - set(ENABLE)
    for overrides in ENABLE.values():
        load_config(None, overrides)


def test_composed_sections_keep_each_parts_domains() -> None:
    composed = {d.key: d for d in keys(RecipeConfig)}
    for key, (selector, name) in OWNERS.items():
        own = {d.key: d for d in keys(_registry(selector).get(name).Config)}
        assert own[key.split(".", 1)[1]].domain == composed[key].domain, key


def _nested_value(key: str, value: Any) -> Any:
    """``value`` as the leaf of ``key`` in a mapping: a recipe file's form."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _outside_range(d: Range, is_int: bool) -> list[Any]:
    out: list[Any] = []
    step = 1 if is_int else 0.5
    if d.lo is not None:
        out.append(d.lo if d.lo_open else d.lo - step)
        if d.lo >= 0:
            out.append(-1 if is_int else -1.0)
        if d.lo > 0 or d.lo_open:
            out.append(0)
    if d.hi is not None:
        top = (d.hi if d.hi_open else d.hi + step)
        out.append(int(top) if is_int and math.isfinite(top) and top < INT64 else top)
    if is_int:
        out += [INT64, -INT64]
    else:
        out += [math.nan, math.inf, -math.inf]
    return [v for v in out if not (is_int and isinstance(v, float) and not v.is_integer())]


def _inside(d: Domain) -> Any:
    if isinstance(d, Range):
        lo = d.lo if d.lo is not None else 0
        if d.hi is not None:
            return (lo + d.hi) / 2
        return lo + 1
    if isinstance(d, Text):
        return "x"
    raise AssertionError(d)


def outside(d: Domain | None, hint: Any) -> list[tuple[str, Any]]:
    """(why, value) for values just outside ``d``, as a field typed ``hint`` gets them."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    is_int = hint is int
    cases: list[tuple[str, Any]] = []
    if d is None:  # an enum or bool: its type is its domain
        return [("wrong type", [1, 2]), ("unknown choice", "no_such_value")]
    if isinstance(d, Range):
        cases.append(("wrong type", "abc"))
        if is_int:
            cases.append(("not an integer", 1.5))
        cases += [("outside", v) for v in _outside_range(d, is_int)]
    elif isinstance(d, Text):
        cases.append(("wrong type", [1, 2]))
        if not d.empty:
            cases.append(("empty", ""))
        cases.append(("NUL", "a\x00b"))
        if d.max_len:
            cases.append(("too long", "x" * (d.max_len + 1)))
        cases += [(f"forbidden {c!r}", f"a{c}b") for c in d.forbid]
    elif isinstance(d, Length):
        good = _inside(d.item)
        cases += [("wrong type", "abc"), ("too short", [good] * (d.n - 1)),
                  ("too long", [good] * (d.n + 1)), ("nested list", [[good], *[good] * (d.n - 1)])]
        for i in range(d.n):
            for _, bad in outside(d.item, float)[1:]:
                cases.append((f"item {i}", [bad if j == i else good for j in range(d.n)]))
    elif isinstance(d, Items):
        good = _inside(d.item)
        item_hint = int if isinstance(d.item, Range) and d.item.lo == 1 else float
        cases.append(("wrong type", "abc"))
        for _, bad in outside(d.item, item_hint)[1:]:
            cases.append(("bad item", [good, bad] if d.increasing else [bad]))
        if d.increasing:
            cases.append(("not increasing", [good + 1, good]))
    elif isinstance(d, Choice):
        cases += [("wrong type", [1, 2]), ("unknown part", "no_such_part")]
    else:
        raise AssertionError(f"no generated cases for {d!r}")
    return cases


def _leaf_fields() -> list[tuple[str, Any, Domain | None]]:
    """(dotted key, type hint, declared domain) of every leaf of the recipe schema."""
    out: list[tuple[str, Any, Domain | None]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")  # type: ignore[arg-type]
            else:
                out.append((f"{prefix}{f.name}", hint, f.metadata.get(DOMAIN)))

    walk(RecipeConfig, "")
    return out


def generated_cases() -> list[tuple[str, list[str], str]]:
    """(key, overrides, description): every key, each value outside its domain, with the
    part reading the key chosen."""
    out = []
    for key, hint, d in _leaf_fields():
        owner = OWNERS.get(key)
        enabling = [o for o in ENABLE[owner] if not o.startswith(f"{key}=")] if owner else []
        if key != "run.dir":  # else run.dir, ${name} interpolated, repeats a bad name
            enabling.append("run.dir=runs/domains")
        for why, value in outside(d, hint):
            text = yaml.safe_dump(value, default_flow_style=True, width=10**6,
                                  allow_unicode=False).strip().removesuffix("...").strip()
            out.append((key, [*enabling, f"{key}={text}"], why))
    return out


CASES = generated_cases()


def _error_lines(err: str) -> list[str]:
    return [line.removeprefix("  - ") for line in err.splitlines() if line.startswith("  - ")]


@pytest.fixture(scope="module")
def empty_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("domains") / "empty.yaml"
    path.write_text("name: domains\n")
    return path


def test_the_generated_cases_cover_every_key() -> None:
    assert {key for key, _, _ in CASES} == {key for key, _, _ in _leaf_fields()}
    assert len(CASES) > 300


@pytest.mark.parametrize("command", ["check", "run"])
def test_every_value_outside_its_domain_is_one_line_naming_its_key(
        command: str, empty_recipe: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 2 and exactly one problem, starting with the key (or one of its items); ``run``
    never reaches torchrun's launcher (two nodes of two: every part can be chosen)."""
    import torch.distributed.run as torchrun_module

    launched: list[Any] = []
    monkeypatch.setattr(torchrun_module, "run", launched.append)
    launch = ["run", "--nnodes=2", "--nproc-per-node=2", "--rdzv-endpoint=127.0.0.1:1"
              ] if command == "run" else ["check"]
    wrong = []
    # run: the first case of every key and every third one (its check is check's, and the
    # torchrun parser costs a little more each time).
    first = {key: i for i, (key, _, _) in reversed(list(enumerate(CASES)))}
    cases = CASES if command == "check" else [
        c for i, c in enumerate(CASES) if i % 3 == 0 or first[c[0]] == i]
    for key, overrides, why in cases:
        code = cli.main([*launch, str(empty_recipe), *overrides])
        out, err = capsys.readouterr()
        lines = _error_lines(err)
        named = len(lines) == 1 and lines[0].startswith((f"{key}:", f"{key}["))
        if code != 2 or not named or "Traceback" in err or (command == "run" and out):
            wrong.append(f"{overrides} ({why}): exit {code}, {err.strip()[-300:]!r}")
    assert not wrong, f"{len(wrong)} of {len(cases)}:\n" + "\n".join(wrong[:30])
    assert not launched


@pytest.mark.parametrize(("key", "file_value"), [
    ("optim.betas", [0.9]), ("sync.outer.momentum", 1.5), ("data.root", ""),
    ("lr_schedule.milestones", [3, 2]), ("wandb.tags", ["x" * 65]),
])
def test_a_recipe_file_value_outside_its_domain_names_its_key(
        key: str, file_value: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({"name": "bad", **_nested_value(key, file_value)}))
    assert cli.main(["check", str(recipe)]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith((f"{key}:", f"{key}[")), lines


def test_real_check_and_run_refuse_before_any_worker(tmp_path: Path) -> None:
    """The console scripts themselves: exit 2 and the one line, and from ``run`` no run
    directory and no worker (torchrun's agent would log its workers' start, and each worker
    would print the recipe's problems itself)."""
    run_dir = tmp_path / "run"
    recipe = [str(REPO / "recipes/quickstart.yaml"), f"run.dir={run_dir}"]
    env = worker_env()
    check = subprocess.run([sys.executable, "-m", "localsgd", "check", *recipe,
                            "optim.name=adamw", "optim.betas=[1.5,0.999]"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 2, check.stderr
    assert _error_lines(check.stderr) == ["optim.betas[0]: must be in [0, 1), got 1.5"]
    run = subprocess.run([sys.executable, "-m", "localsgd", "run", "--standalone",
                          "--nproc-per-node=2", *recipe, "sync.algorithm=local",
                          "sync.update=outer", "sync.outer.momentum=1.5"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert _error_lines(run.stderr) == ["sync.outer.momentum: must be in [0, 1), got 1.5"]
    assert run.stdout == "" and "rank" not in run.stderr.lower(), run.stderr
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []
