"""Per-rank checkpoints in ``checkpoints/step-N/``, valid only once ``COMPLETE`` exists.

Each rank writes its own file (models differ between syncs) atomically, with a SHA-256 beside
it. Rank 0 writes the marker after a barrier. On load the ranks agree on the newest checkpoint
that every one of them can read and verify; a damaged one is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from localsgd.sync.accounting import CommMeter

MARKER = "COMPLETE"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-")]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]), reverse=True)


class Checkpointer:
    def __init__(self, run_dir: Path, rank: int, world_size: int, keep: int,
                 meter: CommMeter) -> None:
        self.meter = meter
        self.root = run_dir / "checkpoints"
        self.rank = rank
        self.world_size = world_size
        self.keep = keep
        self.loaded: Path | None = None
        """The checkpoint ``load_latest`` returned (named in refusals to resume from it)."""

    def save(self, step: int, state: dict[str, Any]) -> Path:
        folder = self.root / f"step-{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"rank{self.rank}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        (folder / f"rank{self.rank}.sha256").write_text(_sha256(path))
        with self.meter.timed("other", 0):
            dist.barrier()
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size}
            marker_tmp = folder / (MARKER + ".tmp")
            marker_tmp.write_text(json.dumps(meta))
            os.replace(marker_tmp, folder / MARKER)
            for old in [d for d in _step_dirs(self.root) if (d / MARKER).exists()][self.keep:]:
                shutil.rmtree(old, ignore_errors=True)
        return folder

    def _readable(self, folder: Path, rank: int) -> dict[str, Any] | None:
        path = folder / f"rank{rank}.pt"
        sha = folder / f"rank{rank}.sha256"
        try:
            if not (folder / MARKER).exists() or _sha256(path) != sha.read_text().strip():
                return None
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any unreadable file means "try an older one"
            return None

    def load_latest(self, device: torch.device) -> tuple[list[dict[str, Any]], int] | None:
        """(states, world size they were written with), or None; all ranks pick the same step.

        With the same world size a rank gets its own state; with another, every rank gets the
        states of all old ranks (the caller averages them), so a shared run directory is needed.
        """
        for folder in _step_dirs(self.root):
            if not (folder / MARKER).exists():
                continue
            old_world = int(json.loads((folder / MARKER).read_text())["world_size"])
            sources = [self.rank] if old_world == self.world_size else list(range(old_world))
            states = [self._readable(folder, r) for r in sources]
            ok = torch.tensor([1 if all(x is not None for x in states) else 0], device=device)
            with self.meter.timed("other", ok.numel() * ok.element_size()):
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if int(ok.item()) == 1:
                self.loaded = folder
                return [x for x in states if x is not None], old_world
            if self.rank == 0:
                warnings.warn(f"checkpoint {folder} is incomplete or corrupted on at least one "
                              "rank; falling back to the previous one", stacklevel=2)
        return None
