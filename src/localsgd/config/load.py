"""Read a recipe: YAML + ``dotted.key=value`` overrides merged onto a typed schema.

OmegaConf stops at the first bad key; users fixing a recipe want every problem at once, so
values are merged one leaf at a time and each failure is collected with its full dotted key.
This module knows no particular schema: ``localsgd.recipe`` hands it the assembled one.
"""

from __future__ import annotations

import copy
import difflib
import functools
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from localsgd.config.errors import ConfigError
from localsgd.config.files import read_mapping


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts into (dotted key, value); lists stay whole values."""
    if isinstance(node, dict):
        out: list[tuple[str, Any]] = []
        for key, value in node.items():
            out.extend(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return [(prefix, node)]


def _known_keys(schema: DictConfig, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key in schema.keys():
        full = f"{prefix}.{key}" if prefix else str(key)
        keys.append(full)
        child = schema._get_node(key)
        if isinstance(child, DictConfig):
            keys.extend(_known_keys(child, full))
    return keys


def _explain(key: str, value: Any, exc: Exception, known: list[str]) -> str:
    parent, _, leaf = key.rpartition(".")
    if key not in known:
        # The longest part of the key the schema knows: a value cannot hold keys below it.
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            above = ".".join(parts[:n])
            if above in known and not any(k.startswith(above + ".") for k in known):
                return (f"{key}: unknown key; '{above}' is a value, not a section (set it "
                        f"with {above}=...)")
    if key not in known and (not parent or parent in known):
        scope = [k for k in known if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(key, scope, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else (
            "valid keys here: " + ", ".join(k.rpartition(".")[2] for k in scope))
        return f"{key}: unknown key; {hint}"
    if key not in known:
        return f"{key}: unknown key"
    msg = str(exc).splitlines()[0]
    return f"{key}: invalid value {value!r} ({msg})"


def _merge_leaf(cfg: DictConfig, key: str, value: Any, known: list[str], errors: list[str]) -> None:
    try:
        OmegaConf.update(cfg, key, value, merge=True, force_add=False)
    except Exception as exc:  # any key and value the user typed: OmegaConf
        # also raises OverflowError (an int too large for a float) and ValueError
        # (``optim.betas.x``: a list index that is no integer)
        errors.append(_explain(key, value, exc, known))


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text or not text.partition("=")[0].strip():
        raise ValueError(f"override '{text}' is not of the form dotted.key=value")
    key, _, raw = text.partition("=")
    # YAML parsing gives overrides the same typing rules as the recipe file (1e-4, true, [1,2]).
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer of > 4300 digits
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{key.strip()}: the value {raw[:40]!r} is not valid YAML ({problem}); "
                         "quote a string value") from None
    return key.strip(), value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe; a top-level ``base: other.yaml`` (relative to it) is merged underneath."""
    if p.resolve() in seen:
        raise ConfigError([f"base: recipe '{p}' includes itself"])
    loaded = read_mapping(p, hint=f" (named by 'base' in {seen[-1]})" if seen else "")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError([f"base: in '{p}' must be a path to another recipe, got {base!r}"])
    return _deep_merge(_read_yaml(p.parent / base, (*seen, p.resolve())), loaded)


@functools.lru_cache(maxsize=4)
def _template(schema_cls: type) -> DictConfig:
    """The schema as an OmegaConf tree, built once: building it costs several times more
    than copying it, and every recipe, study point and test loads one."""
    return OmegaConf.structured(schema_cls)


def merge_recipe(schema_cls: type, path: str | Path | None,
                 overrides: list[str] | None = None) -> tuple[Any, list[str]]:
    """(the recipe as a ``schema_cls`` object, every problem found while merging it).

    Leaves that failed to merge keep their defaults, so the caller's cross-field rules can
    still run and the user sees every problem in one go.
    """
    errors: list[str] = []
    # The file first: a file refused by its limits costs no schema building.
    data = _read_yaml(Path(path)) if path is not None else {}
    schema = copy.deepcopy(_template(schema_cls))
    known = _known_keys(schema)
    for key, value in _leaves(data):
        _merge_leaf(schema, key, value, known, errors)
    for text in overrides or []:
        try:
            key, value = _parse_override(text)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        _merge_leaf(schema, key, value, known, errors)
    try:
        cfg = OmegaConf.to_object(schema)
    except (OmegaConfBaseException, ArithmeticError) as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError([*errors, f"{key}: {str(exc).splitlines()[0]}"]) from None
    return cfg, errors


def to_yaml(cfg: Any) -> str:
    """The resolved recipe as YAML (enums as their names), as saved in the run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)
