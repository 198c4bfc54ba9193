"""FSDP2 engine: ``fully_shard`` over a replicate x shard mesh, one replica group per row.

``launch/replicas.py`` lays the world out as G groups of S ranks (``sync.replica_group``).
Each direct child of the model that holds parameters, and then the model itself, is
sharded over the mesh's shard dimension (the group's S ranks), so a rank keeps 1/S of every
parameter, of its gradient and of the optimizer state. Every micro-batch FSDP all-gathers
the weights of one child at a time and reduce-scatters gradients over the group. Mini-batch
steps then all-reduce the sharded gradients across groups, over the replicate dimension
(HSDP's result); local steps skip that, so between syncs each group trains on its own.
FSDP's own HSDP all-reduce is not used: a step without it keeps the gradients aside until
one with it (gradient accumulation), where local SGD needs them applied.

The sync parts see each rank's local shards (``to_local()``): a rank averages them with the
ranks holding the same shard in the other groups (``Replicas.across``), so a sync moves 1/S
of the model per rank, and the anchor and the outer momentum the parts keep are per shard
too. Writing into a local shard needs ``torch.no_grad()`` (it is a view of a parameter).
Buffers (BatchNorm statistics) are not sharded: every rank keeps its own, as DDP ranks do;
what is evaluated and saved takes their mean over the group (``engines/groups.py``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from localsgd.config.errors import ConfigError
from localsgd.engines.base import EnginePart, momentum_tensors
from localsgd.engines.ddp import broadcast_state
from localsgd.engines.groups import EvalTarget, saved_buffers
from localsgd.engines.registry import ENGINES, EngineContext
from localsgd.registry import Facts
from localsgd.sync.sharding import local


def shard_module(module: nn.Module, mesh: Any) -> None:
    """``fully_shard`` every direct child that holds parameters, then the root: one
    child's full weights exist at a time."""
    for child in module.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(module, mesh=mesh)


