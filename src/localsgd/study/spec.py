"""The study file: a base recipe, launch options and the points to run.

```yaml
name: cifar10_subset              # directory and W&B group
recipe: ../quickstart.yaml        # relative to this file
launch: [--standalone, --nproc-per-node=2]   # torchrun options, passed through
overrides: [train.epochs=4]       # for every point
variants:                         # optional: named override lists
  local_h16: [sync.algorithm=local, sync.period=16]
grid:                             # optional: key -> values, every combination
  sync.period: [4, 16]
  seed: [0, 1]
dir: runs/studies/NAME            # optional: where the points' run directories go
```

Domains: ``name`` a non-empty string without '/' or quotes; ``recipe`` and ``dir``
non-empty paths; ``launch`` and ``overrides`` lists of strings (``launch``: torchrun
options, those localsgd reads checked as in ``localsgd.launch.options``); ``variants`` a
mapping of names to lists of overrides; ``grid`` a mapping of recipe keys to non-empty lists
of values. Every point's recipe is then checked like ``localsgd check``'s.

Points are every variant (or one unnamed one) crossed with every combination of the grid,
in the order written. A point's *variant* is everything but its ``seed``: the table reports
each variant's mean and spread over seeds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml

from localsgd.config.domains import PATH
from localsgd.config.errors import ConfigError
from localsgd.config.load import read_mapping

KEYS = ("name", "recipe", "launch", "overrides", "variants", "grid", "dir")


@dataclass
class Point:
    index: int
    variant: str
    """The label shared by the seeds of one setting."""
    seed: Any
    overrides: list[str]
    """This point's own overrides (after the study's common ones)."""

    @property
    def label(self) -> str:
        return self.variant if self.seed is None else f"{self.variant} seed={self.seed}"

    @property
    def slug(self) -> str:
        """A directory name: the label with separators a file system accepts."""
        text = self.label.replace(" ", "_").replace("/", "-")
        return "".join(c if c.isalnum() or c in "._=,+-" else "-" for c in text)


@dataclass
class Study:
    name: str
    recipe: Path
    launch: list[str]
    overrides: list[str]
    points: list[Point] = field(default_factory=list)
    dir: Path = Path("runs/studies")
    source: Path = Path("study.yaml")


def _value(v: Any) -> str:
    """An override value as YAML would read it back (lists stay lists)."""
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _strings(raw: Any, key: str, problems: list[str]) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(x, str | int | float) for x in raw):
        problems.append(f"{key}: must be a list of strings, got {raw!r}")
        return []
    return [str(x) for x in raw]


def load_study(path: str | Path) -> Study:
    """The study in ``path``, or one ConfigError naming every problem with its entry."""
    src = Path(path)
    raw = read_mapping(src, what="study")
    problems: list[str] = []
    for key in raw:
        if key not in KEYS:
            near = get_close_matches(str(key), KEYS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; known keys: {', '.join(KEYS)}"
            problems.append(f"{key}: unknown study key{hint}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or "/" in name or "'" in name:
        problems.append(f"name: the study needs a name without '/' or quotes (its directory "
                        f"and W&B group), got {name!r}")
    recipe = raw.get("recipe")
    if not isinstance(recipe, str):
        problems.append(f"recipe: the path of the base recipe (relative to {src}), got "
                        f"{recipe!r}")
    launch = _strings(raw.get("launch", ["--standalone", "--nproc-per-node=2"]), "launch",
                      problems)
    overrides = _strings(raw.get("overrides"), "overrides", problems)
    variants = raw.get("variants") or {None: []}
    if not isinstance(variants, dict):
        problems.append(f"variants: must map a name to a list of overrides, got {variants!r}")
        variants = {None: []}
    variant_lists = {k: _strings(v, f"variants.{k}", problems) for k, v in variants.items()}
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        problems.append(f"grid: must map a recipe key to a list of values, got {grid!r}")
        grid = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key}: must be a non-empty list of values, got {values!r}")
    if "dir" in raw:
        problems += [f"dir{suffix}: {msg}" for suffix, msg in PATH.problems(raw["dir"])]
    if "variants" not in raw and not grid:
        problems.append("grid: the study has no points; give grid (key: [values]) or "
                        "variants (name: [overrides])")
    if problems:
        raise ConfigError(problems)
    keys = list(grid)
    points: list[Point] = []
    for vname, vlist in variant_lists.items():
        for combo in itertools.product(*(grid[k] for k in keys)):
            chosen = dict(zip(keys, combo, strict=True))
            seed = chosen.pop("seed", None)
            parts = ([str(vname)] if vname is not None else []) + [
                f"{k}={_value(v)}" for k, v in chosen.items()]
            own = [*vlist, *(f"{k}={_value(v)}" for k, v in chosen.items())]
            if seed is not None:
                own.append(f"seed={_value(seed)}")
            points.append(Point(len(points) + 1, ",".join(parts) or "base", seed, own))
    where = Path(str(raw.get("dir") or f"runs/studies/{name}"))
    return Study(name=str(name), recipe=src.parent / str(recipe), launch=launch,
                 overrides=overrides, points=points, dir=where, source=src)
