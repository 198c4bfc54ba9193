"""torchrun worker: several recipes trained one after another in one launch (4 workers as 2
emulated nodes of 2), each summarised as per-tensor float64 checksums of the final model,
every sync event with its consensus distance, and the communication totals.

Run by tests/integration/test_reference_runs.py, which compares the summary with
``tests/golden/sync_reference.json``. To record a new reference after a deliberate change
of behaviour: ``torchrun --nproc-per-node=4 tests/integration/golden_worker.py OUT_DIR`` and
copy ``OUT_DIR/golden.json`` there (say why in the commit).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

os.environ["LOCAL_WORLD_SIZE"] = "2"  # before the launcher's view is read: 2 nodes of 2

from localsgd.launch.env import init_distributed, shutdown  # noqa: E402
from localsgd.recipe import load_config  # noqa: E402
from localsgd.report.files import read_metrics  # noqa: E402
from localsgd.train.trainer import Trainer  # noqa: E402

COMMON = ["model.dtype=float64", "train.max_steps=17", "train.epochs=3",
          "data.synthetic_samples=512", "sync.bucket_mb=0.01", "train.log_every_steps=1000"]
COMBOS = {
    "minibatch": [],
    "local_h4": ["sync.algorithm=local", "sync.period=4"],
    "post_local": ["sync.algorithm=post_local", "sync.switch_step=5", "sync.period=3"],
    "hierarchical": ["sync.algorithm=hierarchical", "sync.period=2", "sync.block_period=3"],
    "local_momentum_average": ["sync.algorithm=local", "sync.period=4", "sync.momentum=average"],
    "local_momentum_reset": ["sync.algorithm=local", "sync.period=4", "sync.momentum=reset"],
    "local_resnet_buffers": ["sync.algorithm=local", "sync.period=3", "model.name=resnet20",
                             "train.max_steps=7", "data.synthetic_samples=256"],
}


def summarise(run: Path, summary: dict) -> dict:
    model = torch.load(run / "model.pt", weights_only=True)
    sums = {k: [float(v.double().sum()), float(v.double().abs().sum()),
                float(v.double().pow(2).sum())] for k, v in model.items()
            if v.is_floating_point()}
    records = read_metrics(run)
    syncs = [[r["step"], r["sync/action"], r["sync/consensus_distance"]] for r in records
             if r.get("event") == "sync"]
    comm = {k: v for k, v in summary.items()
            if k.startswith("comm/") and not k.endswith(("seconds", "wait_s"))}
    return {"tensors": sums, "syncs": syncs, "comm": comm, "eval/loss": summary["eval/loss"]}


def main() -> int:
    out = Path(sys.argv[1])
    names = sys.argv[2:] or list(COMBOS)
    results = {}
    info = None
    for name in names:
        cfg = load_config("recipes/tests/tiny_synthetic.yaml",
                          [*COMMON, *COMBOS[name], f"run.dir={out}/{name}", "run.resume=false"])
        info = info or init_distributed(cfg.dist)
        trainer = Trainer(cfg, info)
        trainer.setup()
        summary = trainer.train()
        trainer.close()
        dist.barrier()  # rank 0 wrote model.pt
        if info.rank == 0:
            results[name] = {"overrides": [*COMMON, *COMBOS[name]],
                             **summarise(out / name, summary)}
    if info is not None and info.rank == 0:
        (out / "golden.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
