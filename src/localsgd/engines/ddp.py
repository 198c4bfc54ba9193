"""PyTorch DistributedDataParallel engine with a counting, skippable gradient all-reduce.

Mini-batch steps run DDP's bucketed all-reduce through a comm hook (so it still overlaps with
backward and every byte is counted). Local steps run the plain module, bypassing DDP's
Python forward: its reducer would have nothing to do (gradient sync is off for the whole
step), and a host-bound small model pays for every call. One worker has nothing to reduce
and runs no DDP at all. Buffers are never broadcast (the sync controller averages them),
which keeps local steps free of any collective. The module is the same object either way, so
the state_dict keys and old checkpoints are unchanged.

A channels_last model needs nothing special: DDP lays each gradient's view into its bucket
out with the parameter's strides (``gradient_as_bucket_view``), so gradients and the
momentum made from them are channels_last too, the same on every rank.
"""


import inspect
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from localsgd.engines.base import EnginePart, HeldTensors, momentum_decays
from localsgd.engines.groups import EvalTarget, saved_buffers
from localsgd.engines.precision import Autocast
from localsgd.engines.registry import ENGINES, EngineContext
from localsgd.sync.accounting import CommMeter
from localsgd.sync.grad_compression import hook as compressed_hook

# BatchNorm buffers are averaged by the sync parts, never broadcast from rank 0 in forward.
# torch 2.14 renamed ``broadcast_buffers`` to ``forward_sync_buffers``; older releases only
# know the first name.
NO_BUFFER_SYNC: dict[str, bool] = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False})


class _HookState:
    def __init__(self, meter: CommMeter, world_size: int) -> None:
        self.meter = meter
        self.world_size = world_size
        self.group: dist.ProcessGroup | None = None
        """The group this step reduces over: None is the world (a replica group's steps
        between syncs reduce over its own ranks)."""
        self.kind = "grad"


