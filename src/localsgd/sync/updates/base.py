"""What an update part does, with the hooks that a stateless update leaves alone."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from localsgd.registry import Part


class Update(Part):
    """Turns the reducer's result into every worker's new parameters.

    ``apply`` handles one slice of one parameter at a time (buckets split tensors). Updates
    with state (an anchor, outer momentum) also hear when the workers agree and when a sync
    begins; both hooks do nothing here.
    """

    def apply(self, index: int, start: int, local: torch.Tensor, reduced: torch.Tensor,
              out: torch.Tensor) -> None:
        """Write the new value of elements ``start:start+numel`` of tensor ``index``.

        ``local`` holds this worker's values before the sync, ``reduced`` what the reducer
        returned and ``out`` is where the result goes (may be ``local`` itself).
        """
        raise NotImplementedError

    @property
    def copies(self) -> bool:
        """Whether ``apply`` writes the reduced values unchanged: the averager then copies a
        whole bucket's slices in one call instead of calling ``apply`` once per slice."""
        return False

    uses_anchor: ClassVar[bool] = False
    """Whether the sync must keep an anchor for this update."""
    anchor_on_cpu: bool = False
    """Where that anchor lives: host memory, or the model's device."""
    anchor: Any = None
    """The sync's anchor (``sync.anchor.Anchor``) when the sync keeps one."""

    def bind(self, anchor: Any) -> None:
        self.anchor = anchor

    def apply_delta(self, index: int, start: int, local: torch.Tensor, delta: torch.Tensor,
                    anchor: torch.Tensor, out: torch.Tensor) -> None:
        """Like ``apply`` for a reducer that carries pseudo-gradients: ``delta`` is the
        reduced anchor - theta and ``anchor`` the anchor's slice, which moves to the model
        every worker now agrees on. Updates that step on Delta itself override this."""
        reduced = anchor - delta.to(anchor.device)
        self.apply(index, start, local, reduced.to(out.device), out)
        anchor.copy_(reduced)

    def held_bytes(self) -> int:
        """Memory this update keeps between syncs besides the anchor (outer momentum)."""
        return 0

    def at_consensus(self, step: int, params: list[torch.Tensor]) -> None:
        """Every worker holds ``params`` after ``step`` steps, and local steps follow."""

    def begin(self, step: int, inner_lr: float) -> None:
        """A global sync of the state after ``step`` steps is about to be applied; the last
        local step ran at learning rate ``inner_lr``."""
