"""DeepSpeed engine: the recipe's model and SGD run inside ``deepspeed.initialize``.

Configuration. The DeepSpeed JSON (``engine.deepspeed_config``) is reconciled with the recipe
by ``localsgd.engines.deepspeed_config`` before DeepSpeed is imported: the recipe owns micro
batch size, gradient accumulation, optimizer, LR schedule and (absent) gradient clipping;
those keys are filled from it, and a JSON value contradicting it is a ConfigError. DeepSpeed
joins the process group ``init_distributed`` already created instead of making its own.

Communication accounting. Every collective DeepSpeed issues goes through one backend object
in ``deepspeed.comm``; it is wrapped so each call is recorded in the CommMeter with the
payload this rank hands over (numel x element size, the same convention as the DDP hook),
as ``grad`` inside forward/backward/step and as ``other`` elsewhere (set-up broadcasts).
That counts DeepSpeed's own gradient all-reduce exactly, and also anything else it would
issue (a norm all-reduce, ZeRO's gathers), so "zero collectives in a local step" is measured
rather than assumed.

Sync algorithms. Mini-batch steps use DeepSpeed's all-reduce at the accumulation boundary.
Local steps run backward inside ``engine.no_sync()``, so nothing is reduced; the trainer's
micro-batches are mapped onto DeepSpeed's boundary explicitly (the last of ``grad_accum``
micro-batches is the boundary), so one ``optimizer_step`` is one DeepSpeed update and the
sync counter counts optimizer steps. Model averaging is done by the SyncController through
``sync_params``/``sync_buffers``/``momentum_buffers``, as for DDP.

Precision. With ``bf16`` the module holds bf16 weights and DeepSpeed's optimizer wrapper
keeps fp32 masters inside the recipe's SGD; ``sync_params`` returns those masters (so
averages are taken in fp32) and ``after_params_changed`` copies them into the module. The
module is given hooks that cast floating inputs to bf16 and outputs to fp32, so the trainer's
loss and evaluation see fp32 logits; its BatchNorm layers compute in fp32 on fp32 running
statistics (``engines/precision.py``). The JSON's bf16 section follows ``model.precision``.
``torch_autocast`` keeps fp32 weights (its own masters).
ZeRO stages 1-2 run mini-batch SGD only; their reductions and gathers count as ``grad``.

Layout and compilation. ``train.compile`` goes through ``DeepSpeedEngine.compile``.
``model.channels_last`` is refused (``check``): DeepSpeed broadcasts each parameter at set-up
as a byte view (``p.data.view(torch.uint8)``), which a channels_last weight, whose last
dimension is not the densest, cannot give.

At exit, the process groups DeepSpeed cloned are released while Python is still whole (see
``_release_deepspeed_groups``).
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from localsgd.config.errors import ConfigError
from localsgd.engines.base import EnginePart, HeldTensors, momentum_decays
from localsgd.engines.deepspeed_config import (
    KEY,
    DeepSpeedKeys,
    check_deepspeed_config,
    enabled,
    resolve_deepspeed_config,
    zero_stage,
)
from localsgd.engines.deepspeed_groups import GroupMPU
from localsgd.engines.groups import EvalTarget, saved_buffers
from localsgd.engines.precision import batch_norm_in_fp32
from localsgd.engines.registry import ENGINES, EngineContext
from localsgd.registry import Facts
from localsgd.sync.accounting import CommMeter

INSTALL_HINT = "install it with pip install -e '.[deepspeed]'"

# For each collective of deepspeed.comm's backend: (position, keyword) of the argument that
# holds this rank's payload; None for calls without a tensor payload (barriers, objects).
_PAYLOAD: dict[str, tuple[int, str] | None] = {
    "all_reduce": (0, "tensor"), "inference_all_reduce": (0, "tensor"),
    "all_reduce_coalesced": (0, "tensors"), "broadcast": (0, "tensor"),
    "reduce": (0, "tensor"), "all_gather": (1, "tensor"),
    "all_gather_into_tensor": (1, "input_tensor"), "all_gather_base": (1, "input_tensor"),
    "all_gather_coalesced": (1, "input_tensors"), "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input_tensor"), "all_to_all_single": (1, "input"),
    "all_to_all": (1, "input_tensor_list"), "send": (0, "tensor"), "isend": (0, "tensor"),
    "recv": (0, "tensor"), "irecv": (0, "tensor"), "gather": (0, "tensor"),
    "scatter": (0, "tensor"), "barrier": None, "monitored_barrier": None,
    "broadcast_object_list": None, "all_gather_object": None, "batch_isend_irecv": None,
}

# DeepSpeed's config validation raises these for a JSON it rejects.
_REJECTIONS: tuple[type[BaseException], ...] = (ValueError, AssertionError, TypeError,
                                                 KeyError, NotImplementedError)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CountingBackend:
    """Stands in for deepspeed.comm's backend and records each collective in a CommMeter."""

    def __init__(self, real: Any, meter: CommMeter) -> None:
        self.real = real
        self.meter = meter
        self.kind = "other"

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if name not in _PAYLOAD:
            return attr
        where = _PAYLOAD[name]

        def counted(*args: Any, **kwargs: Any) -> Any:
            payload = None
            if where is not None:
                pos, key = where
                payload = args[pos] if len(args) > pos else kwargs.get(key)
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.meter.record(self.kind, _nbytes(payload), elapsed, wait_s=elapsed)

        return counted

    @contextmanager
    def counting_as(self, kind: str) -> Iterator[None]:
        previous, self.kind = self.kind, kind
        try:
            yield
        finally:
            self.kind = previous


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as exc:
        raise ConfigError([f"engine.name: deepspeed needs DeepSpeed, which cannot be imported "
                           f"({exc}); {INSTALL_HINT}, or use engine.name=ddp"]) from None
    return deepspeed


