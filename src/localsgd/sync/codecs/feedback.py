"""Error feedback: what compression dropped is added to the next payload, not lost.

Per key (a bucket index, a tensor name), the memory m follows m = d + beta m; send C(m);
m -= decode(C(m)). So what was sent plus the new residual is exactly the input plus the
decayed old residual: with beta = 1 (the default) every part of every update is sent
eventually, which makes biased codecs (sign, top-k) converge like the uncompressed method.
SparseLoCo's beta < 1 (``sync.compression.feedback_decay``, 0.95) forgets old debt
geometrically, so the buffer acts as the outer momentum it replaces. What is subtracted is
the decoded payload, so the memory also covers the error of a quantizer after the
sparsifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from localsgd.sync.codecs.base import Codec, Payload, Segments

Key = int | str
"""What a residual is kept for: a bucket index or a tensor name (anything a checkpoint can
hold as a dict key)."""


class ErrorFeedback:
    """The residual of each key on this rank, and the compression that updates it."""

    def __init__(self, decay: float = 1.0) -> None:
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"sync.compression.feedback_decay: must be in [0, 1], got {decay}")
        self.decay = float(decay)
        """beta: the old residual's weight in the next memory."""
        self.residuals: dict[Key, torch.Tensor] = {}
        """Key -> what was not sent yet. Replaced on each compress, never changed in place,
        so a ``state_dict`` taken earlier stays as it was."""

    def compress(self, key: Key, x: torch.Tensor, codec: Codec, segments: Segments,
                 generator: torch.Generator | None = None) -> Payload:
        """Encode ``x`` plus the residual of ``key``; keep what the payload does not carry.

        The first call for a key starts from a zero residual. The payload may alias ``x``
        (the ``none`` codec sends its input as is), so ``x`` must not change before it is
        sent.
        """
        residual = self.residuals.get(key)
        if residual is None:
            memory = x
        else:
            if residual.shape != x.shape:
                raise ValueError(f"error feedback for {key!r}: the residual has shape "
                                 f"{tuple(residual.shape)}, the input {tuple(x.shape)} "
                                 "(the bucket layout changed; reset() first)")
            memory = x + self._decayed(residual.to(device=x.device, dtype=x.dtype))
        payload = codec.encode(memory, segments, generator)
        sent = codec.decode(payload, memory.numel(), segments, memory.dtype)
        self.residuals[key] = memory - sent
        return payload

    def compress_split(self, keys: Sequence[Key], x: torch.Tensor, codec: Codec,
                       segments: Segments) -> Payload:
        """``compress`` for several keys in one call: ``keys[j]`` owns ``segments[j]``, and
        the segments tile ``x``. One encode and one decode for all of them, each key keeping
        its own residual, so the result is each key's own when the codec is
        ``segmentwise``; for that reason only such codecs are accepted."""
        if not codec.segmentwise:
            raise ValueError(f"{codec.name}: one payload for many residuals needs a "
                             "segmentwise codec")
        if len(keys) != len(segments):
            raise ValueError(f"{len(keys)} keys for {len(segments)} segments")
        owed = [self.residuals.get(k) for k in keys]
        memory = x
        if any(r is not None for r in owed):
            memory = x.clone()
            for r, (start, end), key in zip(owed, segments, keys, strict=True):
                if r is None:
                    continue
                if r.numel() != end - start:
                    raise ValueError(f"error feedback for {key!r}: the residual has "
                                     f"{r.numel()} elements, the segment {end - start}")
                memory[start:end] += self._decayed(r.to(device=x.device, dtype=x.dtype))
        payload = codec.encode(memory, segments)
        left = memory - codec.decode(payload, memory.numel(), segments, memory.dtype)
        for key, (start, end) in zip(keys, segments, strict=True):
            self.residuals[key] = left[start:end]
        return payload

    def _decayed(self, residual: torch.Tensor) -> torch.Tensor:
        # No multiply at beta = 1: plain error feedback stays bitwise what it was.
        return residual if self.decay == 1.0 else residual * self.decay

    def reset(self) -> None:
        """Forget every residual (what was owed is dropped)."""
        self.residuals = {}

    def state_dict(self) -> dict[str, Any]:
        """``{"residuals": {key: tensor}}``; the tensors themselves, not copies (they are
        never changed in place), so a checkpoint round-trips them bitwise."""
        return {"residuals": dict(self.residuals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the residuals of ``state``; they move to the input's device at the next
        compress. An empty state (a run without error feedback) starts from zeros."""
        self.residuals = dict(state.get("residuals", {})) if state else {}

    @classmethod
    def merge_states(cls, states: list[dict[str, Any]]) -> dict[str, Any]:
        """One state for every rank of a run resumed with another world size, from the
        states of the old ranks (one each): per key, the mean of the old residuals, a key
        missing from a rank counting as a zero residual there.

        Why the mean: the reducer averages what the ranks send, and each rank sends its
        input plus its residual minus its new residual, so the average lags the mean of the
        inputs by exactly the mean of the residuals: that is what the averaged model is still
        owed. If each new rank starts from that mean, the next average again includes all of
        it, whatever the new world size. Zeros would drop the debt for good, the sum would
        pay it as many times as there were old ranks, and a residual kept per rank has no
        owner once ranks disappear or appear. The mean is computed in float64 and cast back
        to the residual's dtype, on the first old residual's device.
        """
        if not states:
            return {"residuals": {}}
        merged: dict[Key, torch.Tensor] = {}
        keys: list[Key] = []
        for state in states:
            keys += [k for k in state.get("residuals", {}) if k not in keys]
        for key in keys:
            present = [s["residuals"][key] for s in states if key in s.get("residuals", {})]
            first = present[0]
            if any(r.shape != first.shape for r in present):
                raise ValueError(f"error feedback for {key!r}: old ranks hold residuals of "
                                 f"shapes {sorted({tuple(r.shape) for r in present})}")
            total = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
            for residual in present:
                total += residual.to(device=first.device, dtype=torch.float64)
            merged[key] = (total / len(states)).to(first.dtype)
        return {"residuals": merged}
