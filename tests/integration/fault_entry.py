"""torchrun entry for fault tests: the real trainer; one worker receives a real signal.

With FAULT_RANK=r, FAULT_STEP=n and FAULT_SIGNAL=KILL|STOP, worker r sends itself SIGKILL or
SIGSTOP right after optimizer step n, on the first attempt only (torchrun's restart count 0),
so an elastic restart then runs clean.
"""

from __future__ import annotations

import os
import signal
import sys

from localsgd.cli import train_main
from localsgd.sync.controller import SyncObserver


class Fault(SyncObserver):
    def after_step(self, step: int, action: str | None, target: object) -> None:
        if (step == int(os.environ["FAULT_STEP"])
                and os.environ.get("RANK") == os.environ["FAULT_RANK"]
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ["FAULT_SIGNAL"]))


if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:], observers=[Fault()]))
