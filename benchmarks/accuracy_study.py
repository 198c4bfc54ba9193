"""Final test accuracy of sync variants on real CIFAR-10, over seeds and worker counts.

    python benchmarks/accuracy_study.py --preset outer [--workers 2,4 --seeds 0,1,2]
    python benchmarks/accuracy_study.py --preset overlap

Runs the quickstart recipe (ResNet-20, 10,000 training images, 4 epochs, LR decay before the
last; post-local variants switch at epoch 2) once per (workers, seed, variant) on this
machine's loopback; the variants are the preset's override lists in ``variants.py``.
Accuracy does not depend on the link, so no network emulation is needed (time over a slow
link is ``multinode/tta_cifar.py``). Runs are interleaved (every variant once per seed) so
drift on a shared machine does not line up with one variant. Writes
``results/<preset>-accuracy-<stamp>.json`` and prints a Markdown table: final and best test
accuracy (mean +- std over seeds), bytes sent per worker, model averages and wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from variants import PRESETS

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, overrides: list[str], workers: int, seed: int, out: Path,
        data: Path) -> dict[str, Any]:
    run_dir = out / f"{name}-k{workers}-seed{seed}"
    # A variant may name another worker script (PyTorch's PowerSGD peer) as "entry=PATH".
    entry = next((o.split("=", 1)[1] for o in overrides if o.startswith("entry=")),
                 "torchrun_entry.py")
    overrides = [o for o in overrides if not o.startswith("entry=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={workers}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           str(REPO / entry), str(REPO / "recipes" / "quickstart.yaml"),
           f"seed={seed}", *overrides, f"data.root={data}", "data.download=false",
           "data.num_workers=0", "train.progress=false", "run.resume=false",
           "run.checkpoint_every_epochs=0", f"run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers)),
           "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": name, "workers": workers, "seed": seed, "ok": False,
                "error": proc.stderr[-2000:]}
    s = json.loads((run_dir / "summary.json").read_text())
    return {"variant": name, "workers": workers, "seed": seed, "ok": True,
            "acc": s["eval/acc"], "best_acc": s["eval/best_acc"], "wall_s": s["time/wall_s"],
            "bytes": s["comm/bytes"], "average_calls": s.get("comm/average/calls", 0),
            "grad_bytes": s.get("comm/grad/bytes", 0),
            "average_bytes": s.get("comm/average/bytes", 0),
            "average_wait_s": s.get("comm/average/wait_s", 0.0),
            "average_s": s.get("comm/average/seconds", 0.0)}


def _mean_std(xs: list[float]) -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} +- {std:.4f}"


def table(rows: list[dict[str, Any]], names: list[str]) -> str:
    lines = ["| workers | variant | runs | final acc | best acc | MiB sent / worker | "
             "model averages | wall s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in sorted({r["workers"] for r in rows}):
        for name in names:
            mine = [r for r in rows if r["workers"] == k and r["variant"] == name and r["ok"]]
            failed = sum(1 for r in rows if r["workers"] == k and r["variant"] == name
                         and not r["ok"])
            if not mine:
                lines.append(f"| {k} | {name} | 0 ({failed} failed) | | | | | |")
                continue
            runs = f"{len(mine)}" + (f" ({failed} failed)" if failed else "")
            lines.append(
                f"| {k} | {name} | {runs} | {_mean_std([r['acc'] for r in mine])} | "
                f"{_mean_std([r['best_acc'] for r in mine])} | "
                f"{statistics.mean(r['bytes'] for r in mine) / 2**20:.1f} | "
                f"{mine[0]['average_calls']:.0f} | "
                f"{statistics.mean(r['wall_s'] for r in mine):.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="outer")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the preset")
    ap.add_argument("--workers", default="2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    if not (args.data / "cifar-10-batches-py").is_dir():
        ap.error(f"no CIFAR-10 under {args.data}; pass --data DIR (holding cifar-10-batches-py)")
    preset = PRESETS[args.preset]
    names = args.variants.split(",") if args.variants else list(preset)
    unknown = [n for n in names if n not in preset]
    if unknown:
        ap.error(f"--variants: {unknown} not in preset {args.preset}: {list(preset)}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = args.out / f"{args.preset}-accuracy-{stamp}"
    rows: list[dict[str, Any]] = []
    path = args.out / f"{args.preset}-accuracy-{stamp}.json"
    for workers in (int(k) for k in args.workers.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:
                rows.append(run(name, preset[name], workers, seed, work, args.data))
                print(json.dumps(rows[-1]), flush=True)
                path.write_text(json.dumps(rows, indent=1))  # partial results survive a stop
    print(table(rows, names))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
