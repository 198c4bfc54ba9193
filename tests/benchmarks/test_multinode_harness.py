"""The multi-node harness without root: refusal, command construction, shaping arguments."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO

HERE = REPO / "benchmarks" / "multinode"


def _load(name: str) -> ModuleType:
    # The harness is a pair of scripts, not a package; bench_links finds netem via sys.path.
    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(HERE))


netem = _load("netem")
bench = _load("bench_links")
peer = _load("peer_worker")


def test_refuses_without_root(monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    calls: list[object] = []
    monkeypatch.setattr(netem, "_sh", lambda *a, **k: calls.append(a))
    assert netem.main(["run", "--nodes", "2", "--", "recipe.yaml"]) == 1
    assert "needs root" in capsys.readouterr().err
    assert netem.main(["cleanup"]) == 1
    assert calls == []  # nothing was attempted before the refusal


def test_node_command_in_namespace() -> None:
    cmd = netem.node_command(1, 2, 1, ["r.yaml", "a=1"], loopback=False, torchrun="torchrun")
    assert cmd[:4] == ["ip", "netns", "exec", "lsgd-n1"]
    assert "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--nproc-per-node=1" in cmd
    assert "--master-addr=10.77.0.1" in cmd and f"--master-port={netem.MASTER_PORT}" in cmd
    assert cmd[-2:] == ["r.yaml", "a=1"] and cmd[-3].endswith("torchrun_entry.py")
    env = netem.node_env(1, 2, 1, loopback=False)
    assert env["GLOO_SOCKET_IFNAME"] == "lsgd1"


def test_node_command_loopback() -> None:
    cmd = netem.node_command(0, 2, 2, ["r.yaml"], loopback=True, master_port=1234,
                             torchrun="torchrun")
    assert cmd[0] == "torchrun" and "--master-addr=127.0.0.1" in cmd
    assert "--master-port=1234" in cmd
    assert netem.node_env(0, 2, 2, loopback=True)["GLOO_SOCKET_IFNAME"] == "lo"


def test_shaping_arguments() -> None:
    assert netem.rate_bits("20mbit") == 2e7 and netem.rate_bits("1gbit") == 1e9
    with pytest.raises(ValueError):
        netem.rate_bits("20mbps")
    tbf = netem.Topology(2, "20mbit", shaper="tbf").qdisc_args()
    assert tbf[:3] == ["tbf", "rate", "20mbit"] and int(tbf[tbf.index("burst") + 1]) >= 65536
    nm = netem.Topology(2, "100mbit", "1ms", shaper="netem").qdisc_args()
    assert nm[:3] == ["netem", "delay", "1ms"] and "rate" in nm


def test_bench_variants_and_ring_factor(tmp_path: Path) -> None:
    assert bench.ring_factor(2) == 1.0 and bench.ring_factor(4) == 1.5
    args = bench.train_args(bench.VARIANTS["local-H16"], 64, 16, 2, tmp_path)
    assert "sync.period=16" in args and "train.max_steps=64" in args
    assert f"run.dir={tmp_path}" in args
    # No epoch end (the trainer evaluates there, PyTorch's peer does not) within the run.
    for steps, batch, workers in ((64, 64, 2), (128, 64, 2), (64, 64, 4), (64, 16, 4)):
        args = bench.train_args(bench.VARIANTS["no-comm"], steps, batch, workers, tmp_path)
        (samples,) = [int(a.split("=")[1]) for a in args if a.startswith("data.synthetic_samples=")]
        assert samples // (batch * workers) > steps
    assert bench.VARIANTS["hier-2x2-H4-Hb4"].nproc_per_node == 2


def test_torch_peer_variant_uses_its_worker(tmp_path: Path) -> None:
    v = bench.VARIANTS["torch-peer-h16"]
    assert v.entry == HERE / "peer_worker.py" and v.entry.exists() and v.nproc_per_node == 1
    # Same recipe argv as the localsgd variants, so the same workload.
    base = bench.train_args(bench.VARIANTS["no-comm"], 64, 16, 2, tmp_path)
    assert bench.train_args(v, 64, 16, 2, tmp_path) == [
        a for a in base if not a.startswith("sync.")]
    cmd = netem.node_command(0, 2, 1, ["r.yaml"], loopback=False, torchrun="torchrun",
                             entry=v.entry)
    assert cmd[-2:] == [str(v.entry), "r.yaml"]
    table = bench.tables([
        {"rate": "20mbit", "variant": n, "steps_per_s": sps, "samples_per_s": sps * 32,
         "comm": {"comm/bytes": 2**20}, "max_rss_mib": 900.0}
        for n, sps in (("local-H16", 9.0), ("torch-peer-h16", 6.0), ("no-comm", 12.0))],
        ["20mbit"])
    assert "| 20mbit | 0.75 | - | 1.50 | 0.50 | - | - |" in table


def test_peer_average_count_matches_periodic_averager() -> None:
    # PeriodicModelAverager averages when its counter (0-based, before += 1) is a multiple of
    # the period after warm-up: after steps 1, 17, 33, 49 of 64 for period 16.
    class Avg:
        period, warmup_steps, step = 16, 0, 0

    done = []
    for i in range(64):
        if peer.will_average(Avg):
            done.append(i + 1)
        Avg.step += 1
    assert done == [1, 17, 33, 49]


def test_marginal_ratio_cancels_fixed_traffic() -> None:
    def row(variant: str, engine: float, wire: float) -> dict[str, object]:
        return {"variant": variant, "rate": "20mbit", "flat_ring": True, "ring_factor": 1.0,
                "engine_bytes_per_rank": engine, "wire_tx_mean": wire,
                "wire_tx_mean_minus_headers": wire * 0.98}

    rows = [row("no-comm", 1e6, 0.6e6), row("minibatch", 41e6, 0.6e6 + 41.4e6)]
    bench.add_marginal(rows)
    assert rows[1]["marginal_wire_ratio"] == pytest.approx(41.4 / 40)
    assert "marginal_wire_ratio" not in rows[0]
    json.dumps(rows)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_namespaces_up_and_down() -> None:
    topo = netem.Topology(2, "100mbit")
    with netem.Session(topo):
        assert set(netem.our_namespaces()) >= {"lsgd-br", "lsgd-n0", "lsgd-n1"}
        assert netem.link_counters(0)["tx_bytes"] >= 0
    assert netem.our_namespaces() == []
