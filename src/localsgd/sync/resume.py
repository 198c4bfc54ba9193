"""Whether a checkpoint's sync state fits the recipe's parts, decided before any step.

Every checkpoint records which parts wrote its sync state (the part name of each kind) and
the value of every key those parts and the common ``sync`` keys read (``record``), and
whether the workers held one model when it was written. On resume each part of the recipe
looks at its kind's state in the checkpoint (``Part.resume_problem``): it either continues
from it, rebuilds what is missing from the checkpoint's model, which it may only where every
worker holds that model (a sync boundary, the mini-batch phase), or says why it cannot. A
part that cannot is refused with one line naming the changed keys, their old and new
values, and both ways out.

Whether the workers agree at the checkpoint's step is a fact of the checkpoint, not of the
recipe: a resume with another period, schedule or topology takes it from the checkpoint for
that step (``ResumeCheck.consensus``), so models that differ are never taken as one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from localsgd.config.errors import ConfigError
from localsgd.sync.parts import PART_KINDS, SECTION

Changed = dict[str, tuple[Any, Any]]
"""Full key -> (value in the checkpoint, value in the recipe)."""


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def _flat(prefix: str, obj: Any, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(obj, name, None)
        key = f"{prefix}.{name}"
        if dataclasses.is_dataclass(value):
            out |= _flat(key, value, [f.name for f in dataclasses.fields(value)])
        else:
            out[key] = _plain(value)
    return out


def _own(cfg: Any, kind: str, name: str | None) -> list[str]:
    key, registry = PART_KINDS[kind]
    part = registry.find(name or SECTION.name_of(cfg, key))
    return [f.name for f in dataclasses.fields(part.Config)] if part is not None else []


def part_keys(cfg: Any, kind: str, name: str | None = None) -> list[str]:
    """The full keys (``sync.compression.method``) that part ``name`` of ``kind`` (default:
    the recipe's) reads, and the key that chooses it."""
    return [f"sync.{PART_KINDS[kind][0]}", *_flat("sync", cfg, _own(cfg, kind, name))]


def record(cfg: Any) -> dict[str, Any]:
    """What a checkpoint keeps about the sync that wrote it: each kind's part name and the
    value of every ``sync`` key (those the chosen parts read define their state; the others
    choose parts, so a change of any of them is named precisely)."""
    parts = {kind: SECTION.name_of(cfg, key) for kind, (key, _) in PART_KINDS.items()}
    return {"parts": parts,
            "keys": _flat("sync", cfg, [f.name for f in dataclasses.fields(cfg)])}


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@dataclass
class ResumeCheck:
    """What a part learns about the checkpoint it is asked to continue from."""

    step: int
    """Steps completed when it was written (the resumed run's next step index)."""
    consensus: bool
    """Whether every worker held the same model then (written at a sync boundary or in the
    mini-batch phase)."""
    changed: Changed
    """Keys whose value differs between the checkpoint and the recipe; empty for a
    checkpoint that recorded none."""
    schedule: Any
    """The recipe's schedule (when its syncs fall)."""
    parts: dict[str, str]
    """Kind -> name of the part that wrote the checkpoint ({} when not recorded)."""


def changed_keys(saved: dict[str, Any] | None, now: dict[str, Any]) -> Changed:
    if not saved:
        return {}
    old, new = saved.get("keys", {}), now["keys"]
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}


def refusal(cfg: Any, kind: str, written_by: str | None, check: ResumeCheck,
            where: Path | str | None, reason: str) -> str:
    """One line: the changed keys of this kind's part (old and new), why the part cannot
    continue, and the two ways out."""
    source = "the checkpoint" if where is None else f"the checkpoint in {where}"
    selector = f"sync.{PART_KINDS[kind][0]}"
    if selector in check.changed:
        # Another part was chosen: the keys only one of the two reads are no change of it.
        keys = [selector, *(k for k in check.changed if k != selector and k in reason)]
    else:
        read = set(part_keys(cfg, kind)) | (
            set(part_keys(cfg, kind, written_by)) if written_by else set())
        keys = [k for k in check.changed if k in read or k in reason] or list(check.changed)
    if not keys:
        return (f"{selector}: {source} cannot be continued: "
                f"{reason}. Start fresh with run.resume=false (or another run.dir)")
    shown = {k: (_shown(a), _shown(b)) for k, (a, b) in check.changed.items()}
    if selector in shown:
        # ``auto`` and the like: say which part each value chose.
        names = (written_by, SECTION.name_of(cfg, PART_KINDS[kind][0]))
        shown[selector] = tuple(f"{v} ({n})" if n and n != v else v  # type: ignore[assignment]
                                for v, n in zip(shown[selector], names, strict=True))
    old = ", ".join(shown[k][0] for k in keys)
    new = ", ".join(shown[k][1] for k in keys)
    back = " ".join(f"{k}={_shown(check.changed[k][0])}" for k in keys)
    return (f"{', '.join(keys)}: {source} was written with {old}, the recipe "
            f"says {new}; {reason}. Resume with {back}, or start fresh with run.resume=false "
            "(or another run.dir)")


def check_parts(cfg: Any, parts: dict[str, Any], states: dict[str, dict[str, Any]],
                check: ResumeCheck, where: Path | str | None) -> None:
    """Raise one ConfigError with a line per part that cannot continue from ``states``."""
    problems = []
    for kind, part in parts.items():
        reason = part.resume_problem(states.get(kind, {}), check)
        if reason is not None:
            problems.append(refusal(cfg, kind, check.parts.get(kind), check, where, reason))
    if problems:
        raise ConfigError(problems)
