"""The SparseLoCo recipe's bytes per average, by the engine's count, on ResNet-20's real
tensors: thread workers hold a real ResNet-20 (parameters and BatchNorm statistics), run the
recipe's ``sync`` section (its thread-tier topology and reducer aside) and count what the
controller's meter records; the expectation is computed here from the tensor sizes with the
closed-form formula of docs/compression.md, and the bound is 1/100 of the fp32 bytes of
every tensor an exact average moves (parameters and BatchNorm statistics)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from threads import run_workers

from localsgd.models import build_model
from localsgd.recipe import load_config

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes/cifar10/resnet20_sparseloco.yaml"
torch.manual_seed(0)  # once, here: threads building models would race on the global RNG
MODEL = build_model(load_config(RECIPE).model, num_classes=10)


class ResNetTarget:
    """ResNet-20's parameters and buffers, drifting per rank as training would move them."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.params = [p.detach().clone() for p in MODEL.parameters()]
        self.buffers = [b.detach().clone() for b in MODEL.buffers()]
        self.momentum: list[torch.Tensor] = []

    def local_step(self, step: int) -> None:
        g = torch.Generator().manual_seed(1000 * self.rank + step)
        for p in self.params:
            p.add_(torch.randn(p.shape, generator=g), alpha=1e-3)
        for b in self.buffers:
            if b.is_floating_point():  # a running statistic: an EMA of batch statistics
                b.mul_(0.9).add_(torch.rand(b.shape, generator=g), alpha=0.1)
            else:
                b.add_(1)

    def sync_params(self) -> list[torch.Tensor]:
        return self.params

    def sync_buffers(self) -> list[torch.Tensor]:
        return self.buffers

    def momentum_buffers(self) -> list[torch.Tensor]:
        return self.momentum

    def after_params_changed(self) -> None:
        pass

    def tensors(self) -> list[torch.Tensor]:
        return [*self.params, *self.buffers]

    def whole(self) -> torch.Tensor:
        return torch.cat([t.reshape(-1).double() for t in self.tensors()])

    def flat(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params])


def sync_bytes(numels: list[int], chunk: int, ratio: float, bits: int) -> int:
    """One bucket holding every parameter: per chunk of each tensor keep ceil(ratio L),
    12-bit places and 2-bit codes packed over the bucket, 2^bits float32 per tensor."""
    k = 0
    for n in numels:
        for start in range(0, n, chunk):
            length = min(chunk, n - start)
            k += min(length, max(1, math.ceil(ratio * length * (1 - 1e-12))))
    index_bits = math.ceil(math.log2(chunk))
    return 4 * len(numels) * 2**bits + 4 * math.ceil(k * bits / 32) + 4 * math.ceil(
        k * index_bits / 32)


def test_sparseloco_sends_under_a_hundredth_of_fp32_bytes_per_average() -> None:
    recipe = load_config(RECIPE)
    keys = recipe.sync.compression
    # A shorter period than the recipe's: the bytes of a sync do not depend on it.
    period, syncs = 2, 4
    cfg = dataclasses.replace(recipe.sync, topology="threads", reducer="threads_compressed",
                              period=period)
    workers, _ = run_workers(cfg, steps=syncs * period, world=2, finish=True,
                             target=ResNetTarget)
    target = ResNetTarget(0)
    params = [p.numel() for p in target.params]
    stats = [b.numel() for b in target.buffers if b.is_floating_point()]
    fp32 = 4 * (sum(params) + sum(stats))
    assert sum(params) == 269_722 and sum(stats) == 1376  # ResNet-20: 16-32-64, 3 blocks
    per_sync = sync_bytes(params, keys.chunk, keys.ratio, keys.bits)
    for w in workers:
        average = w.meter.totals["average"]
        # The syncs' compressed pseudo-gradients, then the closing exact average of the
        # BatchNorm statistics (the only time they travel outside evaluation).
        assert average.bytes == syncs * per_sync + 4 * sum(stats)
        assert average.calls == syncs + 1
        assert w.meter.totals["eval"].bytes == 0
    ratio = fp32 / per_sync
    amortized = syncs * fp32 / (syncs * per_sync + 4 * sum(stats))
    print(f"per sync {per_sync} B of {fp32} B fp32: 1/{ratio:.1f}; with the closing "
          f"statistics over {syncs} syncs 1/{amortized:.1f}")
    assert ratio >= 100 and amortized >= 100
    # The models agree after every sync, on a model that moved; between syncs they differ.
    for t in range(period - 1, syncs * period, period):
        assert torch.equal(workers[0].after[t], workers[1].after[t])
        assert not torch.equal(workers[0].after[t - 1], workers[1].after[t - 1])
    assert not torch.equal(workers[0].after[-1], ResNetTarget(0).flat())


