"""torchrun worker: G replica groups x S ranks, sharded (fsdp) and unsharded (ddp), against
a single-process simulation of G workers each stepping on its group's whole mini-batch.

``sharded_equivalence_worker.py S STEPS [ENGINES]``. For each algorithm (local, post-local,
outer DiLoCo-style) every rank trains through localsgd's engines and SyncController, with
``sync.replica_group=S``, once per engine of the comma-separated ENGINES (default
``fsdp,ddp``; ``zero1`` and ``zero2`` are DeepSpeed with that ZeRO stage, which runs local
and outer only).
Rank r reads rows r*B:(r+1)*B of each global batch, so group g's mini-batch is the union of
rows of its S ranks. Independently, every rank simulates the algorithm with plain torch: G
models, group g's gradient is that of the mean loss over its union batch, syncs average
the G models (and for outer, an outer Nesterov SGD on the averaged pseudo-gradient). The
gathered models must match the simulation in float64 to round-off (DeepSpeed's float32
masters: to float32 round-off).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from helpers import NoTimer
from torch import nn

from localsgd.config.schema import DistConfig, ModelConfig, ModelName
from localsgd.engines import EngineContext, build_engine
from localsgd.launch.env import init_distributed
from localsgd.launch.replicas import build_replicas
from localsgd.models import build_model
from localsgd.recipe import facts, load_config
from localsgd.sync.accounting import CommMeter
from localsgd.sync.controller import SyncController
from localsgd.sync.reducers.compressed import build_codec, uses_feedback
from localsgd.train.optim import build_optimizer

BATCH = 4
LR = 0.05
CASES: dict[str, list[str]] = {
    "local": ["sync.algorithm=local", "sync.period=2"],
    "post_local": ["sync.algorithm=post_local", "sync.switch_step=3", "sync.period=2"],
    "outer": ["sync.algorithm=local", "sync.period=3", "sync.update=outer",
              "sync.outer.lr=0.7", "sync.outer.momentum=0.9", "sync.outer.nesterov=true",
              "sync.outer.scale_by_inner_lr=false"],
    "overlap": ["sync.algorithm=local", "sync.period=2", "sync.overlap_steps=1"],
    "bf16_outer": ["sync.algorithm=local", "sync.period=3", "sync.update=outer",
                   "sync.outer.lr=0.7", "sync.outer.momentum=0.9", "sync.outer.nesterov=true",
                   "sync.outer.scale_by_inner_lr=false", "sync.compression.method=bf16"],
    "ef_sign": ["sync.algorithm=local", "sync.period=2", "sync.compression.method=ef_sign"],
    "chunk_topk_4bit": ["sync.algorithm=local", "sync.period=2",
                        "sync.compression.method=chunk_topk", "sync.compression.ratio=0.25",
                        "sync.compression.chunk=64", "sync.compression.bits=4",
                        "sync.compression.error_feedback=true"],
}
GOSSIP_CASES = {
    "ring": ["sync.algorithm=local", "sync.period=2", "sync.topology=ring"],
    "choco": ["sync.algorithm=local", "sync.period=2", "sync.topology=ring",
              "sync.reducer=choco"],
}
"""Graph gossip between groups (CHOCO with no codec and gamma = 1 is the ring's mix)."""
CASES |= GOSSIP_CASES
CASES["hierarchical"] = ["sync.algorithm=hierarchical", "sync.period=2",
                         "sync.block_period=2"]
ELEMENTWISE = {"bf16_outer"}
"""Cases whose codec works element by element: per shard or per tensor is the same, so a
sharded run must equal the unsharded one (ddp groups) too."""
PER_SHARD = {"ef_sign", "chunk_topk_4bit"}
"""Cases whose codec keeps statistics per tensor (sign's scale, top-k per chunk, the 4-bit
codebook): compressed per shard, which must differ from compressing whole tensors."""
DEEPSPEED_CASES = ("local", "outer", "overlap")
"""Mini-batch steps across groups are not built for DeepSpeed; its flat fp32 partitions
are no tensors' shards, so the compressed cases have no simulation to meet."""
OPTIM = ["optim.base_lr=0.05", "optim.momentum=0.9", "optim.nesterov=true",
         "optim.weight_decay=0.0005", "optim.no_decay_bn_bias=false"]


def new_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=ModelName.simplecnn), 10, 8).double()


