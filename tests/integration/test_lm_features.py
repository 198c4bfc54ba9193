"""The tiny GPT under the engines, precisions and sync features the image recipes have.

Default tier, in process (one worker, a one-process gloo group), a few steps on real
Shakespeare windows: bf16 autocast against fp32, ``train.compile`` against eager, and the
DeepSpeed engine in fp32 (equal to DDP) and bf16. Slow tier, under ``localsgd study`` (two
real torchrun jobs of 2 gloo workers, 30 s to 2.5 minutes on 2 shared cores):
the SparseLoCo recipe blocking and overlapped, whose compressed syncs send exactly the bytes
of the codec's formula on the GPT's tensors, and whose study table carries each run's bits
per byte. W&B offline files, bitwise resume and DeepSpeed on 2 workers are covered on the LM
by tests/integration/test_lm_runs.py.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import REPO, run_group, worker_env
from helpers import final_model, summary

from localsgd.cli import train_main
from localsgd.recipe import load_config
from localsgd.report.files import read_metrics
from localsgd.tasks import build_task

TEXT = REPO.parent / "shared" / "data" / "shakespeare"
RECIPES = REPO / "recipes" / "shakespeare"
BF16_JSON = str(REPO / "deepspeed_configs/zero0_bf16.json")
FP32_JSON = str(REPO / "deepspeed_configs/zero0_fp32.json")
STEPS = 6
SMALL = ["data.context=16", "data.batch_size=4", "data.test_subset=8",
         f"train.max_steps={STEPS}", "lr_schedule.warmup_steps=2", "train.eval_every_steps=0",
         "train.progress=false", "run.checkpoint_every_steps=0", "run.checkpoint_every_epochs=0",
         "wandb.mode=disabled"]

pytestmark = pytest.mark.skipif(not TEXT.is_dir(), reason=f"no text corpus at {TEXT}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("text_cache")


def train(run_dir: Path, cache: Path, *extra: str) -> dict[str, torch.Tensor]:
    """STEPS steps of gpt_tiny_minibatch in this process; returns the saved model."""
    args = [str(RECIPES / "gpt_tiny_minibatch.yaml"), f"run.dir={run_dir}",
            f"data.root={TEXT}", f"data.cache_dir={cache}", *SMALL, *extra]
    assert train_main(args) == 0
    return final_model(run_dir)


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("fp32") / "r"
    return {"model": train(run, cache), "summary": summary(run)}


def test_it_learns_at_all(fp32: dict[str, Any]) -> None:
    """The reference the other runs are held to has moved off the uniform byte model."""
    assert fp32["summary"]["eval/loss"] < math.log(256) - 0.1


def test_bf16_autocast_trains_close_to_fp32_and_keeps_fp32_weights(
        tmp_path: Path, cache: Path, fp32: dict[str, Any]) -> None:
    model = train(tmp_path, cache, "model.precision=bf16")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in model.values())
    # Not vacuous: bf16 matmuls change the trajectory, but not by more than a few updates.
    assert 0 < worst(model, fp32["model"]) < 0.05
    assert summary(tmp_path)["eval/loss"] == pytest.approx(fp32["summary"]["eval/loss"],
                                                           abs=0.05)


GRAPHS: list[int] = []
"""Nodes of every graph the counting backend was handed."""


def _counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    from torch._dynamo.backends.registry import lookup_backend

    GRAPHS.append(len(gm.graph.nodes))
    return lookup_backend("aot_eager")(gm, example_inputs)


torch._dynamo.register_backend(_counting_backend, name="localsgd_test_lm_counting")


def test_compiled_gpt_trains_like_eager_and_saves_the_plain_module(
        tmp_path: Path, cache: Path, fp32: dict[str, Any]) -> None:
    torch._dynamo.reset()  # a cached graph of an earlier test would be reused uncounted
    GRAPHS.clear()
    model = train(tmp_path, cache, "train.compile=true",
                  "train.compile_backend=localsgd_test_lm_counting")
    assert GRAPHS and sum(GRAPHS) > 100  # four blocks of attention and MLP, not a stub
    assert not any("_orig_mod" in k or k.startswith("module.") for k in model)
    assert worst(model, fp32["model"]) < 1e-5


@pytest.fixture
def fresh_deepspeed() -> Iterator[None]:
    """DeepSpeed keeps the groups of an earlier in-process engine in module globals, stale
    once that run destroyed its process group: released before and after each run, so any
    number of in-process DeepSpeed runs (this file's and others') share one pytest process."""
    pytest.importorskip("deepspeed")
    from localsgd.engines.deepspeed import _release_deepspeed_groups

    _release_deepspeed_groups()
    yield
    _release_deepspeed_groups()


@pytest.mark.usefixtures("fresh_deepspeed")
def test_deepspeed_fp32_trains_the_gpt_like_ddp(tmp_path: Path, cache: Path,
                                                fp32: dict[str, Any]) -> None:
    model = train(tmp_path, cache, "engine.name=deepspeed",
                  f"engine.deepspeed_config={FP32_JSON}")
    assert worst(model, fp32["model"]) < 1e-5
    assert summary(tmp_path)["eval/bpb"] == pytest.approx(fp32["summary"]["eval/bpb"],
                                                          rel=1e-5)


@pytest.mark.usefixtures("fresh_deepspeed")
def test_deepspeed_bf16_trains_the_gpt_close_to_fp32(tmp_path: Path, cache: Path,
                                                     fp32: dict[str, Any]) -> None:
    model = train(tmp_path, cache, "engine.name=deepspeed", "model.precision=bf16",
                  f"engine.deepspeed_config={BF16_JSON}")
    assert all(torch.isfinite(t).all() for t in model.values())
    assert summary(tmp_path)["eval/loss"] == pytest.approx(fp32["summary"]["eval/loss"],
                                                           abs=0.05)


# SparseLoCo at H=3 over 2 workers: 4 syncs in 12 steps, the last at the final step.
PERIOD, STUDY_STEPS = 3, 12


def study_file(cache: Path, out: Path) -> str:
    overrides = [f"data.root={TEXT}", f"data.cache_dir={cache}",
                 *(s for s in SMALL if "max_steps" not in s),
                 f"train.max_steps={STUDY_STEPS}", f"sync.period={PERIOD}"]
    return (f"name: lm_features\nrecipe: {RECIPES / 'gpt_tiny_sparseloco.yaml'}\n"
            f"dir: {out}\nlaunch: [--standalone, --nproc-per-node=2]\n"
            f"overrides: [{', '.join(overrides)}]\n"
            "variants:\n  blocking: []\n  overlapped: [sync.overlap_steps=1]\n")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    root = tmp_path_factory.mktemp("study")
    path = root / "study.yaml"
    path.write_text(study_file(cache, root / "out"))
    proc = run_group([sys.executable, "-m", "localsgd", "study", str(path)],
                     env=worker_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "out"


def codec_bytes(numels: list[int], chunk: int, ratio: float, bits: int) -> int:
    """One sync's payload by the formula of docs/compression.md, written out here: per chunk
    of L elements of each tensor ceil(ratio L) values, their places in ceil(log2 chunk) bits
    and their codes in ``bits`` bits, each packed into 32-bit words over the bucket, and a
    codebook of 2^bits float32 per tensor."""
    kept = sum(max(1, math.ceil(ratio * min(chunk, n - s) - 1e-9))
               for n in numels for s in range(0, n, chunk))
    return 4 * (len(numels) * 2**bits + math.ceil(kept * bits / 32)
                + math.ceil(kept * math.ceil(math.log2(chunk)) / 32))


@pytest.mark.slow
def test_sparseloco_blocking_and_overlapped_send_the_codec_formula(study: Path) -> None:
    cfg = load_config(study / "blocking" / "config.yaml")
    c = cfg.sync.compression
    task = build_task(cfg)
    numels = [p.numel() for p in task.model(task.datasets(allow_download=False)).parameters()]
    per_sync = codec_bytes(numels, c.chunk, c.ratio, c.bits)
    assert per_sync * 100 < 4 * sum(numels)  # under 1/100 of an fp32 average
    runs = {v: summary(study / v) for v in ("blocking", "overlapped")}
    # Blocking: the sync at the last step leaves the workers on one model. Overlapped
    # corrections keep each worker's local progress, so the run ends with one more sync
    # (the runner's closing average, compressed like the others).
    syncs = {"blocking": STUDY_STEPS // PERIOD, "overlapped": STUDY_STEPS // PERIOD + 1}
    for variant, s in runs.items():
        assert s["comm/average/calls"] == syncs[variant]
        assert s["comm/average/bytes"] == syncs[variant] * per_sync
        assert s["sync/extra_bytes/reducer"] > 0  # the error-feedback residuals
        assert s["eval/loss"] < math.log(256)
    # Overlapped: each sync's result lands a step late, so something was in flight and the
    # workers trained on from a different model.
    assert runs["blocking"]["sync/extra_bytes/in_flight"] == 0
    assert runs["overlapped"]["sync/extra_bytes/in_flight"] > 0
    assert worst(final_model(study / "blocking"), final_model(study / "overlapped")) > 0


@pytest.mark.slow
def test_study_table_carries_each_runs_bits_per_byte(study: Path) -> None:
    rows = {r["variant"]: r for r in csv.DictReader((study / "study.csv").open())}
    assert set(rows) == {"blocking", "overlapped"}
    for variant, row in rows.items():
        final = [r for r in read_metrics(study / variant) if r["event"] == "epoch"][-1]
        assert float(row["final_bpb_mean"]) == pytest.approx(final["eval/bpb"], rel=1e-9)
        assert final["eval/bpb"] == pytest.approx(final["eval/loss"] / math.log(2), rel=1e-12)
    assert "final eval bits/byte" in (study / "study.md").read_text()
