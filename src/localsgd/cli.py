"""Command line: ``localsgd {run,study,train,check,plot,report}``.

``run`` launches a job (torchrun with the recipe checked first), ``study`` runs a grid of
them; every worker runs ``train``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Any

from localsgd.config import ConfigError, ConfigWarning


def _fail(message: str, code: int) -> int:
    # Every rank hits the same recipe/data problem; one copy of the message is enough. The
    # others linger a moment: torchrun stops all workers as soon as the first one exits,
    # which must not cut rank 0 off before it has reported.
    if os.environ.get("RANK", "0") == "0":
        print(f"localsgd: error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(5)
    return code


def _peer_failure(text: str, timeout_s: float) -> str | None:
    """A one-line explanation for collectives that failed because of another worker."""
    if "Timed out" in text or "timed out" in text:
        return (f"a collective did not complete within dist.timeout_s={timeout_s:g}s: another "
                "worker is stopped, hung or unreachable. torchrun restarts the job from the "
                "latest checkpoint when --max-restarts allows; raise dist.timeout_s for slow "
                "links")
    if "Connection closed by peer" in text or "Connection reset by peer" in text:
        return ("another worker went away in the middle of a collective (killed or crashed). "
                "torchrun restarts the job from the latest checkpoint when --max-restarts "
                "allows")
    return None


def _load(recipe: str, overrides: list[str]) -> Any:
    """The recipe; its ConfigWarnings (keys without effect) are printed once, by rank 0."""
    from localsgd.recipe import load_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(recipe, overrides)
    for w in caught:
        if not issubclass(w.category, ConfigWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        elif os.environ.get("RANK", "0") == "0":  # every rank loads the recipe; one says so
            print(f"localsgd: warning: {w.message}", file=sys.stderr, flush=True)
    return cfg


def train_main(argv: list[str], observers: list[Any] | None = None) -> int:
    """Entry of every torchrun worker: ``RECIPE.yaml [dotted.key=value ...]``.

    ``observers`` (``localsgd.sync.controller.SyncObserver``) watch every step and sync.
    """
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: torchrun [torchrun options] torchrun_entry.py RECIPE.yaml "
              "[dotted.key=value ...]")
        return 0 if argv else 2
    try:
        cfg = _load(argv[0], argv[1:])
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from localsgd.data import DataError
    from localsgd.launch.env import init_distributed, shutdown
    from localsgd.launch.rendezvous import JoinError
    from localsgd.recipe import validate_launch
    from localsgd.train.trainer import Trainer, TrainingError

    warnings.filterwarnings("ignore", message=".*epoch parameter in `scheduler.step", )
    # With fp16 the gradient scaler skips a step now and then, on purpose (engines/precision.py).
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()` before")
    trainer: Trainer | None = None
    try:
        info = init_distributed(cfg.dist)
        validate_launch(cfg, info.world_size, info.local_world_size)
        trainer = Trainer(cfg, info, observers)
        trainer.setup()
        trainer.train()
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except DataError as exc:
        return _fail(str(exc), 2)
    except TrainingError as exc:
        return _fail(str(exc), 1)
    except JoinError as exc:
        # Rank 0 names the workers that never came; a worker that could not reach the
        # store says so itself.
        print(f"localsgd: error (rank {os.environ.get('RANK', '0')}): {exc}", file=sys.stderr,
              flush=True)
        return 1
    except RuntimeError as exc:
        peer = _peer_failure(str(exc), cfg.dist.timeout_s)
        if peer is None:
            raise
        # Every rank notices on its own; each says which rank it is.
        print(f"localsgd: error (rank {os.environ.get('RANK', '0')}): {peer}", file=sys.stderr,
              flush=True)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        shutdown()
    return 0


def _positive(text: str) -> int:
    if not text.isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _check(args: argparse.Namespace) -> int:
    from localsgd.recipe import RecipeConfig, to_yaml

    if args.keys:
        from localsgd.config.domain_check import key_table

        print(key_table(RecipeConfig))
        return 0
    if args.recipe is None:
        return _fail("check needs a RECIPE.yaml (or --keys to list every key)", 2)
    try:
        cfg = _load(args.recipe, args.overrides)
        if args.nproc_per_node is not None:
            # The launch's own rules (sync.replica_group against the node size, ...).
            from localsgd.recipe import validate_launch

            validate_launch(cfg, args.nnodes * args.nproc_per_node, args.nproc_per_node)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    print(to_yaml(cfg), end="")
    print(f"# {args.recipe}: valid", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        # torchrun's own parser reads everything after "run" (see launch/run.py).
        from localsgd.launch.run import run_main

        return run_main(argv[1:])
    parser = argparse.ArgumentParser(prog="localsgd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="launch a job: localsgd run [torchrun options] RECIPE "
                               "[dotted.key=value ...]", add_help=False)
    p = sub.add_parser("study", help="run a grid of recipe variants and compare them")
    p.add_argument("study")
    p = sub.add_parser("train", help="train (under torchrun: one process per worker)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p = sub.add_parser("check", help="validate a recipe and print the resolved config")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--keys", action="store_true",
                   help="list every recipe key with its type, default and accepted values")
    p.add_argument("--nproc-per-node", type=_positive, default=None,
                   help="also check the recipe for this many workers per node")
    p.add_argument("--nnodes", type=_positive, default=1,
                   help="nodes of the launch checked with --nproc-per-node (default 1)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p = sub.add_parser("plot", help="plot runs side by side into PNG files")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None, help="output directory (default: the first run's)")
    p = sub.add_parser("report", help="publish a W&B report comparing the runs of one group")
    p.add_argument("--project", required=True)
    p.add_argument("--group", required=True,
                   help="W&B group (wandb.group; default the recipe name)")
    p.add_argument("--entity", default=None)
    p.add_argument("--title", default=None)
    p.add_argument("--task", default="classify", choices=["classify", "lm"],
                   help="panels: test accuracy (classify) or validation loss vs tokens (lm)")
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_main([args.recipe, *args.overrides])
    if args.command == "check":
        return _check(args)
    if args.command == "study":
        from localsgd.study import study_main

        return study_main(args.study)
    if args.command == "plot":
        from localsgd.report.plots import plot_runs

        return plot_runs(args.run_dirs, args.out)
    if args.command == "report":
        from localsgd.report.wandb_report import report_main

        return report_main(args.project, args.group, entity=args.entity, title=args.title,
                           task=args.task)
    return 2


if __name__ == "__main__":
    sys.exit(main())