def _counting_allreduce(state: _HookState,
                        bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buf = bucket.buffer()
    if state.world_size == 1:
        # Nothing to reduce: skip the collective (and its launch on the device) entirely.
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_result(buf)
        return fut
    nbytes = buf.numel() * buf.element_size()
    start = time.perf_counter()
    # Divide first, like DDP's built-in reduction, so results match it bit for bit.
    buf.div_(state.world_size)
    fut = dist.all_reduce(buf, group=state.group, async_op=True).get_future()
    kind = state.kind

    def done(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        state.meter.record(kind, nbytes, time.perf_counter() - start)
        return f.value()[0]

    return fut.then(done)


def broadcast_state(module: nn.Module, meter: CommMeter) -> None:
    """Make every rank start from rank 0's weights (counted as ``other``)."""
    for t in [*module.parameters(), *module.buffers()]:
        with meter.timed("other", t.numel() * t.element_size()):
            dist.broadcast(t.data, src=0)


@ENGINES.register
class DDPEngine(HeldTensors, EnginePart):
    name = "ddp"

    def __init__(self, cfg: Any, ctx: EngineContext) -> None:
        module, info, meter = ctx.module, ctx.info, ctx.meter
        self.module = module
        self.optimizer = ctx.optimizer
        self.info = info
        self.meter = meter
        replicas = ctx.replicas
        self.replicas = replicas if replicas is not None and replicas.size > 1 else None
        """The replica group this rank steps with (``sync.replica_group`` > 1): gradients
        are reduced over its ranks at every step, over the world at mini-batch steps."""
        # Inside a group every step reduces exactly over it; compression is for the sync
        # across groups (mini-batch steps with compression are refused there).
        self.grad_compression = ctx.grad_compression if self.replicas is None else None
        self.hook_state: _HookState | None = None
        backend = ctx.facts.compile_backend
        self.wrapped: DistributedDataParallel | None = None
        """DDP, for gradient all-reduces; None with one worker, which has nothing to reduce
        (its hook would hand each bucket back as is), so steps run the plain module."""
        if info.world_size > 1:
            broadcast_state(module, meter)
            self.wrapped = self._wrap(module, ctx)
        self.amp = Autocast(ctx.facts.precision, info.device)
        self.grad_clip = ctx.facts.grad_clip
        # train.compile: the DDP wrapper is compiled, not the bare module, so dynamo splits
        # the graph at DDP's bucket boundaries and all-reduces still overlap with backward.
        # The module itself stays plain: its parameters are what the sync code averages,
        # its state_dict has no prefixes, and evaluation and the averaged copy run it as is.
        stepped: nn.Module = self.wrapped if self.wrapped is not None else module
        self.step_module = (stepped if backend is None
                            else torch.compile(stepped, backend=backend))
        self.local_module: nn.Module | None = module if backend is None else None
        """What a step without gradient sync runs instead of DDP (its reducer would sit the
        step out): the plain module, sparing DDP's Python forward. A compiled step always
        runs its compiled wrapper."""
        self._synced = False
        """A step with gradient sync has run. DDP agrees on its bucket order in the forward
        after the first one, so from then until it has, every step goes through DDP."""

    def _wrap(self, module: nn.Module, ctx: EngineContext) -> DistributedDataParallel:
        info, meter = ctx.info, ctx.meter
        group = {"process_group": self.replicas.within} if self.replicas is not None else {}
        wrapped = DistributedDataParallel(
            module,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            **group,
            **NO_BUFFER_SYNC,
            init_sync=False,
            gradient_as_bucket_view=True,
        )
        if self.grad_compression is not None:
            self.grad_compression.bind(module)
            wrapped.register_comm_hook(self.grad_compression, compressed_hook)
        else:
            self.hook_state = _HookState(meter, info.world_size)
            wrapped.register_comm_hook(self.hook_state, _counting_allreduce)
        return wrapped

    def train(self, mode: bool = True) -> None:
        (self.wrapped if self.wrapped is not None else self.module).train(mode)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                         scale: float, grad_sync: bool,
                         timer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch; all-reduce its gradients only when ``grad_sync``."""
        ddp, model, rebuilt = self.wrapped, self.step_module, True
        if ddp is not None and self.replicas is not None:
            self._group_step(ddp, grad_sync)
            rebuilt = ddp._has_rebuilt_buckets
        elif ddp is not None:
            if self.local_module is None or grad_sync or (
                    self._synced and not ddp._has_rebuilt_buckets):
                ddp.require_backward_grad_sync = grad_sync
                self._synced |= grad_sync
                rebuilt = ddp._has_rebuilt_buckets
            else:
                model = self.local_module
        with timer.phase("forward"):
            if self.amp.dtype is None:  # fp32: no autocast context to enter (four calls)
                logits = model(x)
            else:
                with self.amp.forward():
                    logits = model(x)
                logits = logits.float()  # the loss in fp32, as autocast would compute it
            loss = loss_fn(logits, y)
        if not rebuilt and ddp is not None and ddp._has_rebuilt_buckets:
            self._count_bucket_rebuild()
        with timer.phase("backward"):
            # No multiply (a kernel forward and one backward) when nothing is accumulated.
            self.amp.backward(loss * scale if scale != 1.0 else loss)
        return loss.detach(), logits.detach()

    def _group_step(self, ddp: DistributedDataParallel, grad_sync: bool) -> None:
        """A replica group reduces every micro-batch: over its ranks, or over the world when
        the schedule all-reduces gradients. Reduced gradients that accumulate are the same
        on every rank of the group, and the mean over the world of a group mean is the mean
        over the world, so the sum matches a single reduction of the accumulated sum."""
        assert self.hook_state is not None and self.replicas is not None
        ddp.require_backward_grad_sync = True
        self._synced = True
        if grad_sync:
            self.hook_state.group, self.hook_state.world_size = None, self.info.world_size
            self.hook_state.kind = "grad"
        else:
            self.hook_state.group = self.replicas.within
            self.hook_state.world_size, self.hook_state.kind = self.replicas.size, "group"

    def _count_bucket_rebuild(self) -> None:
        """DDP's reducer agrees on a bucket order once, in C++; account for it as ``other``.

        It broadcasts the int32 parameter order (one entry per tensor, plus one) and the int32
        bucket sizes: two calls whose sizes follow from the model and the bucket layout.
        """
        assert self.wrapped is not None
        sizes = str(self.wrapped._get_ddp_logging_data().get("bucket_sizes", "0"))
        num_buckets = len(sizes.split(","))
        num_tensors = sum(1 for p in self.module.parameters() if p.requires_grad)
        self.meter.record("other", 4 * (num_tensors + 1) + 4 * num_buckets, calls=2)

    def optimizer_step(self) -> None:
        self.amp.step(self.optimizer, self.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)

    # SyncTarget (held lists: DDP never replaces the module's tensors)
    def list_params(self) -> list[torch.Tensor]:
        return [p.data for p in self.module.parameters()]

    def list_buffers(self) -> list[torch.Tensor]:
        return [b.data for b in self.module.buffers()]

    def momentum_decays(self) -> list[float | None]:
        return momentum_decays(self.optimizer)

    def after_params_changed(self) -> None:
        pass

    def full_state_dict(self) -> dict[str, Any] | None:
        """The model to save, BatchNorm statistics averaged over the replica group's ranks
        (every rank must call it); None without replica groups: the module's own."""
        if self.replicas is None:
            return None
        saved_buffers(self.module, self.replicas, self.meter)
        return self.module.state_dict()

    def eval_target(self) -> Any:
        """The averaged evaluation copy's source: inside replica groups, with the group's
        mean BatchNorm statistics."""
        if self.replicas is None:
            return self
        return EvalTarget(self.sync_params(), self.sync_buffers(), self.replicas, self.meter)

    def state_dict(self) -> dict[str, Any]:
        # Error-feedback residuals of compressed gradients: the engine's mean of states
        # (a world-size change) is their merge rule too.
        grads = self.grad_compression.state_dict() if self.grad_compression else {}
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.amp.state_dict(), "grad_compression": grads}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.forget_tensors()  # the loaded optimizer state is new tensors
        self.amp.load_state_dict(state.get("scaler", {}))
        if self.grad_compression is not None:
            self.grad_compression.load_state_dict(state.get("grad_compression", {}))
