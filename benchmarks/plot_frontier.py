"""Test accuracy against bytes sent per worker, from ``accuracy_study.py`` results.

    python benchmarks/plot_frontier.py RESULTS.json [MORE.json ...] --out frontier.png

One point per variant (mean over its runs; a later file's runs of a (variant, seed) replace
an earlier file's), on a log scale of MiB sent per worker, with the seeds' spread as an
error bar and the variant's name beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--title", default="Test accuracy against bytes sent")
    args = ap.parse_args(argv)
    runs: dict[tuple[str, int, int], dict] = {}
    for path in args.results:
        for r in json.loads(path.read_text()):
            if r.get("ok"):
                runs[(r["variant"], r["workers"], r["seed"])] = r
    by: dict[str, list[dict]] = {}
    for (variant, _, _), r in runs.items():
        by.setdefault(variant, []).append(r)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, rs in sorted(by.items()):
        acc = [r["acc"] for r in rs]
        mib = statistics.mean(r["bytes"] for r in rs) / 2**20
        err = statistics.stdev(acc) if len(acc) > 1 else 0.0
        ax.errorbar(mib, statistics.mean(acc), yerr=err, fmt="o", capsize=3)
        ax.annotate(variant, (mib, statistics.mean(acc)), textcoords="offset points",
                    xytext=(5, 3), fontsize=8)
    ax.set(xscale="log", xlabel="MiB sent per worker (log)", ylabel="final test accuracy",
           title=args.title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
