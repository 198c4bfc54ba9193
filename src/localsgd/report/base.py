"""One small interface for every metrics sink; rank 0 owns the sinks."""

from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    def log(self, record: dict[str, Any]) -> None:
        """One event: a flat dict of namespaced keys (train/loss, eval/acc, comm/bytes, ...)."""
        ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Reporters:
    """Fans records out to several sinks."""

    def __init__(self, sinks: list[Reporter]) -> None:
        self.sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        for s in self.sinks:
            s.log(record)

    def summary(self, values: dict[str, Any]) -> None:
        for s in self.sinks:
            s.summary(values)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
