"""A study's run folders: exactly one per point, and proof of which point a folder holds.

A point's folder is named after its label (``Point.slug``), and the mapping is lossy
(``"a b"`` and ``a_b`` both become ``a_b``); two points sharing a folder would resume,
skip or report each other's runs. So the labels are checked to map one-to-one before any
point starts, and every folder records the point it was started for (``point.json``,
written before the launch) so that a folder holding another run is never taken for this
point's result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localsgd.study.spec import Point

POINT_FILE = "point.json"
"""The point a run folder was started for: its label, base recipe and overrides."""
MAX_NAME_BYTES = 128
"""Longest run folder name: the folder name is also the point's W&B run name, which W&B
limits to 128 characters (file systems allow 255 bytes)."""


def folder_problems(points: list[Point]) -> list[str]:
    """One line per label whose folder is not a plain name or is shared with another label.

    Names differing only in case clash too: the study may be run (or copied) on a
    case-insensitive file system, where they are one folder.
    """
    n = len(points)
    out: list[str] = []
    taken: dict[str, Point] = {}
    for p in points:
        slug = p.slug
        if not slug.strip("."):
            out.append(f"point {p.index}/{n} ({p.label!r}): its run folder name would be "
                       f"{slug!r}, which is not a folder of its own; rename the variant")
            continue
        if len(slug.encode()) > MAX_NAME_BYTES:
            out.append(f"point {p.index}/{n} ({p.label[:40]}...): its run folder name is "
                       f"{len(slug.encode())} bytes, over the {MAX_NAME_BYTES} a run folder "
                       "and W&B run name may have; shorten the variant name or move keys into "
                       "overrides")
            continue
        first = taken.setdefault(slug.casefold(), p)
        if first is not p:
            same = "" if first.slug == slug else " (names differing only in case are one " \
                                                 "folder on case-insensitive file systems)"
            out.append(f"points {first.index}/{n} ({first.label}) and {p.index}/{n} "
                       f"({p.label}) would share the run folder '{slug}'{same}; give the "
                       "variants names that differ in more than spaces, '/', punctuation "
                       "and case")
    return out


def read_point(run_dir: Path) -> dict[str, Any] | None:
    """What ``point.json`` in ``run_dir`` says (None when absent or unreadable)."""
    try:
        value = json.loads((run_dir / POINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_point(run_dir: Path, expected: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{POINT_FILE}.tmp"
    tmp.write_text(json.dumps(expected, indent=1))
    tmp.replace(run_dir / POINT_FILE)


def _shown(record: dict[str, Any]) -> str:
    return f"{record.get('label')!r} [{' '.join(map(str, record.get('overrides') or []))}]"


def mismatch(run_dir: Path, expected: dict[str, Any]) -> str | None:
    """Why ``run_dir`` does not hold the run of the point ``expected`` describes, or None.

    ``expected`` holds the point's ``label``, ``recipe`` and ``overrides`` (all of them, as
    passed to ``localsgd run``). A folder without ``point.json`` holds nobody's run as far
    as this can tell: the caller decides (a legacy run's config.yaml can still be compared).
    """
    found = read_point(run_dir)
    if found is None:
        return None
    keys = ("label", "recipe", "overrides")
    if all(found.get(k) == expected.get(k) for k in keys):
        return None
    return (f"run folder {run_dir} holds the run of point {_shown(found)}, not of "
            f"{_shown(expected)}; move or delete the folder, or give this point another "
            "label")
