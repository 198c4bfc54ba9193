"""The single exception type for data problems the user has to fix (paths, files, settings)."""

from __future__ import annotations


class DataError(Exception):
    """A dataset could not be prepared; the message says what was searched and how to fix it.

    Library errors (torchvision, PIL, pickle) are chained as ``__cause__`` rather than shown
    first, so the CLI can print one actionable line instead of a deep traceback.
    """
