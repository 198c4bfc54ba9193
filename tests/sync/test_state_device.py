"""The sync's state in host memory (sync.state_device=cpu) and what sync/extra_bytes holds.

On this CPU-only tier both placements are host memory, so the check is that the CPU path
(copies to and from the state at every sync, pinned buffers where CUDA exists) changes no
result, bit for bit, and that the anchor, the outer momentum and the reducer's state
(error-feedback residuals, CHOCO's public copies) each show in ``extra_memory``.
"""

from __future__ import annotations

import pytest
import torch
from threads import run_workers

from localsgd.sync.config import SyncConfig
from localsgd.sync.reducers.choco import ChocoOptions
from localsgd.sync.reducers.compressed import CompressionKeys
from localsgd.sync.updates.outer import OuterOptimizerKeys

PARAMS = 66 * 8
"""FakeTarget's parameters in float64: the size of one copy of the model."""

OUTER = OuterOptimizerKeys(lr=0.7, momentum=0.9, nesterov=True)
CASES = {
    # DiLoCo on EF-sign: anchor, outer momentum and residuals.
    "diloco_ef_sign": (dict(topology="threads", reducer="threads_compressed",
                            compression=CompressionKeys(method="ef_sign"), update="outer",
                            outer=OUTER, algorithm="local", period=2),
                       {"anchor": PARAMS, "update": PARAMS, "reducer": PARAMS}),
    # CHOCO with SlowMo's exact rounds: its public copies (with the 3 buffer floats that
    # travel with the parameters), the anchor and the outer momentum.
    "slowmo_choco": (dict(topology="threads_ring", reducer="choco", exact_every=2,
                          compression=CompressionKeys(method="sign"),
                          choco=ChocoOptions(gamma=0.5), update="outer", outer=OUTER,
                          algorithm="local", period=1),
                     {"anchor": PARAMS, "update": PARAMS, "reducer": 2 * (66 + 3) * 8}),
}


@pytest.mark.parametrize("case", CASES)
def test_state_in_host_memory_changes_no_result_and_each_part_shows(case: str) -> None:
    keys, held = CASES[case]
    on_model, _ = run_workers(SyncConfig(**keys), steps=6, world=4, local_world=1,  # type: ignore[arg-type]
                              lr_at=lambda s: 0.1)
    on_host, _ = run_workers(SyncConfig(**keys, state_device="cpu"), steps=6, world=4,  # type: ignore[arg-type]
                             local_world=1, lr_at=lambda s: 0.1)
    for a, b in zip(on_model, on_host, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.after, b.after, strict=True))
    for w in (on_model[0], on_host[0]):
        memory = w.controller.extra_memory()
        assert {k: memory[k] for k in held} == held
        assert w.controller.extra_bytes() == sum(memory.values())
    ctl = on_host[0].controller
    assert ctl.anchor is not None and ctl.anchor.on_cpu
    assert all(t.device.type == "cpu" for t in ctl.anchor.tensors)
