"""Recipe machinery: the general sections, YAML + override loading, general rules, errors.

The whole recipe (with its ``sync`` and ``engine`` sections composed from registered parts)
is assembled and loaded by ``localsgd.recipe``.
"""

from localsgd.config.errors import ConfigError, ConfigWarning

__all__ = ["ConfigError", "ConfigWarning"]
