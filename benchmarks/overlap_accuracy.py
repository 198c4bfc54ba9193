"""Test accuracy of overlapped averaging against blocking, on real CIFAR-10, over seeds.

    python benchmarks/overlap_accuracy.py [--taus 0,1,4,8 --seeds 0,1,2]

Runs the quickstart recipe (ResNet-20, 10,000 training images, 2 workers on this machine's
loopback, post-local SGD with H=8 from epoch 2, 4 epochs) once per (tau, seed) with
``sync.overlap_steps=tau``; tau=0 is the blocking baseline. Accuracy does not depend on the
link, so no network emulation is needed (the speed side is ``multinode/bench_links.py``).
Writes ``results/overlap-accuracy-<stamp>.json`` and prints a Markdown table of final test
accuracy, mean +- std over seeds, next to the blocking runs.
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

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tau: int, seed: int, out: Path, data: Path) -> dict[str, float]:
    run_dir = out / f"tau{tau}-seed{seed}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           str(REPO / "torchrun_entry.py"), str(REPO / "recipes" / "quickstart.yaml"),
           f"seed={seed}", f"sync.overlap_steps={tau}", f"data.root={data}",
           "data.download=false", "data.num_workers=0", "train.progress=false",
           "run.resume=false", "run.checkpoint_every_epochs=0", f"run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"tau": tau, "seed": seed, "acc": summary["eval/acc"],
            "best_acc": summary["eval/best_acc"], "wall_s": summary["time/wall_s"],
            "average_calls": summary["comm/average/calls"],
            "average_wait_s": summary["comm/average/wait_s"],
            "average_s": summary["comm/average/seconds"]}


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| tau | runs | final acc (mean +- std) | best acc | average calls | wait s / "
             "transfer s |", "| --- | --- | --- | --- | --- | --- |"]
    for tau in sorted({r["tau"] for r in rows}):
        mine = [r for r in rows if r["tau"] == tau]
        acc = [r["acc"] for r in mine]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        best = statistics.mean(r["best_acc"] for r in mine)
        wait = statistics.mean(r["average_wait_s"] for r in mine)
        total = statistics.mean(r["average_s"] for r in mine)
        lines.append(f"| {tau} | {len(mine)} | {statistics.mean(acc):.4f} +- {std:.4f} | "
                     f"{best:.4f} | {mine[0]['average_calls']:.0f} | {wait:.2f} / {total:.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--taus", default="0,1,4,8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    if not (args.data / "cifar-10-batches-py").is_dir():
        ap.error(f"no CIFAR-10 under {args.data}; pass --data DIR (holding cifar-10-batches-py)")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = args.out / f"overlap-accuracy-{stamp}"
    rows = []
    # Interleaved: every tau once per seed before the next seed, so drift on a shared
    # machine does not line up with one setting.
    for seed in (int(s) for s in args.seeds.split(",")):
        for tau in (int(t) for t in args.taus.split(",")):
            rows.append(run(tau, seed, work, args.data))
            print(json.dumps(rows[-1]), flush=True)
    (args.out / f"overlap-accuracy-{stamp}.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