def batches(steps: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = torch.Generator().manual_seed(1)
    return [(torch.randn(world * BATCH, 3, 8, 8, generator=data, dtype=torch.float64),
             torch.randint(0, 10, (world * BATCH,), generator=data)) for _ in range(steps)]


def engine_keys(engine: str) -> list[str]:
    """Overrides choosing ``engine`` (``zeroN``: DeepSpeed with ZeRO stage N)."""
    if not engine.startswith("zero"):
        return [f"engine.name={engine}"]
    path = Path(tempfile.gettempdir()) / f"sharded_equivalence_{engine}_{os.getpid()}.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": int(engine[4:])}}))
    return ["engine.name=deepspeed", f"engine.deepspeed_config={path}"]


def trained(engine_name: str, overrides: list[str], size: int, steps: int, info: Any,
            replicas: Any) -> tuple[dict[str, torch.Tensor], int]:
    """The consensus model after ``steps`` steps through localsgd's engine and sync, and the
    bytes of the reducer's error-feedback residuals on this rank."""
    cfg = load_config(None, [*overrides, *OPTIM, *engine_keys(engine_name),
                             f"sync.replica_group={size}", f"data.batch_size={BATCH}"])
    model = new_model()
    known = facts(cfg, info.world_size, info.local_world_size)
    engine = build_engine(cfg.engine, EngineContext(
        model, build_optimizer(cfg.optim, model, LR), info, CommMeter(), known, None,
        replicas))
    ctl = SyncController.build(cfg.sync, replicas.sync_info(), CommMeter(), steps)
    ctl.begin(engine)
    loss_fn = nn.CrossEntropyLoss()
    mine = slice(info.rank * BATCH, (info.rank + 1) * BATCH)
    for x, y in batches(steps, info.world_size):
        engine.forward_backward(x[mine], y[mine], loss_fn, 1.0, ctl.grad_sync(), NoTimer())
        engine.optimizer_step()
        ctl.after_step(engine)
    ctl.finish(engine)
    full = getattr(engine, "full_state_dict", None)
    state = full() if full is not None else None
    return (state if state is not None else model.state_dict()), ctl.reducer.held_bytes()


