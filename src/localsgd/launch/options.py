"""Domains of the torchrun options that localsgd itself reads (``localsgd run`` and a
study's ``launch:`` list), checked before any agent or worker starts.

torchrun's parser takes any string for them and fails later, inside its launcher, with a
traceback (``--nproc-per-node=abc``) or starts no worker at all (``--nproc-per-node=0``).
The other options are torchrun's alone and go through unchanged.
"""

from __future__ import annotations

from typing import Any

from localsgd.config.domains import AT_LEAST_ONE, NON_NEGATIVE, Range, show

NPROC_WORDS = ("auto", "cpu", "gpu", "xpu")
"""torchrun's names for "one worker per device (or CPU core)"."""

OPTIONS = {
    "--nproc-per-node": f"an integer >= 1, or one of {' | '.join(NPROC_WORDS)}",
    "--nnodes": "an integer N >= 1, or MIN:MAX with 1 <= MIN <= MAX",
    "--node-rank": "an integer in [0, --nnodes)",
    "--max-restarts": "an integer >= 0",
}
"""Option -> the values it accepts (also printed in the messages)."""


def _int(text: Any) -> int | None:
    try:
        return int(str(text))
    except ValueError:
        return None


def _outside(option: str, value: Any, dom: Range) -> list[str]:
    number = _int(value)
    if number is None or dom.problems(number):
        return [f"{option}: must be {OPTIONS[option]}, got {show(str(value))}"]
    return []


def option_problems(args: Any) -> list[str]:
    """Every problem of the options above in torchrun's parsed ``args``."""
    p: list[str] = []
    nproc = str(args.nproc_per_node)
    if nproc not in NPROC_WORDS:
        p += _outside("--nproc-per-node", nproc, AT_LEAST_ONE)
    low, _, high = str(args.nnodes).partition(":")
    nodes = [_int(low), _int(high) if high else _int(low)]
    if None in nodes or str(args.nnodes).count(":") > 1 or not 1 <= nodes[0] <= nodes[1]:
        p.append(f"--nnodes: must be {OPTIONS['--nnodes']}, got {show(str(args.nnodes))}")
    elif nodes[0] == nodes[1]:
        p += _outside("--node-rank", args.node_rank, Range(0, nodes[0], hi_open=True))
    p += _outside("--max-restarts", args.max_restarts, NON_NEGATIVE)
    return p
