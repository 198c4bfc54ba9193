"""The ``sync`` section of a recipe: the common keys plus every registered part's keys.

Composed when first imported, after every part file has been imported through the
registries; the part files themselves only import ``localsgd.sync.parts``.
"""

from __future__ import annotations

from typing import Any

from localsgd.registry import Facts, compose
from localsgd.sync.parts import SECTION, SyncCommon
from localsgd.sync.reducers.compressed import compression_warnings

SyncConfig = compose("SyncConfig", SyncCommon, SECTION.selectors.values())
"""The ``sync`` section: the common keys of ``SyncCommon`` plus every registered part's."""


def check_sync(cfg: Any, facts: Facts) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the ``sync`` section."""
    problems, warnings = SECTION.check(cfg, facts)
    return problems, warnings + compression_warnings(cfg.compression)
