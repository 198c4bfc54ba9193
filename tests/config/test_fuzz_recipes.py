"""Property: whatever a recipe file or an override holds, ``localsgd check`` says "valid" or
exits 2 with problems that each name a key (or the override or file); never a traceback,
never a hang.

Hypothesis mutates the repository's recipes (a key set to a random value, a key removed, an
unknown key added) and adds random overrides (schema keys and random ones, values of every
YAML kind: numbers, huge integers, nan, strings with any unicode, lists, nested mappings,
nulls, interpolations, raw text that may not be YAML at all). Each example runs through
``localsgd.cli.main``, as the console script does, under a time bound. The examples are
fixed (derandomized) in the default suite; ``LOCALSGD_FUZZ_EXAMPLES=N`` runs N random ones.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from conftest import REPO
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from localsgd import cli
from localsgd.config.domain_check import keys
from localsgd.config.errors import one_line
from localsgd.recipe import RecipeConfig

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "studies" not in p.parts)
SCHEMA_KEYS = [d.key for d in keys(RecipeConfig)]
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in SCHEMA_KEYS if "." in k})
EXAMPLES = int(os.environ.get("LOCALSGD_FUZZ_EXAMPLES", "400"))
SECONDS = 20
"""Time bound of one example (a load takes well under a second)."""

INTERPOLATIONS = ["${name}", "${nosuch}", "${run.dir}", "${optim.base_lr}", "${oc.env:HOME}",
                  "${oc.env:NO_SUCH_VARIABLE}", "${oc.decode:'[1, 2]'}", "${", "${oc.select:x}",
                  "${oc.create:'{a: 1}'}"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(2**300), max_value=2**300),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.text(alphabet=st.characters(codec="utf-8"), max_size=8),
    st.sampled_from(["", "\x00", "a\nb", "none", "null", "auto", "local", "adamw", "1e400",
                     "-inf", "ring", "qsr", "outer", "deepspeed", *INTERPOLATIONS]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6) | st.sampled_from(
                                SCHEMA_KEYS[:20]), inner, max_size=3)),
    max_leaves=8,
)
override_keys = st.one_of(st.sampled_from(SCHEMA_KEYS), st.sampled_from(SECTIONS),
                          st.sampled_from([f"{k}[0]" for k in SCHEMA_KEYS]),
                          st.text(max_size=12),
                          st.builds(lambda k, t: f"{k}.{t}", st.sampled_from(SCHEMA_KEYS),
                                    st.text(max_size=4)))


def _dump(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True)
    return text.strip().removesuffix("...").strip()


overrides = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={_dump(v)}", override_keys, values),
    st.builds(lambda k, raw: f"{k}={raw}", override_keys, st.text(max_size=12)),
    st.text(max_size=10),
), max_size=4)


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[path[-1]] = value


@st.composite
def recipes(draw: st.DrawFn) -> tuple[Path, dict[str, Any], list[str]]:
    """(the recipe mutated, the mutation's keys) from one of the repository's recipes."""
    source = draw(st.sampled_from(RECIPES))
    tree = yaml.safe_load(source.read_text()) or {}
    if "base" in tree:
        tree["base"] = str((source.parent / tree["base"]).resolve())
    touched = []
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(min_size=1, max_size=8)))
        if draw(st.booleans()):
            _set(tree, key.split("."), draw(values))
        else:
            parent = tree
            for part in key.split(".")[:-1]:
                parent = parent.get(part) if isinstance(parent.get(part), dict) else {}
            parent.pop(key.split(".")[-1], None)
        touched.append(key)
    return source, tree, touched


@contextlib.contextmanager
def time_bound(seconds: int) -> Iterator[None]:
    def stop(signum: int, frame: Any) -> None:
        raise TimeoutError(f"one example ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


FILE_LINES = ("override '", "recipe file '", "base: ")


def names_a_key(line: str, given: list[str]) -> bool:
    """The problem starts with a schema key (or an item of one), a key the example gave
    (a dotted part of it, or a key below it: a mapping value nests), or names the override
    or file at fault."""
    parts = {".".join(g.split(".")[:n]) for g in given for n in range(1, g.count(".") + 2)}
    return line.startswith(FILE_LINES) or any(
        line.startswith((f"{k}: ", f"{k}[", f"{k}.")) for k in {*SCHEMA_KEYS, *SECTIONS, *parts}
        if k)


@settings(max_examples=EXAMPLES, deadline=None, derandomize="LOCALSGD_FUZZ_EXAMPLES" not in
          os.environ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(recipe=recipes(), extra=overrides)
def test_any_recipe_and_overrides_are_valid_or_name_their_keys(
        recipe: tuple[Path, dict[str, Any], list[str]], extra: list[str],
        tmp_path_factory: Any) -> None:
    source, tree, touched = recipe
    path = tmp_path_factory.mktemp("fuzz") / source.name
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    out, err = io.StringIO(), io.StringIO()
    with time_bound(SECONDS), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["check", str(path), *extra])
        except SystemExit as exc:  # argparse: an override that starts with '-' is an option
            code = exc.code
            assert code == 2 and "unrecognized arguments" in err.getvalue(), err.getvalue()
            return
    text = err.getvalue()
    given_keys = [one_line(k) for k in touched + [o.partition("=")[0].strip() for o in extra]]
    event("valid" if code == 0 else "refused")  # --hypothesis-show-statistics shows the mix
    if code == 0:
        assert text.rstrip().endswith(": valid"), text
        return
    assert code == 2, (code, text)
    problems = [line.removeprefix("  - ") for line in text.split("\n")
                if line.startswith("  - ")]
    assert problems, text
    bad = [p for p in problems if not names_a_key(p, given_keys)]
    assert not bad, (bad, extra, touched)
