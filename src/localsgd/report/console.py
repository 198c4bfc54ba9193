"""Per-epoch lines for people watching the job."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

_CLASSIFY_KEYS = (("train/loss", ".4f"), ("train/acc", ".3f"), ("eval/acc", ".4f"),
                  ("lr", ".4g"), ("throughput/samples_per_s", ".0f"))
_LM_KEYS = (("tokens", ".4g"), ("train/loss", ".4f"), ("train/bpb", ".3f"),
            ("eval/loss", ".4f"), ("eval/bpb", ".4f"), ("eval/ppl", ".3f"), ("lr", ".4g"),
            ("throughput/tokens_per_s", ".0f"))
_EVAL_KEYS = (("tokens", ".4g"), ("eval/loss", ".4f"), ("eval/bpb", ".4f"),
              ("eval/ppl", ".3f"), ("eval/acc", ".4f"))


class ConsoleReporter:
    def log(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "eval":  # a mid-epoch evaluation (train.eval_every_steps)
            parts = [f"step {record['step']}"] + [
                f"{key} {record[key]:{fmt}}" for key, fmt in _EVAL_KEYS if key in record]
            tqdm.write(" | ".join(parts))
            return
        if event != "epoch":
            return
        parts = [f"epoch {record['epoch']:g}", f"step {record['step']}"]
        # Language-model records carry bits per byte; image ones keep their accuracy line.
        keys = _LM_KEYS if "train/bpb" in record else _CLASSIFY_KEYS
        for key, fmt in keys:
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
        if values.get("eval/bpb") is not None:
            tqdm.write(f"final eval/loss {values['eval/loss']:.4f} (best "
                       f"{values['eval/best_loss']:.4f}), eval/bpb {values['eval/bpb']:.4f}, "
                       f"eval/ppl {values['eval/ppl']:.3f}; "
                       f"{values.get('throughput/tokens_per_s', 0):.0f} tokens/s; "
                       f"wall time {values.get('time/wall_s', 0):.1f}s")
            return
        best = values.get("eval/best_acc")
        final = values.get("eval/acc")
        if final is not None:
            tqdm.write(f"final eval/acc {final:.4f} (best {best:.4f}); "
                       f"wall time {values.get('time/wall_s', 0):.1f}s")

    def close(self) -> None:
        pass
