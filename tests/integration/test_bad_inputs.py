"""Bad recipes, overrides and launches: each exits non-zero with one message that names the
key or file and the fix, and no Python traceback.

The table runs the worker entry (``train_main``, what ``torchrun_entry.py`` calls) in this
process with the file descriptors captured, so a traceback from anywhere would show; a few
cases also run as real processes, and launches with several workers run under torchrun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ENTRY, REPO, torchrun, worker_env

from localsgd.cli import main, train_main

TINY = "recipes/tests/tiny_synthetic.yaml"


def _files(tmp: Path) -> dict[str, str]:
    """Broken inputs written fresh for each case."""
    (tmp / "zero1.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    (tmp / "mb7.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 7}))
    (tmp / "bad.yaml").write_text("train: [epochs: 3\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "base_missing.yaml").write_text("base: nowhere.yaml\n")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp / "twice.yaml").write_text("train:\n  epochs: 1\n  epochs: 2\n")
    (tmp / "ro").mkdir(mode=0o500, exist_ok=True)
    (tmp / "empty_data").mkdir(exist_ok=True)
    (tmp / "afile").write_text("not a directory")
    return {"tmp": str(tmp)}


# (id, recipe, overrides, text the one message must contain)
CASES: list[tuple[str, str, list[str], str]] = [
    ("unknown-key", TINY, ["train.epoch=3"], "train.epoch: unknown key; did you mean"),
    ("misspelled-key", TINY, ["sync.perod=4"], "did you mean 'sync.period'"),
    ("unknown-section", TINY, ["trainer.epochs=3"], "trainer.epochs: unknown key"),
    ("wrong-type-int", TINY, ["sync.period=four"], "sync.period: invalid value"),
    ("wrong-type-float", TINY, ["optim.base_lr=fast"], "optim.base_lr: invalid value"),
    ("wrong-type-bool", TINY, ["data.augment=maybe"], "data.augment: invalid value"),
    ("bad-model", TINY, ["model.name=resnet21"], "model.name: invalid value"),
    ("bad-algorithm", TINY, ["sync.algorithm=locall"],
     "sync.algorithm: unknown value 'locall'; did you mean 'local'"),
    ("bad-engine", TINY, ["engine.name=ddq"], "engine.name: unknown value 'ddq'"),
    ("lr-infinite", TINY, ["optim.base_lr=inf"], "optim.base_lr: must be a finite number"),
    ("h-zero", TINY, ["sync.algorithm=local", "sync.period=0"], "sync.period: must be >= 1"),
    ("h-negative", TINY, ["sync.algorithm=local", "sync.period=-4"], "sync.period: must be"),
    ("batch-zero", TINY, ["data.batch_size=0"], "data.batch_size: must be >= 1"),
    ("switch-after-end", TINY, ["sync.algorithm=post_local", "sync.switch_epoch=2"],
     "sync.switch_epoch: must be in [0, train.epochs=2)"),
    ("no-switch", TINY, ["sync.algorithm=post_local"], "sync.switch_epoch: post_local needs"),
    ("two-switches", TINY, ["sync.algorithm=post_local", "sync.switch_epoch=1",
                            "sync.switch_step=3"], "sync.switch_step: give either"),
    ("momentum-range", TINY, ["optim.momentum=1.0"], "optim.momentum: must be in [0, 1)"),
    ("nesterov-no-momentum", TINY, ["optim.momentum=0"], "optim.nesterov: Nesterov needs"),
    ("milestones-order", TINY, ["lr_schedule.milestones=[2,1]"], "lr_schedule.milestones"),
    ("milestones-cosine", TINY, ["lr_schedule.milestones=[1]", "lr_schedule.decay=cosine"],
     "lr_schedule.milestones: only used by decay=multistep"),
    ("warmup-too-long", TINY, ["lr_schedule.warmup_epochs=5"], "lr_schedule.warmup_epochs"),
    ("target-percent", TINY, ["train.target_acc=93"], "train.target_acc: must be in (0, 1]"),
    ("bucket-zero", TINY, ["sync.bucket_mb=0"], "sync.bucket_mb: must be > 0"),
    ("timeout-zero", TINY, ["dist.timeout_s=0"], "dist.timeout_s: must be in (0, 1e+07]"),
    ("nccl-on-cpu", TINY, ["dist.backend=nccl", "dist.device=cpu"], "dist.backend: nccl"),
    ("deepspeed-no-json", TINY, ["engine.name=deepspeed"], "engine.deepspeed_config"),
    ("deepspeed-missing-json", TINY, ["engine.name=deepspeed",
                                      "engine.deepspeed_config={tmp}/nope.json"],
     "does not exist"),
    ("zero1-with-local", TINY, ["engine.name=deepspeed", "engine.deepspeed_config="
                                "{tmp}/zero1.json", "sync.algorithm=local", "sync.period=4"],
     "zero_optimization.stage"),
    ("contradicting-json", TINY, ["engine.name=deepspeed",
                                  "engine.deepspeed_config={tmp}/mb7.json"],
     "train_micro_batch_size_per_gpu"),
    ("missing-recipe", "recipes/nope.yaml", [], "recipe file 'recipes/nope.yaml' does not"),
    ("invalid-yaml", "{tmp}/bad.yaml", [], "is not valid YAML"),
    ("yaml-not-mapping", "{tmp}/list.yaml", [], "must hold a mapping"),
    ("missing-base", "{tmp}/base_missing.yaml", [], "nowhere.yaml"),
    ("binary-recipe", "{tmp}/binary.yaml", [], "is not UTF-8 text"),
    ("duplicate-key", "{tmp}/twice.yaml", [], "key 'epochs' appears twice"),
    ("override-no-equals", TINY, ["train.epochs"], "is not of the form dotted.key=value"),
    ("no-dataset", TINY, ["data.name=cifar10", "data.root={tmp}/empty_data",
                          "data.download=false"], "data.root"),
    ("dataset-root-is-file", TINY, ["data.name=cifar10", "data.root={tmp}/afile",
                                    "data.download=false"], "data.root"),
    ("no-imagefolder", TINY, ["data.name=imagefolder", "data.root={tmp}/empty_data"],
     "train"),
    ("unwritable-run-dir", TINY, ["run.dir={tmp}/ro/run"], "run.dir: cannot write"),
    ("cuda-without-gpu", TINY, ["dist.device=cuda"], "dist.device"),
    ("accum-too-large", TINY, ["train.grad_accum=64"], "train.grad_accum"),
]


def _args(tmp: Path, recipe: str, overrides: list[str]) -> list[str]:
    fmt = _files(tmp)
    if "ro/run" in " ".join(overrides) and os.geteuid() == 0:
        # root ignores directory permissions; a path under a regular file cannot be created.
        overrides = ["run.dir={tmp}/afile/run"]
    args = [recipe.format(**fmt), *(o.format(**fmt) for o in overrides)]
    if not any(o.startswith("run.dir=") for o in overrides):
        args.append(f"run.dir={tmp}/run")
    return args


def _assert_one_clear_error(code: int, stderr: str, text: str) -> None:
    assert code != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("localsgd: error")]
    assert len(errors) == 1, stderr[-3000:]
    assert text in stderr, stderr[-3000:]


@pytest.mark.parametrize(("recipe", "overrides", "text"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_error(tmp_path: Path, recipe: str, overrides: list[str],
                                         text: str, capfd: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    for key, value in worker_env().items():
        monkeypatch.setenv(key, value)
    code = train_main(_args(tmp_path, recipe, overrides))
    _assert_one_clear_error(code, capfd.readouterr().err, text)


@pytest.mark.parametrize("case", ["bad-algorithm", "binary-recipe", "no-dataset"])
def test_bad_input_in_a_real_process(tmp_path: Path, case: str) -> None:
    _, recipe, overrides, text = next(c for c in CASES if c[0] == case)
    proc = subprocess.run([sys.executable, str(ENTRY), *_args(tmp_path, recipe, overrides)],
                          cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=120)
    _assert_one_clear_error(proc.returncode, proc.stderr, text)


@pytest.mark.parametrize(("overrides", "ignored"), [
    (["sync.algorithm=local", "sync.block_period=4"], "sync.block_period"),
    (["sync.period=8"], "sync.period"),
    (["engine.deepspeed_config=deepspeed_configs/zero0_fp32.json"], "engine.deepspeed_config"),
])
def test_key_without_effect_is_one_warning_and_the_run_goes_on(
        overrides: list[str], ignored: str, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert main(["check", TINY, *overrides]) == 0
    err = capfd.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("localsgd: warning")]
    assert len(warned) == 1 and warned[0].startswith(f"localsgd: warning: {ignored}: has no "
                                                     "effect"), err
    assert "Traceback" not in err


@pytest.mark.parametrize(("overrides", "text"), [
    (["sync.algorithm=hierarchical", "sync.period=2"], "needs at least 2 nodes"),
    (["data.synthetic_samples=20"], "data.batch_size"),
], ids=["hierarchical-one-node", "more-workers-than-samples"])
def test_bad_launch_gives_one_clear_error(tmp_path: Path, overrides: list[str],
                                          text: str) -> None:
    proc = torchrun([TINY, f"run.dir={tmp_path}/run", *overrides], check=False, timeout=120)
    assert proc.returncode != 0
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert proc.stderr.count("localsgd: error") == 1, proc.stderr[-3000:]
    assert text in proc.stderr
