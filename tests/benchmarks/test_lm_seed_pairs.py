"""lm_seed_pairs.py: the per-seed pairing and medians, on run folders written in the
trainer's summary.json / metrics.jsonl format with chosen numbers."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import lm_seed_pairs  # noqa: E402


def _run(root: Path, name: str, loss: float, nbytes: int, wall: float) -> None:
    d = root / name
    d.mkdir()
    summary = {"step": 256, "tokens": 2097152, "eval/loss": loss, "eval/bpb": loss / math.log(2),
               "comm/bytes": nbytes, "comm/grad/bytes": nbytes, "comm/average/bytes": 0,
               "time/wall_s": wall, "throughput/tokens_per_s": 2097152 / wall,
               "time/to_target_s": None}
    (d / "summary.json").write_text(json.dumps(summary))
    rows = [{"event": "step", "step": 20}, {"event": "eval", "step": 128, "eval/bpb": 3.0},
            {"event": "epoch", "step": 256, "eval/bpb": summary["eval/bpb"]}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pairs_by_seed_and_takes_medians(tmp_path: Path) -> None:
    rng = random.Random(3)
    drawn = {(k, s): (rng.uniform(1.8, 2.1), rng.randrange(10**6, 10**9), rng.uniform(100, 900))
             for k in ("minibatch", "diloco") for s in (0, 1, 2)}
    for (kind, seed), (loss, nbytes, wall) in drawn.items():
        if (kind, seed) != ("diloco", 2):  # seed 2 unpaired: counts in the median only
            _run(tmp_path, f"{kind}_seed{seed}", loss, nbytes, wall)
    (tmp_path / "diloco_seed2").mkdir()  # started, not finished: no summary.json
    runs = [r for d in sorted(tmp_path.iterdir()) if (r := lm_seed_pairs.run_record(d))]
    result = lm_seed_pairs.compare(runs, "minibatch")

    assert result["kinds"] == ["minibatch", "diloco"]
    mb_bpb = sorted(drawn[("minibatch", s)][0] / math.log(2) for s in (0, 1, 2))
    assert math.isclose(result["median"]["minibatch"]["bpb"], mb_bpb[1])
    assert result["median"]["diloco"]["runs"] == 2
    paired = result["paired"]
    assert paired["seeds"] == [0, 1]
    d_mib = [(drawn[("diloco", s)][1] - drawn[("minibatch", s)][1]) / 2**20 for s in (0, 1)]
    assert math.isclose(paired["median"]["mib_per_worker"], (d_mib[0] + d_mib[1]) / 2)
    d_wall = [drawn[("diloco", s)][2] - drawn[("minibatch", s)][2] for s in (0, 1)]
    assert all(math.isclose(a, b) for a, b in zip(paired["per_seed"]["wall_s"], d_wall,
                                                   strict=True))
    assert runs[0]["bpb_by_step"] == {128: 3.0, 256: runs[0]["bpb"]}
    text = lm_seed_pairs.markdown(runs, result)
    assert "diloco minus minibatch, seeds 0, 1" in text
