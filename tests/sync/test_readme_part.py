"""The README's worked example of a new part works as written: one file, nothing else.

The example is cut out of README.md, saved as a module beside the real updates (the
package path is extended, the source tree is not touched) and used in a fresh interpreter:
its key composes into the recipe, its check and the no-effect warning work, and two thread
workers apply it exactly as its formula says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO, worker_env

SCRIPT = r'''
import sys, warnings
import localsgd.sync.updates as updates
updates.__path__.append(sys.argv[1])
import torch
from localsgd.config import ConfigError, ConfigWarning
from localsgd.recipe import load_config
from threads import run_workers

cfg = load_config(None, ["sync.algorithm=local", "sync.period=2", "sync.update=damped",
                         "sync.keep=0.25"])
try:
    load_config(None, ["sync.algorithm=local", "sync.update=damped", "sync.keep=1.5"])
    raise SystemExit("keep=1.5 was accepted")
except ConfigError as exc:
    assert exc.problems == ["sync.keep: must be in [0, 1), got 1.5"], exc.problems
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    load_config(None, ["sync.algorithm=local", "sync.keep=0.5"])
assert [str(w.message).split(":")[0] for w in caught
        if w.category is ConfigWarning] == ["sync.keep"], caught
cfg.sync.topology = cfg.sync.reducer = "threads"
workers, _ = run_workers(cfg.sync, steps=2, world=2, local_world=2)
mean = (workers[0].before[1] + workers[1].before[1]) / 2
for w in workers:
    expected = mean + 0.25 * (w.before[1] - mean)
    assert torch.allclose(w.after[1], expected, rtol=1e-12, atol=1e-14)
print("example ok")
'''


def test_readme_worked_example_is_a_working_part(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("**Adding a part: a worked example.**", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    (tmp_path / "damped.py").write_text(code.group(1))
    env = worker_env()
    # Prepended, so the worker still imports this tree's localsgd through PYTHONPATH.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests" / "sync"), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "example ok" in proc.stdout
