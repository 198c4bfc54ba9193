"""What the memory benchmarks share: a free local port for torchrun, the JSON line a worker
prints, and the result file with the machine it was measured on."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_json(script: str, nproc: int, args: list[str], env: dict[str, str]) -> Any:
    """Run ``script`` under torchrun on ``nproc`` local ranks (gloo) and return the JSON value
    of the first stdout line that is a JSON object or list (rank 0's report)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln[:1] in "[{"))


def write_result(out: str | Path, result: dict[str, Any]) -> None:
    """``result`` with the command and the machine, as JSON at ``out``."""
    result = {"command": " ".join(sys.argv), **result,
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "torch": torch.__version__,
                          "date": time.strftime("%Y-%m-%d")}}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
