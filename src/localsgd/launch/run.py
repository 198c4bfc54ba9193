"""``localsgd run [torchrun options] RECIPE [key=value ...]``: torchrun with the recipe checked
first.

torchrun's own parser reads the options, so every one of them (``--nnodes``,
``--nproc-per-node``, ``--rdzv-*``, ``--max-restarts``, ``--standalone``, ...) means what it
means to torchrun. The recipe is loaded and checked once here: a bad one exits 2 with the
one-line error before any worker starts. The workers are then started in this process by
torchrun's launcher API, each running ``python -m localsgd train RECIPE [key=value ...]``,
the same entry ``torchrun torchrun_entry.py`` uses. A failed job ends with one line per
failed rank instead of torchrun's traceback and summary. A multi-node rendezvous (static or
c10d) says what it waits for while it waits (``rendezvous``).
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from typing import Any

from localsgd.config import ConfigError


def _fixed_nodes(nnodes: str) -> int | None:
    """The node count of ``--nnodes N``; None for an elastic range ``MIN:MAX``."""
    low, _, high = nnodes.partition(":")
    return int(low) if not high or high == low else None


def _checked(recipe: str, overrides: list[str], nnodes: str,
             nproc: str) -> tuple[Any, list[str]]:
    """(the recipe or None, every problem of it under this launch)."""
    from localsgd.recipe import load_config, validate_launch

    try:
        with warnings.catch_warnings():
            # Keys without effect are reported once, by rank 0 of the job.
            warnings.simplefilter("ignore")
            cfg = load_config(recipe, overrides)
        nodes = _fixed_nodes(nnodes)
        if nodes is not None and nproc.isdigit():
            validate_launch(cfg, nodes * int(nproc), int(nproc))
    except ConfigError as exc:
        return None, exc.problems
    except ValueError as exc:
        return None, [f"--nnodes: {exc}"]
    return cfg, []


def launch_problems(recipe: str, overrides: list[str], nnodes: str, nproc: str) -> list[str]:
    """Every problem of the recipe under this launch (empty when it may start)."""
    return _checked(recipe, overrides, nnodes, nproc)[1]


def _launch(args: Any, timeout_s: float) -> None:
    """torchrun's ``run(args)``; a multi-node rendezvous says what it waits for.

    The rendezvous (static: ``--nnodes=N --master-addr/--master-port``, or
    ``--rdzv-backend=c10d``) waits for the other nodes before any worker exists; its wait
    is bounded by the recipe's ``dist.timeout_s`` unless ``--rdzv-conf`` gives ``timeout``
    (static) or ``join_timeout`` (either).
    """
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, run

    from localsgd.launch.rendezvous import BACKEND, C10D_BACKEND, register

    many = int(args.nnodes.partition(":")[2] or args.nnodes)
    static = args.rdzv_backend == "static" and not args.standalone and (
        args.rdzv_endpoint or args.master_port is not None or many > 1)
    c10d = args.rdzv_backend == "c10d" and not args.standalone and many > 1
    if not (static or c10d):
        run(args)
        return
    if args.master_port is None:
        args.master_port = 29500
    config, cmd, cmd_args = config_from_args(args)
    conf = config.rdzv_configs
    given = {kv.partition("=")[0].strip() for kv in (args.rdzv_conf or "").split(",")}
    wait = math.ceil(timeout_s)
    if static and "timeout" not in given:  # torchrun's default (900 s) gives way to the recipe's
        conf["timeout"] = int(conf.pop("join_timeout", wait))
    if c10d and "join_timeout" not in given:
        conf["join_timeout"] = wait
    conf["localsgd_nproc"] = config.nproc_per_node
    register()
    config.rdzv_backend = BACKEND if static else C10D_BACKEND
    elastic_launch(config=config, entrypoint=cmd)(*cmd_args)


def torchrun_args(argv: list[str]) -> Any:
    """torchrun's own reading of ``[options] RECIPE [key=value ...]``; ValueError if bad."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "localsgd run"
    parser.usage = "localsgd run [torchrun options] RECIPE.yaml [dotted.key=value ...]"

    def error(message: str) -> None:
        raise ValueError(message)

    parser.error = error  # type: ignore[method-assign]
    return parser.parse_args(argv)


def run_main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    try:
        args = torchrun_args(argv)
    except ValueError as exc:
        print(f"localsgd: error: {exc}; usage: localsgd run [torchrun options] RECIPE.yaml "
              "[dotted.key=value ...]", file=sys.stderr, flush=True)
        return 2
    recipe, overrides = args.training_script, list(args.training_script_args)
    from localsgd.launch.options import option_problems

    problems = option_problems(args)
    cfg = None
    if not problems:
        cfg, problems = _checked(recipe, overrides, args.nnodes, str(args.nproc_per_node))
    if problems:
        print(f"localsgd: error: {ConfigError(problems)}", file=sys.stderr, flush=True)
        return 2
    args.module, args.no_python = True, False
    args.training_script, args.training_script_args = "localsgd", ["train", recipe, *overrides]
    # torchrun's agent logs each failure, then a traceback; the workers have already said
    # what went wrong, and the line below says which of them did.
    for name in ("torch.distributed.elastic", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        _launch(args, cfg.dist.timeout_s)
    except RendezvousError as exc:
        print(f"localsgd: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        ranks = ", ".join(f"rank {rank} exit code {f.exitcode}" for rank, f in failures)
        print(f"localsgd: error: the job failed ({ranks}); the workers' messages are above",
              file=sys.stderr, flush=True)
        codes = [f.exitcode for _, f in failures if f.exitcode > 0]
        return codes[0] if codes else 1
    return 0
