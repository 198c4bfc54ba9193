"""PyTorch's PowerSGD gradient hook inside the localsgd trainer: the peer of compressed SGD.

    torchrun ... benchmarks/powersgd_entry.py RECIPE.yaml --powersgd-rank=2 [key=value ...]

Everything is the trainer's (data, model, optimizer, LR schedule, evaluation, metrics files),
run as mini-batch SGD; only the gradient all-reduce of the DDP engine is replaced by
``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook`` (rank ``--powersgd-rank``,
error feedback and warm start on, plain all-reduce for the first 2 steps, PyTorch's
defaults otherwise), each bucket finished before the next starts. Bytes per bucket
(``comm/grad/bytes``) follow PowerSGD's own rules:
before ``start_powerSGD_iter`` the whole bucket; after, the tensors it leaves uncompressed
(1-D, or not worth it by ``min_compression_rate``) plus (rows + columns) x rank for each
compressed matrix, float32. The multi-node harness checks them against the veth counters.
"""

import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import localsgd.engines.ddp as ddp  # noqa: E402 - after the path is set
from localsgd.cli import train_main  # noqa: E402
from localsgd.sync.accounting import CommMeter  # noqa: E402

START = 2
"""PowerSGD's warm-up: plain all-reduces in the first steps (its minimum is 1)."""


class CountingPowerSGD(ps.PowerSGDState):
    def __init__(self, meter: CommMeter, rank: int) -> None:
        super().__init__(process_group=None, matrix_approximation_rank=rank,
                         start_powerSGD_iter=START)
        self.meter = meter


def payload_bytes(state: CountingPowerSGD, bucket: dist.GradBucket) -> int:
    """What this rank all-reduces for ``bucket`` under PowerSGD's rules, in bytes."""
    buf = bucket.buffer()
    if state.iter < state.start_powerSGD_iter:
        return buf.numel() * buf.element_size()
    elements = 0
    for grad in bucket.gradients():
        if grad.ndimension() <= 1:
            elements += grad.numel()
            continue
        rows = grad.shape[0]
        cols = grad.numel() // rows
        worth, full, small = ps._should_compress(
            rows, cols, state.matrix_approximation_rank, state.min_compression_rate)
        elements += small if worth else full
    return elements * buf.element_size()


def hook(state: CountingPowerSGD, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    nbytes = payload_bytes(state, bucket)
    start = time.perf_counter()
    # Wait here: PowerSGD issues its second all-reduce from a callback, and on gloo the
    # callbacks of two buckets may run in another order on each worker, which pairs up
    # mismatched collectives. Finishing each bucket in turn keeps the order fixed.
    result = ps.powerSGD_hook(state, bucket).wait()
    state.meter.record("grad", nbytes, time.perf_counter() - start)
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(result)
    return done


def main(argv: list[str]) -> int:
    rank = 1
    rest: list[str] = []
    for arg in argv:
        if arg.startswith("--powersgd-rank="):
            rank = int(arg.split("=", 1)[1])
        elif not arg.startswith("sync."):
            rest.append(arg)  # the peer is mini-batch SGD whatever the variant says
    made: list[Any] = []

    def state(meter: CommMeter, world_size: int) -> CountingPowerSGD:
        made.append(CountingPowerSGD(meter, rank))
        return made[-1]

    # The DDP engine registers its hook as hook(state(meter, world), bucket).
    ddp._HookState = state  # type: ignore[assignment,misc]
    ddp._counting_allreduce = hook  # type: ignore[assignment]
    return train_main([*rest, "sync.algorithm=minibatch"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
