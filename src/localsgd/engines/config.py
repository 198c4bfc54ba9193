"""The ``engine`` section of a recipe: ``name`` plus every registered engine's keys.

Composed when first imported, after every engine file has been imported through the
registry; the engine files themselves only import ``localsgd.engines.registry``.
"""

from __future__ import annotations

from localsgd.engines.registry import ENGINES, EngineCommon
from localsgd.registry import compose

EngineConfig = compose("EngineConfig", EngineCommon, [ENGINES])
"""The ``engine`` section: ``name`` plus every registered engine's keys."""
