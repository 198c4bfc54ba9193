"""Backend choice and the phase timer on this CPU-only machine.

No GPU is visible here, so the layouts with CUDA devices are simulated by patching
``torch.cuda.device_count`` (the one GPU fact ``choose_backend`` reads); docs/gpu.md records
the same choice made on a real H100.
"""

from __future__ import annotations

import pytest
import torch

from localsgd.config.errors import ConfigError
from localsgd.config.schema import Backend, DistConfig
from localsgd.launch.env import choose_backend
from localsgd.train.timing import PHASES, NoPhaseTimer, PhaseTimer, build_timer

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(("gpus", "local_world", "want"), [(1, 1, "nccl"), (2, 2, "nccl"),
                                                            (1, 2, "gloo"), (2, 4, "gloo")])
def test_auto_uses_nccl_only_with_a_gpu_per_worker(monkeypatch, capsys, gpus, local_world,
                                                    want) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert choose_backend(DistConfig(), CUDA, local_world, rank=0) == want
    notice = capsys.readouterr().out
    assert ("NCCL allows one rank per GPU" in notice) == (want == "gloo")


def test_cpu_is_gloo_and_an_explicit_backend_is_kept(monkeypatch) -> None:
    assert choose_backend(DistConfig(), torch.device("cpu"), 4, rank=0) == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert choose_backend(DistConfig(backend=Backend.gloo), CUDA, 1, rank=0) == "gloo"


def test_explicit_nccl_on_a_shared_gpu_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError) as info:
        choose_backend(DistConfig(backend=Backend.nccl), CUDA, 2, rank=1)
    assert "dist.backend: nccl cannot run 2 workers per node on 1 visible GPU" in str(info.value)


def test_cpu_phase_timer_sums_each_phase_and_resets() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.phase("forward"):
            torch.ones(64, 64) @ torch.ones(64, 64)
    out = timer.pop()
    assert set(out) == {f"time/{p}" for p in PHASES}
    assert out["time/forward"] > 0 and out["time/data"] == 0.0
    assert timer.pop()["time/forward"] == 0.0


def test_phase_timer_is_off_unless_track_time_asks() -> None:
    assert isinstance(build_timer(torch.device("cpu"), True), PhaseTimer)
    timer = build_timer(torch.device("cpu"), False)
    assert isinstance(timer, NoPhaseTimer)
    with timer.phase("forward"):
        torch.ones(64, 64) @ torch.ones(64, 64)
    assert timer.pop() == {}
