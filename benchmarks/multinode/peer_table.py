"""The SparseLoCo-against-torchft table of a ``bench_overlap.py --groups sparse4`` result.

    python benchmarks/multinode/peer_table.py benchmarks/multinode/results/overlap-<stamp>.json

Per variant, medians over the rounds: steady steps/s, its ratio to its own recipe's no-sync
run (our bound for ours, torchft's own loop without syncs for torchft) and to torchft's
streaming DiLoCo (each round's ratio, then the median), the syncs' bytes per worker over the
run by the engine's count, that over torchft streaming's, the whole run's bytes, the veth
bytes a node sent, and the veth bytes the syncs added over the bound (headers off) against
the engine's count. torchft rows give their commits and failed commits: a row whose syncs
failed compared nothing and is marked so.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_links  # noqa: E402 - a sibling script

OURS_BOUND, PEER_BOUND, PEER = "no-comm-sparseloco", "torchft-no-sync", "torchft-H4-f2-d1"


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ratio(rows: list[dict[str, Any]], a: str, b: str) -> float | None:
    by = {(r["round"], r["variant"]): r.get("steady_steps_per_s") for r in rows}
    return _median([by[(n, a)] / by[(n, b)] for n in sorted({r["round"] for r in rows})
                    if by.get((n, a)) and by.get((n, b))])


def sync_bytes(row: dict[str, Any]) -> int:
    """Bytes of the syncs, per worker: averages (ours: the compressed pseudo-gradients and
    the closing exact BatchNorm average) or everything handed to torchft's all-reduce."""
    comm = row["comm"]
    return int(comm.get("comm/average/bytes", 0))


def commits(row: dict[str, Any]) -> str:
    peer = row.get("peer", {})
    if "peer/commits" not in peer:
        return "-"
    return f"{peer['peer/commits']} / {peer['peer/commit_failures']}"


def bounds(names: list[str]) -> dict[str, str]:
    """Each variant's no-sync run: torchft's fixed traffic (lighthouse, quorum) is not ours
    (the engine's start-up broadcast)."""
    return {n: PEER_BOUND if n.startswith("torchft") else OURS_BOUND for n in names}


def table(rows: list[dict[str, Any]], rate: str = "20mbit") -> str:
    rows = [r for r in rows if r["rate"] == rate and r.get("steady_steps_per_s")]
    for r in rows:
        r.pop("marginal_wire_ratio", None)
        r.pop("marginal_wire_ratio_minus_headers", None)
    bench_links.add_marginal(rows, bounds([r["variant"] for r in rows]))
    names = list(dict.fromkeys(r["variant"] for r in rows))
    peer_bytes = _median([sync_bytes(r) for r in rows if r["variant"] == PEER])

    def f(x: float | None, spec: str = ".2f") -> str:
        return "-" if x is None else format(x, spec)

    lines = ["| variant | steady steps/s | / own no-sync run | / torchft streaming | "
             "commits / failed | sync bytes per worker | / torchft streaming's | "
             "whole-run engine bytes | veth tx bytes per node | veth beyond bound / engine, "
             "headers off |", "|---" * 10 + "|"]
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        bound = PEER_BOUND if name.startswith("torchft") else OURS_BOUND
        sb = _median([sync_bytes(r) for r in mine])
        failed = any(r.get("peer", {}).get("peer/commit_failures") for r in mine)
        lines.append(
            f"| {name}{' (syncs dropped)' if failed else ''} | "
            f"{f(_median([r['steady_steps_per_s'] for r in mine]), '.3f')} | "
            f"{f(_ratio(rows, name, bound))} | {f(_ratio(rows, name, PEER))} | "
            f"{commits(mine[0])} | {f(sb, ',.0f')} | "
            f"{f(sb / peer_bytes if sb and peer_bytes else None, '.4f')} | "
            f"{f(_median([r['comm']['comm/bytes'] for r in mine]), ',.0f')} | "
            f"{f(_median([r['wire_tx_mean'] for r in mine if 'wire_tx_mean' in r]), ',.0f')} | "
            f"{f(_median([r['marginal_wire_ratio_minus_headers'] for r in mine if 'marginal_wire_ratio_minus_headers' in r]), '.3f')} |")  # noqa: E501
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: peer_table.py RESULT.json", file=sys.stderr)
        return 2
    data = json.loads(Path(argv[0]).read_text())
    print(table(data["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
