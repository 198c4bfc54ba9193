"""Range and cross-field rules; every violated rule is reported, each with its full key."""

from __future__ import annotations

from pathlib import Path

from localsgd.config.errors import ConfigError
from localsgd.config.schema import (
    Algorithm,
    Backend,
    Device,
    EngineName,
    LRDecay,
    RecipeConfig,
)


def _rules(cfg: RecipeConfig) -> list[str]:
    p: list[str] = []
    d, o, s, t, sy = cfg.data, cfg.optim, cfg.lr_schedule, cfg.train, cfg.sync

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(d.batch_size >= 1, f"data.batch_size: must be >= 1, got {d.batch_size}")
    need(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")
    for key in ("train_subset", "test_subset"):
        value = getattr(d, key)
        need(value is None or value >= 1, f"data.{key}: must be >= 1 or null, got {value}")
    need(d.image_size >= 8, f"data.image_size: must be >= 8, got {d.image_size}")
    need(d.synthetic_samples >= 1, f"data.synthetic_samples: must be >= 1, got "
                                   f"{d.synthetic_samples}")
    need(d.synthetic_classes >= 2, f"data.synthetic_classes: must be >= 2, got "
                                   f"{d.synthetic_classes}")

    need(o.base_lr > 0, f"optim.base_lr: must be > 0, got {o.base_lr}")
    need(o.base_batch_size >= 1, f"optim.base_batch_size: must be >= 1, got {o.base_batch_size}")
    need(0 <= o.momentum < 1, f"optim.momentum: must be in [0, 1), got {o.momentum}")
    need(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    need(not o.nesterov or o.momentum > 0,
         "optim.nesterov: Nesterov needs optim.momentum > 0; set optim.nesterov=false")

    need(t.epochs >= 1, f"train.epochs: must be >= 1, got {t.epochs}")
    need(t.grad_accum >= 1, f"train.grad_accum: must be >= 1, got {t.grad_accum}")
    need(t.max_steps is None or t.max_steps >= 1,
         f"train.max_steps: must be >= 1 or null, got {t.max_steps}")
    need(t.log_every_steps >= 1, f"train.log_every_steps: must be >= 1, got {t.log_every_steps}")
    need(t.eval_every_epochs >= 1,
         f"train.eval_every_epochs: must be >= 1, got {t.eval_every_epochs}")
    need(t.target_acc is None or 0 < t.target_acc <= 1,
         f"train.target_acc: must be in (0, 1] (a fraction, not a percentage), got {t.target_acc}")

    need(0 <= s.warmup_epochs < t.epochs or s.warmup_epochs == 0,
         f"lr_schedule.warmup_epochs: must be in [0, train.epochs={t.epochs}), "
         f"got {s.warmup_epochs}")
    need(0 < s.gamma <= 1, f"lr_schedule.gamma: must be in (0, 1], got {s.gamma}")
    if s.milestones:
        need(s.decay == LRDecay.multistep,
             f"lr_schedule.milestones: only used by decay=multistep (decay is {s.decay.value}); "
             "remove them or set lr_schedule.decay=multistep")
        need(list(s.milestones) == sorted(set(s.milestones)),
             f"lr_schedule.milestones: must be strictly increasing, got {list(s.milestones)}")
        need(all(0 < m <= t.epochs for m in s.milestones),
             f"lr_schedule.milestones: each must be in (0, train.epochs={t.epochs}], "
             f"got {list(s.milestones)}")

    need(sy.period >= 1, f"sync.period: must be >= 1, got {sy.period}")
    need(sy.block_period >= 1, f"sync.block_period: must be >= 1, got {sy.block_period}")
    need(sy.bucket_mb > 0, f"sync.bucket_mb: must be > 0, got {sy.bucket_mb}")
    alg = sy.algorithm
    if alg == Algorithm.minibatch:
        need(sy.period == 1, "sync.period: has no effect with sync.algorithm=minibatch; "
                             "remove it or choose local/post_local/hierarchical")
    need(alg == Algorithm.hierarchical or sy.block_period == 1,
         "sync.block_period: only used by sync.algorithm=hierarchical; remove it or set "
         "sync.algorithm=hierarchical")
    has_switch = sy.switch_epoch is not None or sy.switch_step is not None
    need(not (sy.switch_epoch is not None and sy.switch_step is not None),
         "sync.switch_step: give either sync.switch_epoch or sync.switch_step, not both")
    if alg == Algorithm.post_local:
        need(has_switch, "sync.switch_epoch: post_local needs a switch point; set "
                         "sync.switch_epoch (e.g. the first LR decay) or sync.switch_step")
    elif alg in (Algorithm.minibatch, Algorithm.local):
        need(not has_switch, f"sync.switch_epoch: a switch point has no effect with "
                             f"sync.algorithm={alg.value}; use post_local or remove it")
    if sy.switch_epoch is not None:
        need(0 <= sy.switch_epoch < t.epochs,
             f"sync.switch_epoch: must be in [0, train.epochs={t.epochs}), got "
             f"{sy.switch_epoch}; a switch after the last epoch never happens")
    if sy.switch_step is not None:
        need(sy.switch_step >= 0, f"sync.switch_step: must be >= 0, got {sy.switch_step}")

    e = cfg.engine
    if e.name == EngineName.deepspeed:
        if e.deepspeed_config is None:
            p.append("engine.deepspeed_config: engine deepspeed needs a DeepSpeed JSON, e.g. "
                     "engine.deepspeed_config=deepspeed_configs/zero0_fp32.json")
        elif not Path(e.deepspeed_config).is_file():
            p.append(f"engine.deepspeed_config: file '{e.deepspeed_config}' does not exist")
        else:
            # Lazy: checking a recipe must not import torch or DeepSpeed.
            from localsgd.engines.deepspeed_config import check_deepspeed_config

            p.extend(check_deepspeed_config(e, cfg.sync, cfg.data.batch_size,
                                            cfg.train.grad_accum))
    else:
        need(e.deepspeed_config is None,
             "engine.deepspeed_config: only used by engine.name=deepspeed; remove it or set "
             "engine.name=deepspeed")

    need(not (cfg.dist.backend == Backend.nccl and cfg.dist.device == Device.cpu),
         "dist.backend: nccl needs CUDA devices; use dist.backend=gloo with dist.device=cpu")
    need(cfg.dist.timeout_s > 0, f"dist.timeout_s: must be > 0, got {cfg.dist.timeout_s}")
    need(cfg.run.checkpoint_every_epochs >= 0,
         f"run.checkpoint_every_epochs: must be >= 0, got {cfg.run.checkpoint_every_epochs}")
    need(cfg.run.checkpoint_every_steps >= 0,
         f"run.checkpoint_every_steps: must be >= 0, got {cfg.run.checkpoint_every_steps}")
    need(cfg.run.keep_checkpoints >= 1,
         f"run.keep_checkpoints: must be >= 1, got {cfg.run.keep_checkpoints}")
    return p


def validate(cfg: RecipeConfig) -> None:
    problems = _rules(cfg)
    if problems:
        raise ConfigError(problems)


def validate_launch(cfg: RecipeConfig, world_size: int, local_world_size: int) -> None:
    """Rules that need the launcher's view: node layout for hierarchical local SGD."""
    p: list[str] = []
    if cfg.sync.algorithm == Algorithm.hierarchical:
        if world_size % local_world_size != 0:
            p.append(f"sync.algorithm: hierarchical needs every node to run the same number of "
                     f"workers; world size {world_size} is not a multiple of LOCAL_WORLD_SIZE "
                     f"{local_world_size} (torchrun --nproc-per-node)")
        elif world_size // local_world_size < 2:
            p.append("sync.algorithm: hierarchical needs at least 2 nodes (torchrun --nnodes>=2); "
                     "on one node use sync.algorithm=local")
    if cfg.engine.name == EngineName.deepspeed and cfg.engine.deepspeed_config is not None:
        from localsgd.engines.deepspeed_config import check_deepspeed_config

        p.extend(check_deepspeed_config(cfg.engine, cfg.sync, cfg.data.batch_size,
                                        cfg.train.grad_accum, world_size))
    if p:
        raise ConfigError(p)
