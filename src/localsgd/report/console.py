"""Per-epoch lines for people watching the job."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm


class ConsoleReporter:
    def log(self, record: dict[str, Any]) -> None:
        if record.get("event") != "epoch":
            return
        parts = [f"epoch {record['epoch']:g}", f"step {record['step']}"]
        for key, fmt in (("train/loss", ".4f"), ("train/acc", ".3f"), ("eval/acc", ".4f"),
                         ("lr", ".4g"), ("throughput/samples_per_s", ".0f")):
            if key in record:
                parts.append(f"{key} {record[key]:{fmt}}")
        if "comm/epoch_bytes" in record:
            parts.append(f"comm {record['comm/epoch_bytes'] / 2**20:.1f} MiB")
        times = [f"{k.split('/')[1]} {record[k]:.1f}s" for k in sorted(record)
                 if k.startswith("time/")]
        if times:
            parts.append("time: " + " ".join(times))
        tqdm.write(" | ".join(parts))

    def summary(self, values: dict[str, Any]) -> None:
        best = values.get("eval/best_acc")
        final = values.get("eval/acc")
        if final is not None:
            tqdm.write(f"final eval/acc {final:.4f} (best {best:.4f}); "
                       f"wall time {values.get('time/wall_s', 0):.1f}s")

    def close(self) -> None:
        pass
