"""torchrun entry for tests: the real trainer, observed from outside.

Each rank records, after every optimizer step, a SHA-256 of its parameters and (via the
PyTorch profiler, independent of localsgd's own accounting) every gloo collective issued
inside that step's ``localsgd.step.N`` scope. Written to ``RUN_DIR/probe/rank{r}.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from localsgd.cli import train_main
from localsgd.recipe import load_config
from localsgd.sync.controller import SyncObserver


def _params_sha(target: object) -> str:
    flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in target.sync_params()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


class Probe(SyncObserver):
    """Records a hash of the parameters after every step and the parameters before a sync."""

    def __init__(self) -> None:
        self.hashes: list[dict[str, object]] = []
        self.syncs: list[dict[str, object]] = []
        self._before: list[float] = []

    def before_sync(self, step: int, action: str, target: object) -> None:
        self._before = torch.cat([p.detach().reshape(-1).double().cpu()
                                  for p in target.sync_params()]).tolist()

    def after_sync(self, step: int, action: str, distance: float, target: object) -> None:
        self.syncs.append({"step": step, "params_before": self._before, "distance": distance})

    def after_step(self, step: int, action: str | None, target: object) -> None:
        self.hashes.append({"step": step, "action": action or "none",
                            "sha": _params_sha(target)})


def _collectives_per_step(prof: profile) -> dict[int, dict[str, int]]:
    events = list(prof.events())
    scopes = [(int(e.name.rsplit(".", 1)[1]), e.time_range.start, e.time_range.end)
              for e in events if e.name.startswith("localsgd.step.")]
    out: dict[int, Counter[str]] = {step: Counter() for step, _, _ in scopes}
    outside: Counter[str] = Counter()
    for e in events:
        if not e.name.startswith("gloo:"):
            continue
        for step, start, end in scopes:
            if start <= e.time_range.start <= end:
                out[step][e.name] += 1
                break
        else:
            outside[e.name] += 1
    result = {step: dict(c) for step, c in out.items()}
    result[-1] = dict(outside)
    return result


def main() -> int:
    probe = Probe()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        code = train_main(sys.argv[1:], observers=[probe])
    cfg = load_config(sys.argv[1], sys.argv[2:])
    out = Path(cfg.run.dir) / "probe"
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"steps": probe.hashes, "syncs": probe.syncs, "collectives": _collectives_per_step(prof)}))
    return code


if __name__ == "__main__":
    sys.exit(main())
