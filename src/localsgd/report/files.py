"""Local records: metrics.jsonl (every event) and summary.json (final values)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


class JsonlReporter:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        # Append: a resumed run continues the same record.
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")

    def summary(self, values: dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "summary.json", values)

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
