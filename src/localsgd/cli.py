"""Command line: ``localsgd {train,check,plot,report}``; torchrun runs ``train`` per worker."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from localsgd.config import ConfigError, load_config, to_yaml


def _fail(message: str, code: int) -> int:
    # Every rank hits the same recipe/data problem; one copy of the message is enough. The
    # others linger a moment: torchrun stops all workers as soon as the first one exits,
    # which must not cut rank 0 off before it has reported.
    if os.environ.get("RANK", "0") == "0":
        print(f"localsgd: error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(5)
    return code


def train_main(argv: list[str]) -> int:
    """Entry of every torchrun worker: ``RECIPE.yaml [dotted.key=value ...]``."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: torchrun [torchrun options] torchrun_entry.py RECIPE.yaml "
              "[dotted.key=value ...]")
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from localsgd.config.validate import validate_launch
    from localsgd.data import DataError
    from localsgd.dist.env import init_distributed, shutdown
    from localsgd.train.trainer import Trainer, TrainingError

    warnings.filterwarnings("ignore", message=".*epoch parameter in `scheduler.step", )
    try:
        info = init_distributed(cfg.dist)
        validate_launch(cfg, info.world_size, info.local_world_size)
        trainer = Trainer(cfg, info)
        trainer.setup()
        trainer.train()
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except DataError as exc:
        return _fail(str(exc), 2)
    except TrainingError as exc:
        return _fail(str(exc), 1)
    except RuntimeError as exc:
        if "cuda" in str(exc).lower() and "dist.device" in str(exc):
            return _fail(str(exc), 2)
        raise
    finally:
        shutdown()
    return 0


def _check(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    print(to_yaml(cfg), end="")
    print(f"# {args.recipe}: valid", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="localsgd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (under torchrun: one process per worker)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p = sub.add_parser("check", help="validate a recipe and print the resolved config")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p = sub.add_parser("plot", help="plot runs side by side into PNG files")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None, help="output directory (default: the first run's)")
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_main([args.recipe, *args.overrides])
    if args.command == "check":
        return _check(args)
    if args.command == "plot":
        from localsgd.report.plots import plot_runs

        return plot_runs(args.run_dirs, args.out)
    return 2


if __name__ == "__main__":
    sys.exit(main())
