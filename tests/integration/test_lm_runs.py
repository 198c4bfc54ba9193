"""Real 2-worker torchrun runs of the Shakespeare GPT recipes (real text, gloo, W&B offline).

The default tier trains DiLoCo for 24 small steps and checks the LM metrics in every sink,
the exact validation average against an independent evaluation of the saved model, and the
W&B offline run files read back with W&B's own reader. The slow tier resumes a killed run
bitwise mid-epoch, runs the DeepSpeed engine against DDP, and trains the three tiny recipes
to below 2.8 bits per byte.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, free_port, torchrun, worker_env
from helpers import final_model, summary, wandb_records

from localsgd.recipe import load_config
from localsgd.report.files import read_metrics
from localsgd.tasks import build_task

TEXT = REPO.parent / "shared" / "data" / "shakespeare"
DILOCO = "recipes/shakespeare/gpt_tiny_diloco.yaml"
MINIBATCH = "recipes/shakespeare/gpt_tiny_minibatch.yaml"
FAULT = REPO / "tests/integration/fault_entry.py"
# 33 validation windows: 17 on rank 0 and 16 on rank 1, so a mean of the two ranks' means
# would differ from the exact mean over every token.
SMALL = ["data.context=32", "data.batch_size=8", "data.test_subset=33", "train.max_steps=24",
         "lr_schedule.warmup_steps=4", "train.eval_every_steps=8", "train.log_every_steps=4",
         "train.progress=false", "sync.period=4", "run.checkpoint_every_steps=0"]
TOKENS_PER_STEP = 2 * 8 * 32

pytestmark = pytest.mark.skipif(not TEXT.is_dir(), reason=f"no text corpus at {TEXT}")


@pytest.fixture(scope="session")
def text_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("text_cache")


def lm_args(recipe: str, run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [recipe, f"run.dir={run_dir}", f"data.root={TEXT}", f"data.cache_dir={cache}",
            *SMALL, *extra]


@pytest.fixture(scope="module")
def diloco(tmp_path_factory: pytest.TempPathFactory, text_cache: Path) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("lm") / "diloco"
    env = {k: v for k, v in worker_env().items() if not k.startswith("WANDB_")}
    env["WANDB_MODE"] = "offline"
    proc = torchrun(lm_args(DILOCO, run, text_cache, "train.target_loss=10.0",
                            "wandb.mode=offline"), env=env)
    return {"dir": run, "proc": proc, "cache": text_cache}


def test_lm_metrics_in_metrics_jsonl_summary_and_console(diloco: dict[str, Any]) -> None:
    run = diloco["dir"]
    records = read_metrics(run)
    evals = [r for r in records if r["event"] == "eval"]
    (epoch,) = [r for r in records if r["event"] == "epoch"]
    assert [r["step"] for r in evals] == [8, 16]
    for r in [*evals, epoch]:
        assert r["tokens"] == r["step"] * TOKENS_PER_STEP
        assert r["eval/bpb"] == pytest.approx(r["eval/loss"] / math.log(2), rel=1e-12)
        assert r["eval/ppl"] == pytest.approx(math.exp(r["eval/loss"]), rel=1e-12)
    # It learns: from uniform bytes (ln 256 = 5.55 nats) down.
    assert epoch["eval/loss"] < evals[0]["eval/loss"] < math.log(256)
    assert epoch["train/bpb"] == pytest.approx(epoch["train/loss"] / math.log(2), rel=1e-12)
    assert epoch["throughput/tokens_per_s"] > 0
    s = summary(run)
    assert s["tokens"] == 24 * TOKENS_PER_STEP and s["throughput/tokens_per_s"] > 0
    assert s["eval/loss"] == epoch["eval/loss"] and s["eval/bpb"] == epoch["eval/bpb"]
    assert s["eval/best_loss"] == min(r["eval/loss"] for r in [*evals, epoch])
    assert s["time/to_target_s"] is not None  # target_loss 10 nats: met at the first eval
    out = diloco["proc"].stdout
    assert "eval/bpb" in out and "tokens/s" in out


def test_validation_is_the_exact_mean_over_every_token(diloco: dict[str, Any]) -> None:
    """The run's eval/loss equals one process scoring the saved model on all 33 windows."""
    run = diloco["dir"]
    cfg = load_config(run / "config.yaml")
    task = build_task(cfg)
    data = task.datasets(allow_download=False)
    model = task.model(data)
    model.load_state_dict(final_model(run))  # synced at step 24: what was evaluated
    model.eval()
    loss_fn = task.loss_fn()
    per_window = []
    with torch.no_grad():
        for i in range(len(data.test)):
            x, y = data.test[i]
            per_window.append(float(loss_fn(model(x[None]), y[None])))
    assert len(per_window) == 33
    exact = sum(per_window) / 33
    shards = [per_window[0::2], per_window[1::2]]
    mean_of_means = sum(sum(s) / len(s) for s in shards) / 2
    got = summary(run)["eval/loss"]
    assert got == pytest.approx(exact, rel=1e-6)
    assert abs(got - exact) < abs(mean_of_means - exact) or mean_of_means == exact


