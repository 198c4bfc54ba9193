"""Engines carry out forward/backward/step and expose tensors to the sync controller."""

from localsgd.engines.base import Engine
from localsgd.engines.config import EngineConfig
from localsgd.engines.registry import EngineContext, build_engine, check_engine

__all__ = ["Engine", "EngineConfig", "EngineContext", "build_engine", "check_engine"]
