"""The training loop: set-up in order, then epochs of steps, syncs, evaluations, checkpoints."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm

from localsgd.config.errors import ConfigError
from localsgd.data import DataError, build_eval_loader
from localsgd.data.device import build_train_pipeline
from localsgd.engines import EngineContext, build_engine
from localsgd.launch.env import DistInfo
from localsgd.launch.replicas import build_replicas
from localsgd.recipe import RecipeConfig, facts, to_yaml
from localsgd.report.base import Reporters
from localsgd.report.build import build_reporters
from localsgd.sync.accounting import CommMeter
from localsgd.sync.controller import SyncController, SyncObserver
from localsgd.sync.grad_compression import CompressedGrads
from localsgd.sync.parts import EvalModel
from localsgd.sync.sharding import engine_shards
from localsgd.tasks import build_task
from localsgd.train.checkpoint import Checkpointer
from localsgd.train.evaluate import evaluate
from localsgd.train.optim import LRCurve, build_optimizer, build_scheduler, scaled_lr
from localsgd.train.running import RunningStats
from localsgd.train.state import TrainState, rng_state, set_rng_state
from localsgd.train.timing import build_timer

_profiling = torch._C._autograd._profiler_enabled
"""True while a torch profiler records (a C call: no Python frame on the step's path)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


class Trainer:
    def __init__(self, cfg: RecipeConfig, info: DistInfo,
                 observers: list[SyncObserver] | None = None) -> None:
        self.cfg = cfg
        self.info = info
        self.observers = list(observers or [])
        self.device = info.device
        self.run_dir = Path(cfg.run.dir)
        self.meter = CommMeter()
        self.timer = build_timer(self.device, cfg.train.track_time)
        self.state = TrainState()
        self.last_eval: dict[str, float] = {}
        self.merged = False
        """Resumed from a checkpoint of another world size (so not a plain re-launch)."""
        self.task = build_task(cfg)
        """The workload: datasets, model, loss and metric names (``localsgd.tasks``)."""

    def _agree(self, ok: bool) -> bool:
        """True only if every rank says ok (so all ranks raise together, none hangs)."""
        flag = torch.tensor([1 if ok else 0], device=self.device)
        with self.meter.timed("other", flag.numel() * flag.element_size()):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    # set-up -----------------------------------------------------------------------------
    def _make_run_dir(self) -> None:
        ok = True
        if self.info.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            except OSError as exc:
                ok = False
                err = exc
        if not self._agree(ok):
            msg = f"cannot write to '{self.run_dir}'" + (f" ({err})" if self.info.is_main else "")
            raise ConfigError([f"run.dir: {msg}; choose a writable directory with run.dir=PATH"])

    def _load_data(self) -> None:
        error: DataError | None = None
        if self.info.is_main:  # only rank 0 may download; the others wait for it
            try:
                self.data = self.task.datasets(allow_download=True)
            except DataError as exc:
                error = exc
        if not self._agree(error is None):
            raise error or DataError("rank 0 could not load the dataset (see its error)")
        if not self.info.is_main:
            self.data = self.task.datasets(allow_download=False)

    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        self._make_run_dir()
        self._load_data()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.dtype = getattr(torch, cfg.model.dtype.value)
        # Batches take the model's layout (build_model lays out a channels_last model).
        self.layout = torch.channels_last if cfg.model.channels_last else torch.preserve_format
        self.model = self.task.model(self.data).to(self.device, self.dtype)
        self.loader, self.sampler = build_train_pipeline(
            self.data, cfg.data, info.rank, info.world_size, cfg.seed, self.device, self.layout)
        self.steps_per_epoch = len(self.loader) // cfg.train.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError([f"train.grad_accum: {cfg.train.grad_accum} micro-batches per "
                               f"step exceed the {len(self.loader)} batches per epoch; lower it"])
        global_batch = info.world_size * cfg.data.batch_size * cfg.train.grad_accum
        self.peak_lr = scaled_lr(cfg.optim, global_batch)
        self.optimizer = build_optimizer(cfg.optim, self.model, self.peak_lr)
        self.scheduler = build_scheduler(cfg.lr_schedule, self.optimizer, cfg.optim.base_lr,
                                         self.peak_lr, self.steps_per_epoch, cfg.train.epochs)
        grads = (CompressedGrads(cfg.sync.compression, self.meter, info.world_size)
                 if cfg.sync.compression.method != "none" and info.world_size > 1 else None)
        known = facts(cfg, info.world_size, info.local_world_size)
        # Ranks of one replica group step as one worker; the sync runs across the groups.
        self.replicas = build_replicas(cfg.sync.replica_group, info, engine_shards(known))
        self.engine = build_engine(cfg.engine, EngineContext(
            self.model, self.optimizer, info, self.meter, known, grads, self.replicas))
        lr_at = LRCurve(cfg.lr_schedule, cfg.optim.base_lr, self.peak_lr,
                        self.steps_per_epoch, cfg.train.epochs)
        self.controller = SyncController.build(cfg.sync, self.replicas.sync_info(), self.meter,
                                               self.steps_per_epoch, self.observers, lr_at)
        self.schedule = self.controller.schedule
        self.averaged_eval = cfg.sync.eval_model == EvalModel.averaged
        # A sharded model's forward is a collective of its group, so the group's ranks
        # score the same test shard: every sum is S times the group's, the metrics
        # (ratios of sums) are unchanged.
        eval_rank, eval_world = ((self.replicas.index, self.replicas.groups)
                                 if engine_shards(known) else (info.rank, info.world_size))
        self.eval_loader = build_eval_loader(
            self.data.test, max(256, cfg.data.batch_size), eval_rank, eval_world,
            shard=self.averaged_eval, num_workers=cfg.data.num_workers)
        eval_copy = getattr(self.engine, "eval_copy", None)  # a sharded engine's own
        self.eval_module = ((eval_copy() if eval_copy else copy.deepcopy(self.engine.module))
                            if self.averaged_eval and info.world_size > 1 else None)
        self.checkpointer = Checkpointer(self.run_dir, info.rank, info.world_size,
                                         cfg.run.keep_checkpoints, self.meter)
        self.reporters = build_reporters(cfg, self.run_dir, info) if info.is_main else Reporters([])
        if cfg.run.resume:
            self._resume()
        self.controller.begin(self.engine)

    # checkpoints ------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict(), "scheduler": self.scheduler.state_dict(),
                "sync": self.controller.state_dict(), "meter": self.meter.state_dict(),
                "rng": rng_state(), "trainer": self.state.state_dict()}

    def _save_checkpoint(self) -> None:
        # A checkpoint is only worth keeping if training could go on from it.
        finite = all(bool(torch.isfinite(p).all()) for p in self.engine.sync_params())
        if not self._agree(finite):
            raise TrainingError(f"parameters became non-finite by step {self.controller.step} "
                                f"(epoch {self.state.epoch}); lower optim.base_lr. The last "
                                "checkpoint was left intact.")
        self.checkpointer.save(self.controller.step, self._state())

    def _resume(self) -> None:
        found = self.checkpointer.load_latest(self.device)
        if found is None:
            return
        states, old_world = found
        self.merged = old_world != self.info.world_size
        if not self.merged:
            state = states[0]
            self.engine.load_state_dict(state["engine"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.controller.load_state_dict(state["sync"], self.checkpointer.loaded)
            self.state.load_state_dict(state["trainer"])
        else:
            # Another world size: start from the average of the old workers' models (and
            # momentum) at the beginning of the checkpoint's epoch, re-partitioned over the new
            # workers; the per-worker batch stays, so the LR follows the new global batch.
            # A sharded engine merges only the old ranks that held this rank's shard.
            states = self.engine.merge_sources(states)
            state = states[0]
            self.engine.load_state_dict(type(self.engine).merge_states(
                [s["engine"] for s in states]))
            self.state.load_state_dict(state["trainer"])
            self.state.epoch_step = 0
            self.state.stats.zero_()
            self.controller.load_merged([s["sync"] for s in states],
                                        self.state.epoch * self.steps_per_epoch,
                                        self.checkpointer.loaded)
            for _ in range(self.controller.step):
                self.scheduler.step()
        self.meter.load_state_dict(state["meter"])
        set_rng_state(state["rng"])
        if self.info.is_main and (self.merged or not self._done()):
            tqdm.write(f"resumed from step {self.controller.step} (epoch {self.state.epoch}, "
                       f"written by {old_world} workers, now {self.info.world_size})")

    # the loop -----------------------------------------------------------------------------
    def _done(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return self.state.epoch >= self.cfg.train.epochs or (
            max_steps is not None and self.controller.step >= max_steps)

    def train(self) -> dict[str, Any]:
        finished = self.controller.step > 0 and self._done()
        if finished and not self.merged and self._agree(
                not self.info.is_main or (self.run_dir / "summary.json").is_file()):
            self._already_complete()
            return {}
        if self.info.is_main:
            tqdm.write(f"resolved recipe:\n{to_yaml(self.cfg)}")
        start = time.perf_counter() - self.state.elapsed
        while not self._done():
            self._train_epoch(start)
        self.controller.finish(self.engine)
        events = self.controller.pop_events()
        if events:
            self._log_syncs(events, self._mean_over_ranks([e.distance for e in events]))
        if finished:
            # Nothing was left to train (stopped after the last checkpoint but before the
            # summary, or resumed by another world size at the end): evaluate for the summary.
            self._evaluate()
        return self._finish(time.perf_counter() - start)

    def _already_complete(self) -> None:
        """A re-launch of a finished run: one line, nothing rewritten."""
        if not self.info.is_main:
            return
        key = self.task.headline
        value: Any = None
        try:
            value = json.loads((self.run_dir / "summary.json").read_text()).get(key)
        except (OSError, ValueError):
            pass
        shown = f"final {key} {value:.4f}" if isinstance(value, float) else "no summary.json"
        print(f"localsgd: {self.run_dir} is already complete (step {self.controller.step}, "
              f"{shown}); to train again use run.resume=false or another run.dir", flush=True)

    def close(self) -> None:
        """Flush and close the sinks, also when training stopped on an error."""
        reporters = getattr(self, "reporters", None)
        if reporters is not None:
            reporters.close()
            self.reporters = Reporters([])

    def _train_epoch(self, start: float) -> None:
        cfg, info, st = self.cfg, self.info, self.state
        self.sampler.set_epoch(st.epoch)
        # Mid-epoch resume: the sampler drops the batches this epoch already consumed.
        self.sampler.set_resume(st.epoch, st.epoch_step * cfg.train.grad_accum)
        if st.epoch_step == 0:
            st.stats.zero_()
            st.epoch_seconds = 0.0
            st.epoch_comm_bytes = self.meter.flat()["comm/bytes"]
        self.engine.train()
        loss_fn = self.task.loss_fn()
        stats = RunningStats(st.stats)
        resumed_at = time.perf_counter()
        batches = iter(self.loader)
        bar = tqdm(total=self.steps_per_epoch, initial=st.epoch_step, desc=f"epoch {st.epoch}",
                   leave=False, disable=not (cfg.train.progress and info.is_main))
        every = cfg.run.checkpoint_every_steps
        while st.epoch_step < self.steps_per_epoch and not self._done():
            # A named scope per step lets profiler traces attribute every collective to a step;
            # with no profiler running nothing would record it, and it costs ten Python calls.
            if _profiling():
                with record_function(f"localsgd.step.{self.controller.step}"):
                    loss_t = self._train_step(batches, loss_fn, stats)
            else:
                loss_t = self._train_step(batches, loss_fn, stats)
            st.epoch_step += 1
            bar.update(1)
            if self.controller.step % cfg.train.log_every_steps == 0:
                # Reading the loss waits for the device, so it happens only every
                # log_every_steps steps; a checkpoint checks the parameters itself.
                loss = self._checked_loss(loss_t)
                stats.fold()  # the device is done with these steps already
                if info.is_main:
                    bar.set_postfix(loss=f"{loss:.3f}")
                    self.reporters.log({
                        "event": "step", "step": self.controller.step,
                        "epoch": st.epoch + st.epoch_step / self.steps_per_epoch,
                        "train/loss_rank0": loss, "lr": self.optimizer.param_groups[0]["lr"],
                        "time/wall_s": time.perf_counter() - start})
            evals = cfg.train.eval_every_steps
            if evals and self.controller.step % evals == 0 and (
                    st.epoch_step < self.steps_per_epoch and not self._done()):
                # Before a checkpoint of the same step, which then holds its RNG draws.
                self._eval_record(start)
            if every and self.controller.step % every == 0 and (
                    st.epoch_step < self.steps_per_epoch and not self._done()):
                # Epoch ends save in _end_epoch, after the epoch's records are complete.
                stats.fold()
                st.elapsed = time.perf_counter() - start
                st.epoch_seconds += time.perf_counter() - resumed_at
                resumed_at = time.perf_counter()
                self._save_checkpoint()
        bar.close()
        stats.fold()
        st.epoch_seconds += time.perf_counter() - resumed_at
        st.epoch += 1
        st.epoch_step = 0
        self._end_epoch(st.stats, start)

    def _train_step(self, batches: Iterator[Any], loss_fn: nn.Module,
                    stats: RunningStats) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; returns the last loss
        (detached, as the engine hands it over)."""
        accum = self.cfg.train.grad_accum
        sync = self.controller.grad_sync()
        for micro in range(accum):
            with self.timer.phase("data"):
                x, y = self.task.to_device(*next(batches), self.device, self.dtype,
                                           self.layout)
            loss, logits = self.engine.forward_backward(
                x, y, loss_fn, 1.0 / accum, sync and micro == accum - 1, self.timer)
            stats.add(loss, logits.argmax(-1) == y, y.numel())
        with self.timer.phase("comm_opt"):
            self.engine.optimizer_step()
            self.scheduler.step()
            self.controller.after_step(self.engine)
        return loss

    def _checked_loss(self, loss: torch.Tensor) -> float:
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingError(
                f"loss is {value} in step {self.controller.step} (epoch {self.state.epoch}; "
                f"checked every train.log_every_steps={self.cfg.train.log_every_steps} steps); "
                "lower optim.base_lr or check the data. The last checkpoint was left intact.")
        return value

    def _end_epoch(self, stats: torch.Tensor, start: float) -> None:
        cfg, info, st = self.cfg, self.info, self.state
        events = self.controller.pop_events()
        # One collective carries the epoch's train sums and every sync's distance.
        packed = self._sum_over_ranks([*stats.tolist(), *(e.distance for e in events)])
        loss_sum, correct, count = packed[:3]
        distances = [d / info.world_size for d in packed[3:]]
        record: dict[str, Any] = {
            "event": "epoch", "epoch": st.epoch, "step": self.controller.step,
            **self._progress(),
            **self.task.metrics("train", loss_sum, correct, count),
            "lr": self.optimizer.param_groups[0]["lr"],
            "sync/phase": self.schedule.phase(max(self.controller.step - 1, 0)),
            "sync/period": self.schedule.effective_period(max(self.controller.step - 1, 0)),
            "sync/count": len(events),
            **self.task.throughput(count, st.epoch_seconds),
            **self.timer.pop(),
        }
        measured = [d for d in distances if not math.isnan(d)]
        if measured:  # gossip syncs that were not measured carry nan
            record["sync/consensus_distance"] = sum(measured) / len(measured)
        comm_now = self.meter.flat()
        record.update(comm_now)
        record["comm/epoch_bytes"] = comm_now["comm/bytes"] - st.epoch_comm_bytes
        if st.epoch % cfg.train.eval_every_epochs == 0 or self._done():
            record.update(self._evaluate())
            self._track(record, start)
        st.elapsed = time.perf_counter() - start
        record["time/wall_s"] = st.elapsed
        self._log_syncs(events, distances)
        self.reporters.log(record)
        every, every_steps = cfg.run.checkpoint_every_epochs, cfg.run.checkpoint_every_steps
        if (every and (st.epoch % every == 0 or self._done())) or (
                every_steps and self.controller.step % every_steps == 0):
            self._save_checkpoint()

    def _progress(self) -> dict[str, Any]:
        """Samples (and tokens) consumed so far over all workers, for the x axes."""
        samples = self.controller.step * self.info.world_size * self.cfg.data.batch_size \
            * self.cfg.train.grad_accum
        return dict(self.task.progress(samples))

    def _track(self, evaluated: dict[str, Any], start: float) -> None:
        """Best values so far and the first time the targets were met."""
        st, t = self.state, self.cfg.train
        acc, loss = evaluated["eval/acc"], evaluated["eval/loss"]
        st.best_acc = max(st.best_acc, acc)
        st.best_loss = loss if st.best_loss is None else min(st.best_loss, loss)
        if st.time_to_target is None and (t.target_acc is not None or t.target_loss is not None) \
                and (t.target_acc is None or acc >= t.target_acc) \
                and (t.target_loss is None or loss <= t.target_loss):
            st.time_to_target = time.perf_counter() - start

    def _eval_record(self, start: float) -> None:
        """A mid-epoch evaluation (train.eval_every_steps), logged as an "eval" record."""
        st = self.state
        record: dict[str, Any] = {
            "event": "eval", "step": self.controller.step,
            "epoch": st.epoch + st.epoch_step / self.steps_per_epoch, **self._progress(),
            **self._evaluate()}
        self._track(record, start)
        record["comm/bytes"] = self.meter.flat()["comm/bytes"]
        record["time/wall_s"] = time.perf_counter() - start
        self.reporters.log(record)

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        packed = torch.tensor(values, dtype=torch.float64, device=self.device)
        with self.meter.timed("other", packed.numel() * packed.element_size()):
            dist.all_reduce(packed)
        return packed.tolist()

    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        return [v / self.info.world_size for v in self._sum_over_ranks(values)]

    def _log_syncs(self, events: list[Any], distances: list[float]) -> None:
        """One record per sync with the mean over workers of the consensus distance."""
        for e, d in zip(events, distances, strict=True):
            record = {"event": "sync", "step": e.step, "sync/action": e.action,
                      "sync/period": self.schedule.effective_period(max(e.step - 1, 0))}
            if not math.isnan(d):  # a gossip sync that was not measured has no distance
                record["sync/consensus_distance"] = d
            self.reporters.log(record)

    def _evaluate(self) -> dict[str, float]:
        if self.averaged_eval:
            model = self.engine.module
            if self.eval_module is not None:
                # An engine whose sync tensors are not the module's says what to copy.
                target = getattr(self.engine, "eval_target", None)
                self.controller.averaged_copy(target() if target else self.engine,
                                              self.eval_module)
                model = self.eval_module
            totals = evaluate(model, self.eval_loader, self.device, self.dtype, self.layout)
        else:
            # Every rank scores its own model on the full test set; the mean is reported.
            totals = evaluate(self.engine.module, self.eval_loader, self.device, self.dtype,
                              self.layout)
        with self.meter.timed("other", totals.numel() * totals.element_size()):
            dist.all_reduce(totals)
        loss_sum, correct, count = totals.tolist()
        # Sums over ranks, then one division: the exact mean over every held-out unit.
        self.last_eval = {**self.task.metrics("eval", loss_sum, correct, count),
                          "eval/model": self.cfg.sync.eval_model.value}
        return dict(self.last_eval)

    def _finish(self, wall: float) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        progress = self._progress()
        samples = progress["samples"]
        final = {k: v for k, v in self.last_eval.items() if k != "eval/model"}
        summary: dict[str, Any] = {
            "eval/acc": self.last_eval.get("eval/acc"), "eval/best_acc": self.state.best_acc,
            "eval/loss": self.last_eval.get("eval/loss"), **final,
            "eval/best_loss": self.state.best_loss, **progress,
            "time/wall_s": wall,
            **self.task.throughput(samples * self.task.units_per_sample(), wall),
            "step": self.controller.step, "epoch": self.state.epoch,
            "world_size": info.world_size, "sync/algorithm": cfg.sync.algorithm,
            "sync/topology": cfg.sync.topology,
            "time/to_target_s": self.state.time_to_target,
            "sync/extra_bytes": self.controller.extra_bytes(),
            # What holds it: buckets, in_flight, anchor, update (outer momentum), reducer
            # (error-feedback residuals, CHOCO's public copies).
            **{f"sync/extra_bytes/{k}": v for k, v in self.controller.extra_memory().items()},
            **self.meter.flat(),
        }
        # A sharded engine gathers the whole model (every rank takes part).
        full = getattr(self.engine, "full_state_dict", None)
        model_state = full() if full is not None else None
        if info.is_main:
            torch.save(model_state if model_state is not None
                       else self.engine.module.state_dict(), self.run_dir / "model.pt")
            self.reporters.summary(summary)
            tqdm.write(self.meter.summary_line())
        return summary