def test_wandb_offline_run_holds_the_lm_metrics_on_a_tokens_axis(
        diloco: dict[str, Any]) -> None:
    log = wandb_records(diloco["dir"])
    history = [r["history"]["item"] for r in log if r["type"] == "history"]
    evals = [h for h in history if "eval/bpb" in h]
    records = [r for r in read_metrics(diloco["dir"]) if "eval/bpb" in r]
    assert [h["tokens"] for h in evals] == [r["tokens"] for r in records]
    assert [h["eval/bpb"] for h in evals] == pytest.approx([r["eval/bpb"] for r in records],
                                                           rel=1e-12)
    defined = {m.get("name") or m.get("glob_name"): m.get("step_metric")
               for m in (r["metric"] for r in log if r["type"] == "metric")}
    assert defined["eval/*"] == "tokens" and defined["tokens"] == "step"
    logged: dict[str, Any] = {}
    for r in log:
        if r["type"] == "summary":
            logged.update(r["summary"]["update"])
    s = summary(diloco["dir"])
    for key in ("eval/loss", "eval/bpb", "eval/ppl", "tokens", "throughput/tokens_per_s"):
        assert logged[key] == pytest.approx(s[key], rel=1e-12), key


def test_plots_draw_validation_loss_against_tokens(diloco: dict[str, Any],
                                                   tmp_path: Path) -> None:
    from localsgd.report.plots import collect_series, write_plots

    series = collect_series([diloco["dir"]])["val_loss_vs_tokens"]
    ((xs, ys),) = series.values()
    assert xs == [8 * TOKENS_PER_STEP, 16 * TOKENS_PER_STEP, 24 * TOKENS_PER_STEP]
    assert ys[-1] == summary(diloco["dir"])["eval/loss"]
    names = {p.name for p in write_plots([diloco["dir"]], tmp_path)}
    assert {"val_loss_vs_tokens.png", "val_loss_vs_bytes.png"} <= names
    assert "acc_vs_epoch.png" in names  # next-byte accuracy, from the epoch record


