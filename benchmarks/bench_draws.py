"""Host cost of the device pipeline's crop and flip draws per batch, old way and new.

    python benchmarks/bench_draws.py [--batch 128 --repeats 200]

``per-sample``: one ``torch.Generator`` seeded per sample, two ``randint`` and one ``rand``
(how ``data/device.py`` drew them before), with the Python ``mix_seed`` per sample.
``vectorised``: ``mix_seeds`` and ``crop_flip_draws`` over one batch's indices, and over a
chunk of ``CHUNK_BATCHES`` batches (what the loader does), per batch. All give the same
draws; the script checks that before timing. Prints milliseconds per batch (median of
``--rounds`` rounds) and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from localsgd.data.device import CHUNK_BATCHES, crop_flip_draws
from localsgd.data.loaders import mix_seed, mix_seeds

REPO = Path(__file__).resolve().parents[1]


def per_sample(indices: np.ndarray) -> torch.Tensor:
    out = torch.empty(len(indices), 3, dtype=torch.long)
    gen = torch.Generator()
    for k, index in enumerate(indices.tolist()):
        gen.manual_seed(mix_seed(0, 1, index))
        out[k, :2] = torch.randint(0, 9, (2,), generator=gen)
        out[k, 2] = int(torch.rand(1, generator=gen) < 0.5)
    return out


def vectorised(indices: np.ndarray) -> torch.Tensor:
    return crop_flip_draws(mix_seeds(0, 1, indices))


def ms_per_batch(fn: Callable[[np.ndarray], torch.Tensor], indices: np.ndarray,
                 batches: int, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn(indices)
    return (time.perf_counter() - start) / repeats / batches * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                    "draws_cpu.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    chunk = rng.permutation(50_000)[:CHUNK_BATCHES * args.batch]
    one = chunk[:args.batch]
    assert torch.equal(per_sample(chunk), vectorised(chunk)), "the draws differ"
    cases = {"per-sample": (per_sample, one, 1),
             "vectorised, one batch": (vectorised, one, 1),
             f"vectorised, chunk of {CHUNK_BATCHES} batches": (vectorised, chunk,
                                                              CHUNK_BATCHES)}
    rounds: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):  # interleaved: the machine's load drifts
        for name, (fn, idx, batches) in cases.items():
            rounds[name].append(ms_per_batch(fn, idx, batches, args.repeats))
    median = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"| draws for a batch of {args.batch} | ms per batch (median) |\n|---|---:|")
    for name, value in median.items():
        print(f"| {name} | {value:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": sys.argv, "batch": args.batch,
                                    "date": time.strftime("%Y-%m-%d %H:%M"),
                                    "rounds": rounds, "median_ms": median}, indent=1))


if __name__ == "__main__":
    main()
