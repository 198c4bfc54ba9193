"""Reconciling a DeepSpeed JSON with the recipe, without importing DeepSpeed.

The recipe is the single source of truth for what it describes; the JSON says only how
DeepSpeed carries it out (precision, ZeRO stage, bucket sizes, logging). Policy:

* Keys the recipe owns are filled from it when absent (or ``"auto"``, as Hugging Face
  writes them) and are an error when present with a different value:
  ``train_micro_batch_size_per_gpu`` = ``data.batch_size``,
  ``gradient_accumulation_steps`` = ``train.grad_accum``,
  ``train_batch_size`` = world size x both, and ``gradient_clipping`` = ``optim.grad_clip``
  (0 by default; DeepSpeed's own default would clip at 1.0).
  ``managed_gradient_accumulation`` may only be true (the engine sets the boundary).
* ``optimizer`` and ``scheduler`` must be absent: the recipe's SGD (with its parameter
  groups and linearly scaled LR) is handed to DeepSpeed as the client optimizer, and the
  trainer steps the recipe's LR schedule on it. A JSON section could only duplicate or
  contradict them, so any is an error.
* ``zero_allow_untested_optimizer`` is filled with true for ZeRO stages 1-2 (DeepSpeed calls
  torch's SGD "untested"; its update is elementwise, so partitioning it is exact); false is
  an error.
* Precision: fp32, ``bf16`` (fp32 master weights, which are what local SGD averages) and
  ``torch_autocast`` with bfloat16 are supported. fp16 (``fp16``, fp16 autocast) and apex
  ``amp`` are rejected: DeepSpeed's CPU accelerator has no fp16, so that path cannot be
  exercised here, and its loss scaler skips steps per worker.
* ZeRO stages 1-2 need ``sync.algorithm=minibatch`` (they partition optimizer state and
  gradients, which local SGD keeps whole and different on every worker); stage 3 is
  rejected, as it partitions the weights the trainer evaluates, averages and saves.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localsgd.config.domains import PATH, domain
from localsgd.config.errors import ConfigError
from localsgd.registry import Facts

KEY = "engine.deepspeed_config"


@dataclass
class DeepSpeedKeys:
    deepspeed_config: str | None = domain(PATH, None)
    """Path to a DeepSpeed JSON config (engine deepspeed only)."""


_FP16_NAMES = {"fp16", "float16", "half", "torch.float16", "torch.half"}


def enabled(section: Any) -> bool:
    """Whether a DeepSpeed section such as ``{"enabled": true}`` is switched on."""
    return isinstance(section, dict) and bool(section.get("enabled", False))


def load_json(path: str) -> dict[str, Any]:
    """The JSON object in ``path`` (a fresh copy; an unchanged file is read once per
    process); ConfigError when it is missing or not an object."""
    try:
        st = Path(path).stat()
        version = (st.st_mtime_ns, st.st_size)
    except OSError:
        version = (0, -1)  # let the read report what is wrong
    return copy.deepcopy(_read_json(path, version))


@functools.lru_cache(maxsize=16)
def _read_json(path: str, version: tuple[int, int]) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{KEY}: file '{path}' does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{KEY}: cannot read '{path}' ({exc})"]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{KEY}: '{path}' is not valid JSON ({exc})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{KEY}: '{path}' must hold a JSON object, got "
                           f"{type(raw).__name__}"])
    return raw


def _grouped(facts: Facts) -> bool:
    """Whether ranks train in replica groups, whose ranks ZeRO then partitions over."""
    from localsgd.sync.sharding import grouped

    return grouped(facts.replica_group, facts)


def zero_stage(ds: dict[str, Any]) -> int:
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return stage if isinstance(stage, int) and not isinstance(stage, bool) else -1


def _reconcile(ds: dict[str, Any], path: str,
               facts: Facts) -> tuple[dict[str, Any], list[str]]:
    """(the JSON with recipe-owned keys filled, problems)."""
    micro_batch, grad_accum, world_size = facts.micro_batch, facts.grad_accum, facts.world_size
    if world_size is not None and _grouped(facts):
        # DeepSpeed's data-parallel world is one replica group: its batch is the group's.
        from localsgd.launch.replicas import group_size

        world_size = group_size(facts.replica_group, facts.local_world_size) or world_size
    out = dict(ds)
    p: list[str] = []
    where = f"{KEY}: '{path}'"

    def owned(key: str, value: Any, recipe_key: str, fill: bool = True) -> None:
        given = ds.get(key, "auto")
        if given == "auto":
            if fill:
                out[key] = value
            else:
                out.pop(key, None)
        elif given != value or isinstance(given, bool):
            p.append(f"{where} sets {key}={json.dumps(given)}, but the recipe's {recipe_key} "
                     f"gives {json.dumps(value)}; remove {key} from the JSON (it is filled "
                     f"from the recipe) or set it to {json.dumps(value)}")

    owned("train_micro_batch_size_per_gpu", micro_batch, f"data.batch_size={micro_batch}")
    owned("gradient_accumulation_steps", grad_accum, f"train.grad_accum={grad_accum}")
    if world_size is not None:
        owned("train_batch_size", world_size * micro_batch * grad_accum,
              f"world size {world_size} x data.batch_size={micro_batch} x "
              f"train.grad_accum={grad_accum}")
    else:
        given = ds.get("train_batch_size", "auto")
        if given != "auto" and (not isinstance(given, int) or isinstance(given, bool)
                                or given % (micro_batch * grad_accum) != 0):
            p.append(f"{where} sets train_batch_size={json.dumps(given)}, which is not a "
                     f"multiple of data.batch_size={micro_batch} x train.grad_accum="
                     f"{grad_accum}; remove train_batch_size (it is filled from the recipe)")
    clip = ds.get("gradient_clipping", "auto")
    if clip == "auto":
        out["gradient_clipping"] = float(facts.grad_clip)
    elif clip != facts.grad_clip or isinstance(clip, bool):
        p.append(f"{where} sets gradient_clipping={json.dumps(clip)}, but the recipe's "
                 f"optim.grad_clip gives {facts.grad_clip}; remove gradient_clipping from the "
                 "JSON (it is filled from optim.grad_clip) or set it to "
                 f"{float(facts.grad_clip)}")
    managed = ds.get("managed_gradient_accumulation", True)
    if managed is not True:
        p.append(f"{where} sets managed_gradient_accumulation={json.dumps(managed)}, but the "
                 "engine marks the accumulation boundary itself (the last of train.grad_accum "
                 "micro-batches); remove it")
    for key, owner in (("optimizer", "optim.*"), ("scheduler", "lr_schedule.*")):
        if key in ds:
            p.append(f"{where} has an '{key}' section, but the recipe's {owner} defines it "
                     f"and is handed to DeepSpeed as is; remove '{key}' from the JSON")

    bf16 = ds.get("bf16", ds.get("bfloat16"))
    autocast = ds.get("torch_autocast")
    # An fp16 autocast section is refused on its own below.
    mixed = enabled(bf16) or (enabled(autocast) and str(autocast.get("dtype", "")).lower()
                              not in _FP16_NAMES)
    if facts.precision == "fp16":
        p.append("model.precision: fp16 is not supported by the deepspeed engine: DeepSpeed's "
                 "CPU accelerator has no fp16 and its loss scaler skips steps per worker; use "
                 "model.precision=bf16 or fp32")
    elif mixed and facts.precision != "bf16":
        p.append(f"model.precision: {facts.precision}, but {where} trains in bf16; set "
                 "model.precision=bf16, or use a fp32 JSON (deepspeed_configs/zero0_fp32.json)")
    elif facts.precision == "bf16" and not mixed:
        if isinstance(bf16, dict) and "enabled" in bf16:
            p.append(f"model.precision: bf16, but {where} sets bf16.enabled=false; remove it "
                     "or set it to true")
        else:
            out["bf16"] = {**(bf16 if isinstance(bf16, dict) else {}), "enabled": True}
    if enabled(ds.get("fp16")):
        p.append(f"{where} enables fp16, which the deepspeed engine does not support: "
                 "DeepSpeed's CPU accelerator has no fp16 and its loss scaler skips steps per "
                 "worker; use bf16 (deepspeed_configs/zero0_bf16.json) or fp32")
    if enabled(autocast) and str(autocast.get("dtype", "")).lower() in _FP16_NAMES:
        p.append(f"{where} sets torch_autocast.dtype={autocast['dtype']}: fp16 is not "
                 "supported by the deepspeed engine; use dtype bfloat16 or the bf16 section")
    if enabled(ds.get("amp")):
        p.append(f"{where} enables apex amp, which the deepspeed engine does not support; "
                 "use bf16 instead")

    stage = zero_stage(ds)
    if stage not in (0, 1, 2, 3):
        p.append(f"{where} sets zero_optimization.stage="
                 f"{json.dumps(ds['zero_optimization'].get('stage'))}; use 0, 1 or 2")
    elif stage == 3:
        p.append(f"{where} sets zero_optimization.stage=3, which partitions the weights "
                 "themselves; the trainer evaluates, averages and saves whole models, so use "
                 "stage 0, 1 or 2")
    elif stage >= 1:
        if facts.compression != "none":
            p.append(f"{where} sets zero_optimization.stage={stage}, but "
                     f"sync.compression.method={facts.compression} compresses whole gradient "
                     "buckets and model deltas, which ZeRO partitions across workers; use a "
                     "stage-0 config (e.g. deepspeed_configs/zero0_fp32.json)")
        elif facts.topology != "complete":
            p.append(f"{where} sets zero_optimization.stage={stage}, but "
                     f"sync.topology={facts.topology} mixes whole models between neighbours, "
                     "and ZeRO partitions optimizer state (and gradients from stage 2) across "
                     "workers; use a stage-0 config (e.g. deepspeed_configs/zero0_fp32.json)")
        elif facts.local_steps and not _grouped(facts):
            p.append(f"{where} sets zero_optimization.stage={stage}, but "
                     f"sync.algorithm={facts.algorithm} trains a separate model on every "
                     "worker, and ZeRO partitions optimizer state (and gradients from stage 2) "
                     "across workers, which local SGD cannot use; use a stage-0 config (e.g. "
                     "deepspeed_configs/zero0_fp32.json), sync.algorithm=minibatch, or shard "
                     "inside replica groups with sync.replica_group=node (local SGD across "
                     "the groups; or engine.name=fsdp)")
        allow = ds.get("zero_allow_untested_optimizer", True)
        if allow is not True:
            p.append(f"{where} sets zero_allow_untested_optimizer={json.dumps(allow)}, but the "
                     "recipe's optimizer is torch.optim.SGD, which DeepSpeed runs under ZeRO "
                     "only with it set; remove it or set it to true")
        out["zero_allow_untested_optimizer"] = True
    return out, p


def check_deepspeed_config(path: str | None, facts: Facts) -> list[str]:
    """Problems of the recipe's DeepSpeed JSON, each naming the file, key and fix.

    ``train_batch_size`` is compared exactly only when the world size is known (at launch),
    else for divisibility.
    """
    if path is None:
        return [f"{KEY}: engine deepspeed needs a DeepSpeed JSON, e.g. "
                f"{KEY}=deepspeed_configs/zero0_fp32.json"]
    try:
        ds = load_json(path)
    except ConfigError as exc:
        return exc.problems
    return _reconcile(ds, path, facts)[1]


def resolve_deepspeed_config(path: str | None, facts: Facts) -> dict[str, Any]:
    """The dict to hand to ``deepspeed.initialize``, or ConfigError listing every problem."""
    if path is None:
        raise ConfigError(check_deepspeed_config(path, facts))
    resolved, problems = _reconcile(load_json(path), path, facts)
    if problems:
        raise ConfigError(problems)
    return resolved