@pytest.mark.slow
def test_killed_lm_run_resumes_mid_epoch_bitwise(tmp_path: Path, text_cache: Path) -> None:
    common = ["run.checkpoint_every_steps=6", "lr_schedule.total_steps=24"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    torchrun(lm_args(DILOCO, clean, text_cache, *common))
    env = worker_env(FAULT_RANK="1", FAULT_STEP="15", FAULT_SIGNAL="KILL")
    launch = ["--nnodes=1:2", "--max-restarts=2", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-conf=last_call_timeout=1"]
    proc = torchrun(lm_args(DILOCO, killed, text_cache, *common), script=FAULT, env=env,
                    extra_launch=launch)
    assert "resumed from step 12" in proc.stdout, proc.stdout[-2000:]
    a, b = final_model(clean), final_model(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary(clean)["eval/loss"] == summary(killed)["eval/loss"]


@pytest.mark.slow
def test_deepspeed_stage0_trains_the_lm_like_ddp(tmp_path: Path, text_cache: Path) -> None:
    ddp, ds = tmp_path / "ddp", tmp_path / "ds"
    torchrun(lm_args(MINIBATCH, ddp, text_cache))
    torchrun(lm_args(MINIBATCH, ds, text_cache, "engine.name=deepspeed",
                     f"engine.deepspeed_config={REPO / 'deepspeed_configs/zero0_fp32.json'}"))
    a, b = final_model(ddp), final_model(ds)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert summary(ds)["eval/loss"] == pytest.approx(summary(ddp)["eval/loss"], rel=1e-4)
    assert summary(ds)["comm/grad/calls"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["gpt_tiny_minibatch", "gpt_tiny_diloco",
                                    "gpt_tiny_post_local"])
def test_tiny_recipes_learn_below_2_8_bits_per_byte(tmp_path: Path, text_cache: Path,
                                                    recipe: str) -> None:
    """The recipes as shipped (about 15 minutes each on 2 shared CPU cores)."""
    torchrun([f"recipes/shakespeare/{recipe}.yaml", f"run.dir={tmp_path / recipe}",
              f"data.root={TEXT}", f"data.cache_dir={text_cache}", "train.progress=false"],
             timeout=3600)
    assert summary(tmp_path / recipe)["eval/bpb"] < 2.8


def _replay_diloco(cfg: Any, world: int) -> dict[str, torch.Tensor]:
    """DiLoCo written out independently: per-worker AdamW (clipped, scheduled), every H
    steps the plain average, an outer Nesterov step from the anchor, every worker reset."""
    from localsgd.data import ResumableDistributedSampler
    from localsgd.train.optim import build_optimizer, build_scheduler, scaled_lr

    task = build_task(cfg)
    data = task.datasets(allow_download=False)
    torch.manual_seed(cfg.seed)
    first = task.model(data).to(torch.float64)
    models = [first] + [type(first)(**_gpt_kwargs(cfg)).to(torch.float64)
                        for _ in range(world - 1)]
    for m in models[1:]:
        m.load_state_dict(first.state_dict())
    b, h = cfg.data.batch_size, cfg.sync.period
    peak = scaled_lr(cfg.optim, world * b)
    samplers = [ResumableDistributedSampler(data.train, world, r, cfg.seed, b)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(0)
    orders = [list(s) for s in samplers]
    steps_per_epoch = len(orders[0]) // b
    opts = [build_optimizer(cfg.optim, m, peak) for m in models]
    scheds = [build_scheduler(cfg.lr_schedule, o, cfg.optim.base_lr, peak, steps_per_epoch,
                              cfg.train.epochs) for o in opts]
    anchor = [p.detach().clone() for p in first.parameters()]
    velocity = [torch.zeros_like(a) for a in anchor]
    o = cfg.sync.outer
    for step in range(1, cfg.train.max_steps + 1):
        for r, m in enumerate(models):
            batch = [data.train[i] for i in orders[r][(step - 1) * b:step * b]]
            x = torch.stack([x for x, _ in batch])
            y = torch.stack([y for _, y in batch])
            logits = m(x)
            torch.nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten()).backward()
            torch.nn.utils.clip_grad_norm_(list(m.parameters()), cfg.optim.grad_clip)
            opts[r].step()
            opts[r].zero_grad(set_to_none=True)
            scheds[r].step()
        if step % h == 0:
            params = [list(m.parameters()) for m in models]
            with torch.no_grad():
                for i, a in enumerate(anchor):
                    avg = sum(ps[i] for ps in params) / world
                    grad = a - avg
                    velocity[i].mul_(o.momentum).add_(grad)
                    a.sub_(grad + o.momentum * velocity[i], alpha=o.lr)
                    for ps in params:
                        ps[i].copy_(a)
    return {k: v.detach() for k, v in first.state_dict().items()}


def _gpt_kwargs(cfg: Any) -> dict[str, Any]:
    from localsgd.models.gpt import GPT_SIZES

    shape = GPT_SIZES[cfg.model.name.value]
    return {"vocab_size": 256, "context": cfg.data.context, "width": shape.width,
            "depth": shape.depth, "heads": shape.heads, "positions": cfg.model.positions.value,
            "tie_embeddings": cfg.model.tie_embeddings, "dropout": cfg.model.dropout}


@pytest.mark.slow
def test_diloco_lm_in_float64_equals_an_independent_replay(tmp_path: Path,
                                                           text_cache: Path) -> None:
    run = tmp_path / "f64"
    extra = ["model.dtype=float64", "train.max_steps=12", "lr_schedule.total_steps=12",
             "train.eval_every_steps=0", "optim.grad_clip=0.5"]
    torchrun(lm_args(DILOCO, run, text_cache, *extra))
    want = _replay_diloco(load_config(run / "config.yaml"), world=2)
    got = final_model(run)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12, msg=k)
