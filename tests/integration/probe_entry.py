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
from localsgd.config import load_config
from localsgd.sync.controller import SyncController

_hashes: list[dict[str, object]] = []
_syncs: list[dict[str, object]] = []
_original_after_step = SyncController.after_step
_original_average = SyncController._average


def _params_sha(target: object) -> str:
    flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in target.sync_params()])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def _recording_average(self: SyncController, target: object, *args: object,
                       **kwargs: object) -> float:
    before = torch.cat([p.detach().reshape(-1).double().cpu() for p in target.sync_params()])
    distance = _original_average(self, target, *args, **kwargs)
    _syncs.append({"step": self.step, "params_before": before.tolist(), "distance": distance})
    return distance


def _recording_after_step(self: SyncController, target: object) -> object:
    action = _original_after_step(self, target)
    _hashes.append({"step": self.step, "action": action.value,
                    "sha": _params_sha(target)})
    return action


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
    SyncController.after_step = _recording_after_step  # type: ignore[method-assign]
    SyncController._average = _recording_average  # type: ignore[method-assign]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        code = train_main(sys.argv[1:])
    cfg = load_config(sys.argv[1], sys.argv[2:])
    out = Path(cfg.run.dir) / "probe"
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"steps": _hashes, "syncs": _syncs, "collectives": _collectives_per_step(prof)}))
    return code


if __name__ == "__main__":
    sys.exit(main())