def owned_bytes(engine: str, size: int, rank: int) -> int:
    """Bytes of the parameters this rank holds: its dim-0 shard with fsdp, else all."""
    total = 0
    for p in new_model().parameters():
        rows, per = p.shape[0], -(-p.shape[0] // size)
        mine = (max(0, min(rows, (rank % size + 1) * per) - min(rows, rank % size * per))
                if engine == "fsdp" else rows)
        total += mine * (p.numel() // rows) * p.element_size()
    return total


def shard_segments(t: torch.Tensor, pieces: int) -> list[tuple[int, int]]:
    """(start, end) in ``t``'s flat elements of each non-empty shard FSDP2 gives a rank:
    dim-0 chunks of ceil(rows / pieces) rows (``torch.chunk``'s rule), written out here."""
    rows = t.shape[0]
    per, row = -(-rows // pieces), t.numel() // rows
    bounds = [(min(rows, s * per) * row, min(rows, (s + 1) * per) * row) for s in range(pieces)]
    return [(a, b) for a, b in bounds if b > a]


class Sim:
    """G plain-torch models and what the sync keeps: the anchor, the outer velocity, each
    group's error-feedback residuals and an average in flight."""

    def __init__(self, cfg: Any, groups: int, pieces: int) -> None:
        self.cfg, self.pieces = cfg.sync, pieces
        self.models = [new_model() for _ in range(groups)]
        self.anchor = [p.detach().clone() for p in self.models[0].parameters()]
        self.velocity = [torch.zeros_like(a) for a in self.anchor]
        keys = cfg.sync.compression
        self.codec = build_codec(keys) if keys.method != "none" else None
        self.feedback = uses_feedback(keys)
        self.residuals = [[torch.zeros_like(a) for a in self.anchor] for _ in self.models]
        self.flight: tuple[int, list[list[torch.Tensor]], list[torch.Tensor]] | None = None
        """(step it lands, each group's snapshot, their mean)."""
        self.mixing = ring(groups) if cfg.sync.topology == "ring" else None

    def node(self, per_node: int) -> None:
        """Each node's ``per_node`` groups take their mean."""
        with torch.no_grad():
            every = self.params()
            for first in range(0, len(every), per_node):
                for params in zip(*every[first:first + per_node], strict=True):
                    mean = torch.stack(params).mean(0)
                    for p in params:
                        p.copy_(mean)

    def mix(self) -> None:
        """Gossip: group g takes sum_j W_gj theta_j."""
        assert self.mixing is not None
        with torch.no_grad():
            for params in zip(*self.params(), strict=True):
                old = torch.stack(params)
                for g, p in enumerate(params):
                    p.copy_(torch.einsum("j,j...->...", self.mixing[g], old))

    def mean(self) -> None:
        """The exact mean of every group: how a run whose workers end apart ends."""
        with torch.no_grad():
            for params in zip(*self.params(), strict=True):
                mean = torch.stack(params).mean(0)
                for p in params:
                    p.copy_(mean)

    def params(self) -> list[list[torch.Tensor]]:
        return [[p.detach() for p in m.parameters()] for m in self.models]

    def reduced_delta(self, i: int) -> torch.Tensor:
        """The mean over groups of each group's decoded anchor - theta of parameter ``i``,
        every shard of it one codec segment (with its own residual elements)."""
        assert self.codec is not None
        a = self.anchor[i].reshape(-1)
        segments = shard_segments(self.anchor[i], self.pieces)
        total = torch.zeros_like(a)
        for g, params in enumerate(self.params()):
            memory = a - params[i].reshape(-1)
            if self.feedback:
                memory = memory + self.residuals[g][i].reshape(-1)
            decoded = self.codec.decode(self.codec.encode(memory, segments), memory.numel(),
                                        segments, memory.dtype)
            if self.feedback:
                self.residuals[g][i] = (memory - decoded).view_as(self.anchor[i])
            total += decoded
        return (total / len(self.models)).view_as(self.anchor[i])

    def sync(self) -> None:
        """A blocking global sync: the exact or compressed mean, then copy or outer."""
        outer = self.cfg.update == "outer"
        with torch.no_grad():
            for i, params in enumerate(zip(*self.params(), strict=True)):
                if self.codec is not None:
                    delta = self.reduced_delta(i)
                else:
                    delta = self.anchor[i] - torch.stack(params).mean(0)
                if outer:
                    o = self.cfg.outer
                    self.velocity[i].mul_(o.momentum).add_(delta)
                    self.anchor[i].sub_(delta + o.momentum * self.velocity[i], alpha=o.lr)
                    new = self.anchor[i].clone()
                elif self.codec is not None:
                    new = self.anchor[i] - delta
                    self.anchor[i].copy_(new)
                else:
                    new = torch.stack(params).mean(0)
                for p in params:
                    p.copy_(new)

    def start(self, step: int) -> None:
        """An overlapped sync: snapshot now, the mean lands ``overlap_steps`` later."""
        snaps = [[p.clone() for p in params] for params in self.params()]
        means = [torch.stack(ps).mean(0) for ps in zip(*snaps, strict=True)]
        self.flight = (step + self.cfg.overlap_steps, snaps, means)

    def land(self, step: int | None) -> None:
        """theta += mean(snapshot) - snapshot for a flight due by ``step`` (None: any)."""
        if self.flight is None or (step is not None and self.flight[0] > step):
            return
        _, snaps, means = self.flight
        with torch.no_grad():
            for params, snap in zip(self.params(), snaps, strict=True):
                for p, s, m in zip(params, snap, means, strict=True):
                    p.add_(m - s)
        self.flight = None


def ring(k: int) -> torch.Tensor:
    """A ring's mixing matrix, written out: 1/3 for itself and each neighbour."""
    w = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for d in (-1, 0, 1):
            w[i, (i + d) % k] += 1 / 3
    return w


def action(cfg: Any, t: int, steps: int, switch: int) -> str | None:
    """The sync due after step ``t``: global, node (hierarchical) or none."""
    k, s = t - switch, cfg.sync
    if k <= 0:
        return None
    if s.algorithm == "hierarchical":
        return ("global" if k % (s.period * s.block_period) == 0
                else "node" if k % s.period == 0 else None)
    return "global" if k % s.period == 0 or t == steps else None


def simulated(overrides: list[str], size: int, steps: int, world: int, per_node: int,
              pieces: int = 1) -> list[torch.Tensor]:
    """Plain torch: G models, each stepping on its group's union batch; syncs average them
    (compressed per tensor, or per dim-0 shard with ``pieces`` > 1)."""
    cfg = load_config(None, [*overrides, *OPTIM])
    groups = world // size
    sim = Sim(cfg, groups, pieces)
    opts = [build_optimizer(cfg.optim, m, LR) for m in sim.models]
    switch = cfg.sync.switch_step if cfg.sync.algorithm == "post_local" else 0
    overlapped = cfg.sync.overlap_steps > 0
    loss_fn = nn.CrossEntropyLoss()
    for t, (x, y) in enumerate(batches(steps, world), start=1):
        grads = []
        for g, m in enumerate(sim.models):
            rows = slice(g * size * BATCH, (g + 1) * size * BATCH)
            m.zero_grad()
            loss_fn(m(x[rows]), y[rows]).backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        if t <= switch:  # mini-batch phase: every group takes the mean gradient
            for m in sim.models:
                for i, p in enumerate(m.parameters()):
                    p.grad.copy_(torch.stack([gr[i] for gr in grads]).mean(0))
        for o in opts:
            o.step()
        sim.land(t)
        due = action(cfg, t, steps, switch)
        if due == "node":
            sim.node(per_node)
        elif due is not None and overlapped:
            sim.start(t)
        elif due is not None and sim.mixing is not None:
            sim.mix()
        elif due is not None:
            sim.sync()
        elif t == switch:
            for a, p in zip(sim.anchor, sim.models[0].parameters(), strict=True):
                a.copy_(p.detach())
    if overlapped or sim.mixing is not None:  # the run ends on the exact mean
        sim.land(None)
        sim.mean()
    return [p.detach() for p in sim.models[0].parameters()]


def _worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b, strict=True))


def main() -> int:
    info = init_distributed(DistConfig())
    size, steps = int(sys.argv[1]), int(sys.argv[2])
    engines = (sys.argv[3] if len(sys.argv) > 3 else "fsdp,ddp").split(",")
    only = sys.argv[4].split(",") if len(sys.argv) > 4 else list(CASES)
    replicas = build_replicas(str(size), info, mesh_needed=True)
    ok = True
    initial = list(new_model().parameters())
    for name in only:
        overrides = CASES[name]
        per_node = info.local_world_size // size
        whole = simulated(overrides, size, steps, info.world_size, per_node)
        sharded = (simulated(overrides, size, steps, info.world_size, per_node, size)
                   if name in ELEMENTWISE | PER_SHARD else whole)
        if name in PER_SHARD:
            # Otherwise the per-shard simulation would prove nothing about shards.
            apart = _worst(sharded, whole)
            ok &= apart > 1e-6
            print(f"rank {info.rank} {name}: per shard - per tensor = {apart:.3e}", flush=True)
        if name == "hierarchical":
            # Node averages over no other group, or over every group, must both differ.
            for other in (1, info.world_size // size):
                apart = _worst(whole, simulated(overrides, size, steps, info.world_size,
                                                other))
                ok &= apart > 1e-6
                print(f"rank {info.rank} {name}: {per_node} groups a node - {other} = "
                      f"{apart:.3e}", flush=True)
        for engine in engines:
            if engine.startswith("zero") and name not in DEEPSPEED_CASES:
                continue
            state, held = trained(engine, overrides, size, steps, info, replicas)
            got = list(state.values())
            if uses_feedback(load_config(None, overrides).sync
                                                         .compression):
                # Error-feedback residuals: one per element this rank owns, so / S.
                owned = owned_bytes(engine, size, info.rank)
                print(f"rank {info.rank} {name} {engine}: residual bytes {held} of "
                      f"{owned} owned", flush=True)
                ok &= held == owned
            worst = _worst(got, sharded if engine == "fsdp" else whole)
            moved = _worst(got, initial)
            print(f"rank {info.rank} {name} {engine} {info.world_size // size}x{size}: "
                  f"max |engine - simulation| = {worst:.3e}; moved {moved:.3e}", flush=True)
            # DeepSpeed's ZeRO keeps float32 masters even of a float64 model: float32
            # round-off over the steps (about 1e-7 here), far below any algorithmic error.
            tolerance = 1e-6 if engine.startswith("zero") else 1e-10
            ok &= worst < tolerance and moved > 1e-3
            if name in ELEMENTWISE:
                unsharded = _worst(got, whole)
                print(f"rank {info.rank} {name} {engine}: max |engine - unsharded| = "
                      f"{unsharded:.3e}", flush=True)
                ok &= unsharded < tolerance
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