def _install_counter(meter: CommMeter) -> CountingBackend:
    import deepspeed.comm.comm as ds_comm

    if isinstance(ds_comm.cdb, CountingBackend):  # a second engine in this process
        ds_comm.cdb.meter = meter
    else:
        ds_comm.cdb = CountingBackend(ds_comm.cdb, meter)
    return ds_comm.cdb


def _release_deepspeed_groups() -> None:
    """Free the process groups DeepSpeed cloned (it keeps them in module globals) at exit.

    Left to interpreter teardown, a gloo group can be destroyed after the C++ runtime has
    begun to exit, which aborts the process ("terminate called without an active exception")
    after training finished. Dropping DeepSpeed's references (and the engine cycles that hold
    them) while Python is still whole destroys them in an orderly way.
    """
    from deepspeed.utils import groups

    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release()
    gc.collect()


def _cast_inputs(dtype: torch.dtype, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _fp32_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.float()
    return output


@ENGINES.register
class DeepSpeedEngine(HeldTensors, EnginePart):
    name = "deepspeed"
    Config = DeepSpeedKeys

    @classmethod
    def check(cls, cfg: Any, facts: Facts) -> list[str]:
        layout = ["model.channels_last: the deepspeed engine cannot train channels_last "
                  "weights (DeepSpeed broadcasts parameters as byte views, which need the "
                  "default layout); set model.channels_last=false or use engine.name=ddp"]
        problems = (layout if facts.channels_last else []) + check_deepspeed_config(
            cfg.deepspeed_config, facts)
        if facts.compression != "none" and facts.algorithm in ("minibatch", "post_local"):
            problems.append(
                f"sync.compression.method: {facts.compression} compresses mini-batch "
                "gradients through DDP's comm hook, and DeepSpeed reduces its gradients "
                "itself; use engine.name=ddp, or sync.algorithm=local or hierarchical (model "
                "deltas are compressed on DeepSpeed's fp32 masters)")
        if facts.grad_clip > 0 and facts.local_steps:
            problems.append(
                "optim.grad_clip: DeepSpeed's gradient_clipping averages the gradient norm "
                "over all workers with an all-reduce at every step, which local steps must not "
                f"do ({facts.algorithm}); use engine.name=ddp (each worker clips its own "
                "gradient) or optim.grad_clip=0")
        from localsgd.sync.sharding import grouped

        if grouped(facts.replica_group, facts) and facts.algorithm != "local":
            problems.append(
                f"sync.algorithm: {facts.algorithm} with engine.name=deepspeed inside replica "
                f"groups (sync.replica_group={facts.replica_group}): mini-batch steps across "
                "groups are not built for DeepSpeed yet; use sync.algorithm=local, or "
                "engine.name=fsdp")
        return problems

    def __init__(self, cfg: Any, ctx: EngineContext) -> None:
        module, optimizer, info, meter = ctx.module, ctx.optimizer, ctx.info, ctx.meter
        grad_accum = ctx.facts.grad_accum
        # Configuration problems surface before the (slow) import and before any collective.
        ds_config = resolve_deepspeed_config(cfg.deepspeed_config, ctx.facts)
        deepspeed = _import_deepspeed()
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator().device_name()
        if accel != info.device.type:
            raise ConfigError([
                f"dist.device: this run trains on {info.device.type}, but DeepSpeed's "
                f"accelerator is {accel}; set DS_ACCELERATOR={info.device.type} in the "
                "environment (or choose dist.device to match)"])
        self.module = module
        self.optimizer = optimizer
        self.info = info
        self.meter = meter
        self.grad_accum = grad_accum
        self.stage = zero_stage(ds_config)
        replicas = ctx.replicas
        self.replicas = replicas if replicas is not None and replicas.size > 1 else None
        """The replica group whose ranks are DeepSpeed's data-parallel group."""
        self.zero_groups = self.replicas is not None and self.stage >= 1
        self._step_kind = "group" if self.replicas is not None else "grad"
        """What DeepSpeed's collectives in a step are counted as: inside a replica group
        (local steps only) they never leave it."""
        """ZeRO partitions over the group: the sync moves each rank's fp32 partitions."""
        self._micro = 0
        # Without torchrun (one process) DeepSpeed still insists on LOCAL_RANK.
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
        trainable = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        autocast = enabled(ds_config.get("torch_autocast"))
        mixed = autocast or enabled(ds_config.get("bf16")) or enabled(ds_config.get("bfloat16"))
        if mixed and trainable[0].dtype != torch.float32:
            raise ConfigError([
                f"model.dtype: {KEY} '{cfg.deepspeed_config}' trains in bf16 with fp32 master "
                f"weights, so the model must be built in float32, not {trainable[0].dtype}; "
                "set model.dtype=float32 or use a fp32 JSON"])
        deepspeed.init_distributed(dist_backend=info.backend, dist_init_required=False)
        self._comm = _install_counter(meter)
        atexit.unregister(_release_deepspeed_groups)  # once, however many engines
        atexit.register(_release_deepspeed_groups)
        with self._comm.counting_as("other"):
            try:
                mpu = {"mpu": GroupMPU(self.replicas)} if self.replicas is not None else {}
                self.ds, self._ds_optimizer, _, _ = deepspeed.initialize(
                    model=module, optimizer=optimizer, config=ds_config, **mpu)
            except (*_REJECTIONS, deepspeed.DeepSpeedConfigError) as exc:
                raise ConfigError([f"{KEY}: DeepSpeed rejected '{cfg.deepspeed_config}': "
                                   f"{type(exc).__name__}: {exc}"]) from exc
        # DeepSpeed broadcast the parameters from rank 0; buffers are made to agree as well.
        if info.world_size > 1:
            for b in module.buffers():
                with meter.timed("other", b.numel() * b.element_size()):
                    dist.broadcast(b.data, src=0)
        self._pairs = self._master_pairs(trainable)
        lp_dtype = next(module.parameters()).dtype
        if lp_dtype in (torch.bfloat16, torch.float16) or autocast:
            module.register_forward_hook(_fp32_output)
        if lp_dtype in (torch.bfloat16, torch.float16):
            module.register_forward_pre_hook(functools.partial(_cast_inputs, lp_dtype))
            batch_norm_in_fp32(module)
        if ctx.facts.compile_backend is not None:
            # DeepSpeed compiles the module in place (nn.Module.compile), hooks included: its
            # parameters and state_dict stay the plain module's, and a deep copy (the
            # averaged evaluation model) is plain, as torch drops the compiled call from it.
            self.ds.compile(backend=ctx.facts.compile_backend)

    def _master_pairs(self, trainable: list[nn.Parameter]) -> list[tuple[str, torch.Tensor,
                                                                       torch.Tensor]]:
        """(name, module parameter, the tensor the recipe's SGD updates for it), module order.

        DeepSpeed's mixed-precision wrapper swaps each parameter in the client optimizer's
        groups for its fp32 master, one to one and in order; under ZeRO the groups hold flat
        partitions instead, which have no per-parameter counterpart.
        """
        updated = self._updated_tensors()
        masters: dict[int, torch.Tensor] = {}
        if self.stage == 0 and len(updated) == len(trainable) and all(
                u.shape == p.shape for u, p in zip(updated, trainable, strict=True)):
            masters = {id(p): u for p, u in zip(trainable, updated, strict=True)}
        return [(n, p, masters.get(id(p), p)) for n, p in self.module.named_parameters()]

    def _updated_tensors(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module,
                         scale: float, grad_sync: bool,
                         timer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch; DeepSpeed reduces gradients only when ``grad_sync``."""
        last = self._micro == self.grad_accum - 1
        if grad_sync and not last:
            raise RuntimeError("grad_sync may only be set on the last micro-batch of a step")
        # The boundary is the trainer's last micro-batch, whatever DeepSpeed's own counter says.
        self.ds.set_gradient_accumulation_boundary(last)
        # ZeRO-2 reduces inside backward and refuses no_sync; it only runs mini-batch SGD,
        # whose non-boundary micro-batches DeepSpeed does not reduce at stages 0-1 either.
        # A replica group reduces over its own ranks at every step.
        skip = not grad_sync and self.stage < 2 and self.replicas is None
        with self._comm.counting_as(self._step_kind):
            with timer.phase("forward"):
                logits = self.ds(x)
                loss = loss_fn(logits, y)
            with timer.phase("backward"), self.ds.no_sync() if skip else nullcontext():
                # Scaled here, not by DeepSpeed, so the gradient is bit-identical to DDP's.
                self.ds.backward(loss * scale if scale != 1.0 else loss, scale_wrt_gas=False)
        self._micro += 1
        return loss.detach(), logits.detach()

    def optimizer_step(self) -> None:
        if self._micro != self.grad_accum:
            raise RuntimeError(f"optimizer_step after {self._micro} micro-batches; the "
                               f"engine was built for train.grad_accum={self.grad_accum}")
        with self._comm.counting_as(self._step_kind):
            self.ds.step()  # also clears the gradients
        self._micro = 0

    # SyncTarget (held lists: the masters and ZeRO's flat partitions are set up once, and
    # stages 1-2 write into them; stage 3, which swaps the weights' storage, is refused)
    def list_params(self) -> list[torch.Tensor]:
        # ZeRO has no per-parameter masters: without groups it runs mini-batch SGD only
        # (its workers agree anyway); inside groups each rank's fp32 partitions travel.
        if self.zero_groups:
            return [t.data for t in self._updated_tensors()]
        return [m.data for _, _, m in self._pairs]

    def list_buffers(self) -> list[torch.Tensor]:
        return [b.data for b in self.module.buffers()]

    def momentum_decays(self) -> list[float | None]:
        return momentum_decays(self.optimizer)

    def eval_target(self) -> Any:
        """What the averaged evaluation copy is built from: inside replica groups the
        module's whole weights (the sync moves ZeRO partitions) and the group's mean
        BatchNorm statistics."""
        if self.replicas is None:
            return self
        params = ([p.data for p in self.module.parameters()] if self.zero_groups
                  else self.sync_params())
        return EvalTarget(params, self.sync_buffers(), self.replicas, self.meter)

    def full_state_dict(self) -> dict[str, Any] | None:
        """Inside replica groups, the module with BatchNorm statistics averaged over the
        group (every rank must call it); else None: the module's own."""
        if self.replicas is None:
            return None
        saved_buffers(self.module, self.replicas, self.meter)
        return self.module.state_dict()

    def after_params_changed(self) -> None:
        if self.zero_groups:
            # Partitions into the module's weights, all-gathered over the group.
            with self._comm.counting_as("group"):
                self._ds_optimizer.update_lp_params()
            return
        with torch.no_grad():
            for _, p, m in self._pairs:
                if p is not m:
                    p.copy_(m)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.module.state_dict(),
                                 "optimizer": self.optimizer.state_dict()}
        updated = self._updated_tensors()
        own = {id(p) for p in self.module.parameters()}
        if any(id(u) not in own for u in updated):
            # fp32 masters (or ZeRO partitions): rebuilding them from bf16 weights would
            # lose precision, so they are saved as they are.
            state["master"] = [u.detach() for u in updated]
        if self.stage > 0:
            state["zero_world_size"] = self.info.world_size
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("master")
        updated = self._updated_tensors()
        # ZeRO state is this rank's slice of a layout set by the world size; it cannot be
        # merged or resliced (torch's SGD would load wrongly shaped momentum without a word).
        mismatch = ConfigError([
            f"run.resume: the checkpoint's optimizer state does not fit this {KEY} and world "
            "size (ZeRO partitions depend on both); resume with the same engine, DeepSpeed "
            "JSON and number of workers, or set run.resume=false"])
        if state.get("zero_world_size", self.info.world_size) != self.info.world_size or (
                saved is not None and (len(saved) != len(updated) or any(
                    s.shape != u.shape for s, u in zip(saved, updated, strict=True)))):
            raise mismatch
        self.module.load_state_dict(state["model"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError:  # parameter groups of another layout (e.g. DDP's into ZeRO's)
            raise mismatch from None
        self.forget_tensors()  # the loaded optimizer state is new tensors
        with torch.no_grad():
            if saved is not None:
                for u, s in zip(updated, saved, strict=True):
                    u.copy_(s)
                return
            # Written by an engine without masters (DDP, or fp32): its weights are fp32.
            for name, p, m in self._pairs:
                if p is not m:
                    m.copy_(state["model"][name])
            if self.stage > 0:
                self._ds_optimizer.refresh_fp32_params()