def test_statistics_kept_local_average_to_what_averaging_at_syncs_gives() -> None:
    """Running statistics move by a linear rule, so their average over workers is the same
    whether they were averaged at each sync or not; parameters never read them."""
    recipe = load_config(RECIPE)
    kept = dataclasses.replace(recipe.sync, topology="threads", reducer="threads_compressed",
                               period=2)
    averaged = dataclasses.replace(kept, average_buffers=True)
    steps = 5
    runs = [run_workers(c, steps=steps, world=2, target=ResNetTarget)[0]
            for c in (kept, averaged)]
    for a, b in zip(*runs, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.after, b.after, strict=True))
    n = sum(p.numel() for p in ResNetTarget(0).params)
    for t in range(steps):
        means = [torch.stack([w.whole_after[t][n:] for w in run]).mean(0) for run in runs]
        # float32 statistics: the two orders of rounding agree to a few ulps.
        torch.testing.assert_close(means[0], means[1], rtol=1e-6, atol=1e-7)
    # ...and they really were averaged in one run and not in the other.
    stats = [torch.stack([w.whole_after[1][n:] for w in run]) for run in runs]
    assert not torch.equal(stats[0][0], stats[0][1]) and torch.equal(stats[1][0], stats[1][1])
    local = runs[0][0].meter.totals["average"].bytes
    assert runs[1][0].meter.totals["average"].bytes >= local + 2 * 4 * 1376


def test_streaming_diloco_recipe_runs_its_fragments_in_four_bits() -> None:
    """The streaming recipe's sync section (4 fragments, overlap 2, 4-bit values) on
    ResNet-20: every fragment lands, and a sync sends the 4-bit codes, a 16-float codebook
    per tensor (fragments hold whole tensors) and the exact statistics."""
    recipe = load_config(REPO / "recipes/cifar10/resnet20_streaming_diloco.yaml")
    assert (recipe.sync.fragments, recipe.sync.overlap_steps) == (4, 2)
    cfg = dataclasses.replace(recipe.sync, topology="threads", reducer="threads_compressed",
                              period=8)  # fragments every 2 steps, each landing 2 later
    # Fragments start at steps 8, 10, 12 and 14 (bytes count at the start), land 2 later.
    workers, _ = run_workers(cfg, steps=15, world=2, target=ResNetTarget)
    target = ResNetTarget(0)
    n, tensors = sum(p.numel() for p in target.params), len(target.params)
    stats = sum(b.numel() for b in target.buffers if b.is_floating_point())
    per_sync = workers[0].meter.totals["average"].bytes
    codes = 4 * math.ceil(n * 4 / 32)
    assert per_sync == codes + 4 * 16 * tensors + 4 * stats
    assert per_sync * 7 <= 4 * (n + stats)
    assert workers[0].meter.totals["average"].calls == 5  # 4 fragments, the statistics once
    w = workers[0]
    for t in (9, 11, 13):  # a fragment lands after steps 10, 12, 14: the model jumps
        assert not torch.equal(w.after[t], w.before[t])
    for t in (8, 10, 12):  # and between landings only local steps move it
        assert torch.equal(w.after[t], w.before[t])
