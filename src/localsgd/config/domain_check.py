"""Check every field of a resolved recipe against its declared domain; list the domains.

One walk over the dataclass fields (nested sections and the composed ``sync`` and
``engine`` sections alike) gives one problem per value outside its domain, naming the full
dotted key (``sync.outer.momentum: must be in [0, 1), got 1.5``). A field without a declared
domain still gets the checks every number needs (finite, 64-bit), so nothing non-finite
reaches torch; ``undeclared`` lists such fields, and a test keeps that list empty.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import types
import typing
from typing import Any

from localsgd.config.domains import DOMAIN, Domain, Range

_ANY_NUMBER = Range()


def _field_domain(f: dataclasses.Field[Any], value: Any) -> Domain | None:
    declared = f.metadata.get(DOMAIN)
    if declared is not None:
        return declared
    return _ANY_NUMBER if isinstance(value, int | float) and not isinstance(value, bool) else None


def domain_problems(cfg: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(field key, message) for every value of ``cfg``'s fields outside its domain."""
    out: list[tuple[str, str]] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += domain_problems(value, key + ".")
            continue
        dom = _field_domain(f, value)
        if value is None or dom is None:
            continue  # None: the merge allowed it, so the field's type is Optional
        out += [(key, f"{key}{suffix}: {msg}") for suffix, msg in dom.problems(value)]
    return out


def with_defaults(cfg: Any, keys: set[str]) -> Any:
    """A copy of ``cfg`` whose fields ``keys`` (dotted) hold their defaults again, so that
    rules between keys see in-domain values only (as for leaves that failed to merge)."""
    out = copy.deepcopy(cfg)
    for key in keys:
        *path, leaf = key.split(".")
        obj = out
        for part in path:
            obj = getattr(obj, part)
        f = {g.name: g for g in dataclasses.fields(obj)}[leaf]
        if f.default is not dataclasses.MISSING:
            setattr(obj, leaf, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(obj, leaf, f.default_factory())
    return out


def _optional(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One recipe key: its type, default and the values it accepts."""

    key: str
    type: str
    default: Any
    domain: str
    declared: bool
    """Whether the field declares its domain."""
    implicit: bool
    """Whether its type is its domain (an enum or bool)."""


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def keys(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the schema ``cls`` (nested and composed sections included)."""
    out: list[KeyDoc] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, optional = _optional(hints[f.name])
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            out += keys(hint, key + ".")  # type: ignore[arg-type]
            continue
        dom = f.metadata.get(DOMAIN)
        is_enum = isinstance(hint, type) and issubclass(hint, enum.Enum)
        if dom is not None:
            text = dom.describe()
        elif is_enum:
            text = "one of " + " | ".join(str(m.value) for m in hint)
        elif hint is bool:
            text = "true | false"
        else:
            text = "(undeclared: any finite value of the type)"
        default = _default(f)
        default = default.value if isinstance(default, enum.Enum) else default
        out.append(KeyDoc(key, _type_name(hint) + (" | None" if optional else ""), default,
                          text + (", or null" if optional else ""), dom is not None,
                          is_enum or hint is bool))
    return out


def undeclared(cls: type) -> list[str]:
    """Keys of ``cls`` whose type is not its own domain (not an enum or bool) and that
    declare none: numbers, strings and lists must say which values they accept."""
    return [d.key for d in keys(cls) if not d.declared and not d.implicit]


def key_table(cls: type) -> str:
    """The schema's keys as a Markdown table: key, type, default, accepted values."""
    rows = ["| key | type | default | values |", "| --- | --- | --- | --- |"]
    for d in keys(cls):
        cells = [f"`{d.key}`", d.type, f"`{d.default!r}`", d.domain]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