def _to_local(state: Any) -> Any:
    """``state`` with every DTensor replaced by a copy of this rank's shard."""
    if isinstance(state, dict):
        return {k: _to_local(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_local(v) for v in state)
    if isinstance(state, DTensor):
        return state.to_local().detach().clone()
    return state


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers live on the meta device, so
    no second whole model is ever allocated."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@ENGINES.register
class FSDPEngine(EnginePart):
    name = "fsdp"
    shards = True
    """Parameters are sharded over the replica group (``sync/sharding.py``)."""

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        p = []
        if facts.precision != "fp32":
            p.append(f"model.precision: {facts.precision} is not supported by the fsdp "
                     "engine yet (it trains in the model's dtype); use model.precision=fp32, "
                     "or engine.name=ddp")
        if facts.compile_backend is not None:
            p.append("train.compile: the fsdp engine does not compile its steps yet; set "
                     "train.compile=false, or use engine.name=ddp")
        if facts.grad_clip > 0:
            p.append("optim.grad_clip: the fsdp engine does not clip sharded gradients yet; "
                     "set optim.grad_clip=0, or use engine.name=ddp")
        return p

    def merge_sources(self, states: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Of the states of every old rank (in rank order), those holding this rank's shard
        index: a change in the number of groups with S fixed merges shard by shard (the
        engine's ``merge_states`` and the sync parts' then average these only)."""
        size = self.replicas.size
        old = {int(s["engine"].get("fsdp_layout", [0, 0])[1]) for s in states}
        if old != {size}:
            raise ConfigError([
                f"sync.replica_group: the checkpoint holds fsdp shards of groups of "
                f"{'/'.join(map(str, sorted(old)))} ranks, this launch makes groups of {size}; "
                "a resume may change the number of groups but not their size, so resume with "
                "the sync.replica_group that wrote it, or start fresh with run.resume=false "
                "(or another run.dir)"])
        return states[self.info.rank % size::size]

    def __init__(self, cfg: Any, ctx: EngineContext) -> None:
        replicas = ctx.replicas
        if replicas is None or replicas.mesh is None:
            raise RuntimeError("the fsdp engine needs the replica mesh (launch.replicas)")
        self.replicas = replicas
        self.info, self.meter, self.optimizer = ctx.info, ctx.meter, ctx.optimizer
        module = ctx.module
        if ctx.info.world_size > 1:
            broadcast_state(module, ctx.meter)
        blueprint = _meta_copy(module)
        names = {id(p): n for n, p in module.named_parameters()}
        shard_module(module, replicas.mesh["shard"])
        # The optimizer was built on the whole parameters; it steps their shards now.
        sharded = dict(module.named_parameters())
        for group in self.optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
        self.module = module
        self._blueprint: nn.Module | None = blueprint
        """The model's structure without storage (the meta device), for ``eval_copy``."""
        params = self.sync_params()
        self.shard_bytes = _nbytes(params)
        """Bytes of this rank's parameter shards."""
        self.full_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        """Bytes of the whole model's parameters."""

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                         scale: float, grad_sync: bool,
                         timer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch; gradients are reduce-scattered over the group (micro-batches
        accumulate into the sharded gradients), and all-reduced across groups only when
        ``grad_sync`` (the last micro-batch of a mini-batch step): the accumulated sum."""
        with timer.phase("forward"):
            logits = self.module(x)
            loss = loss_fn(logits, y)
        with timer.phase("backward"):
            (loss * scale if scale != 1.0 else loss).backward()
        if self.replicas.size > 1:
            # Payload handed to FSDP's collectives (an estimate: FSDP issues them itself):
            # the shard all-gathered for forward and again for backward, the whole gradient
            # reduce-scattered.
            self.meter.record("group", 2 * self.shard_bytes + self.full_bytes, calls=0)
        if grad_sync and self.replicas.groups > 1:
            self._all_reduce_grads()
        return loss.detach(), logits.detach()

    def _all_reduce_grads(self) -> None:
        """The mean over groups of the (accumulated) sharded gradients, in one flat buffer
        per dtype; divided first, as DDP does."""
        with torch.no_grad():
            grads = [local(p.grad) for p in self.module.parameters() if p.grad is not None]
            for dtype in dict.fromkeys(g.dtype for g in grads):
                same = [g for g in grads if g.dtype == dtype]
                flat = torch.cat([g.reshape(-1) for g in same]).div_(self.replicas.groups)
                with self.meter.timed("grad", flat.numel() * flat.element_size()):
                    dist.all_reduce(flat, group=self.replicas.across)
                pos = 0
                for g in same:
                    g.copy_(flat[pos:pos + g.numel()].view_as(g))
                    pos += g.numel()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # SyncTarget: this rank's shards, listed at every ask (FSDP swaps the module's
    # parameters between sharded and whole ones around each forward and backward)
    def sync_params(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [local(p) for p in self.module.parameters()]

    def sync_buffers(self) -> list[torch.Tensor]:
        return [b.data for b in self.module.buffers()]

    def momentum_buffers(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [local(t) for t in momentum_tensors(self.optimizer)]

    def after_params_changed(self) -> None:
        pass

    def whole_distance(self, shard: float) -> float:
        """The consensus distance of the whole model from this rank's shard's: the root of
        the sum of squares over the group's shards (every rank of the group calls it)."""
        if self.replicas.size == 1:
            return shard
        sq = torch.tensor([shard * shard], dtype=torch.float64, device=self.info.device)
        with self.meter.timed("other", sq.numel() * sq.element_size()):
            dist.all_reduce(sq, group=self.replicas.within)
        return float(sq.sqrt())

    def eval_target(self) -> EvalTarget:
        """The averaged evaluation copy's source: this rank's shards and the group's mean
        BatchNorm statistics."""
        return EvalTarget(self.sync_params(), self.sync_buffers(), self.replicas, self.meter)

    def eval_copy(self) -> nn.Module:
        """A second model sharded like this one, for the averaged model (``averaged_copy``
        writes each rank's shard of the average into it)."""
        assert self._blueprint is not None, "eval_copy is built once"
        copy_, self._blueprint = self._blueprint, None
        shard_module(copy_, self.replicas.mesh["shard"])
        # Shards allocated, not filled: every evaluation writes the floating ones first;
        # counters (BatchNorm's batch count, never averaged) start at 0.
        copy_.to_empty(device=self.info.device)
        with torch.no_grad():
            for b in copy_.buffers():
                if not b.is_floating_point():
                    b.zero_()
        return copy_

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model as a plain state dict on the CPU (every rank must call it): the
        shards gathered, BatchNorm statistics averaged over the group's ranks."""
        saved_buffers(self.module, self.replicas, self.meter)
        out: dict[str, torch.Tensor] = {}
        for key, value in self.module.state_dict().items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            out[key] = full.detach().cpu().clone()
        return out

    def _layout(self) -> list[int]:
        return [self.info.world_size, self.replicas.size]

    def state_dict(self) -> dict[str, Any]:
        return {"model": _to_local(self.module.state_dict()),
                "optimizer": _to_local(self.optimizer.state_dict()),
                "fsdp_layout": self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Shards of another world with the same S have the same shapes (a merged resume
        # averages them per shard index); another S does not.
        layout = state.get("fsdp_layout")
        if not layout or layout[1] != self.replicas.size:
            raise ConfigError([
                f"engine.name: the checkpoint holds fsdp shards of a layout "
                f"{layout} ([ranks, sync.replica_group]), this launch is "
                f"{self._layout()}; resume with the sync.replica_group that wrote it, or "
                "start fresh with run.resume=false (or another run.dir)"])
        with torch.no_grad():
            live = self.module.state_dict()
            for key, value in state["model"].items():
                local(live[key]).copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        # The optimizer state of a sharded parameter is a DTensor laid out like it.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                held = self.optimizer.state.get(p, {})
                for k, v in held.items():
                    if (isinstance(p, DTensor) and isinstance(v, torch.Tensor)
                            and not isinstance(v, DTensor)
                            and v.shape == p.to_local().shape and v.dim() > 0):
                        held[k] = DTensor.from_local(v, p.device_mesh, p.placements,
                                                     shape=p.shape, stride=p.stride())
