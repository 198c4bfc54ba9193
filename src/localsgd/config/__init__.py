"""Recipe schema, loading and validation."""

from localsgd.config.errors import ConfigError
from localsgd.config.load import load_config, to_yaml
from localsgd.config.schema import RecipeConfig
from localsgd.config.validate import validate_launch

__all__ = ["ConfigError", "RecipeConfig", "load_config", "to_yaml", "validate_launch"]
