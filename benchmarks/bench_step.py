"""Steps/s of localsgd's trainer against a hand-written loop, per step, in gloo processes.

    python benchmarks/bench_step.py [--quick] [--rounds 3] [--out FILE]

Both loops train the same model with the same SGD (momentum 0.9, Nesterov, weight decay
1e-4, none on biases and BatchNorm; LR 0.1 per 64 samples) on the same pre-made batches,
generated once per rank and already on the device (8 per rank, cycled). The hand loop is
zero_grad / forward / loss / backward / step, and with 2 workers it averages parameters
and floating buffers every H steps with ``dist.all_reduce``: of one flat buffer, as
PyTorch's ``average_parameters`` does (``--hand-average tensor``: one call per tensor).
localsgd runs through ``localsgd.cli.train_main`` (one worker: ``sync.algorithm=minibatch``; two:
``sync.algorithm=local``, ``sync.period=H``), with its training data swapped for the same
pre-made batches (``step_harness.localsgd_loop``): no recipe setting feeds the trainer
tensors already on the device, and a loader would time something else.

Models: ``tiny`` (simplecnn at 8x8: host time dominates) and ``resnet20`` (32x32). Setups:
one worker; 2 workers local SGD H=16; 2 workers H=1. Each worker is a process
(``torch.multiprocessing`` spawn, gloo on loopback, ``--threads`` torch threads each). A
measurement times ``--steps`` steps after ``--warmup`` untimed ones, between two barriers;
``--rounds`` rounds run hand, localsgd, hand, localsgd, ...; medians are reported, and the
paired ratio (median over rounds of the ratio within a round). Each rank also takes its
process CPU time over the same steps (``time.process_time``), far less moved by other
load on the machine than the wall clock; its ratio is hand / localsgd CPU ms per step
(the mean over ranks), so that, as for steps/s, below 1 means localsgd works more. Then
one more run of each with host clocks around the trainer's parts
(``step_harness.clock_trainer``) gives host time per step by component. Prints tables,
writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, redirect_stdout
from dataclasses import asdict
from pathlib import Path
from typing import Any

import step_harness as h
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
MODELS = {"tiny": ("simplecnn", 8), "resnet20": ("resnet20", 32)}
"""Benchmark model name -> (registry name, image side)."""


def setups(periods: list[int]) -> list[tuple[str, int, int]]:
    """(name, workers, H) of every setup: one worker, then 2 workers for each H."""
    return [("1 worker", 1, 1), *((f"2 workers H={p}", 2, p) for p in periods)]


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:  # held open together, so all n differ
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _save_probe(check_dir: str, case: h.Case, rank: int) -> Any:
    def probe(when: str, model: torch.nn.Module) -> None:
        name = f"{case.model}_H{case.period}_rank{rank}_{when}.pt"
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                   Path(check_dir) / name)
    return probe


def run_job(job: dict[str, Any], rank: int, port: int, device: torch.device,
            check_dir: str | None) -> dict[str, Any]:
    case = h.Case(**job["case"])
    clock = h.ComponentClock() if job["clocked"] else None
    window = h.Window(case, device, clock.start if clock else None,
                      clock.stop if clock else None)
    if case.world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:  # one worker: train_main's own one-process group, as `python torchrun_entry.py`
        os.environ.pop("MASTER_ADDR", None)
    if job["loop"] == "hand":
        if case.world > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                    rank=rank, world_size=case.world)
        probe = _save_probe(check_dir, case, rank) if check_dir and case.world > 1 else None
        try:
            h.hand_loop(case, rank, device, window, clock, probe)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    else:
        printed = io.StringIO()
        try:
            with redirect_stdout(printed):  # the resolved recipe and summary of every run
                h.localsgd_loop(case, device, window, clock)
        except BaseException:
            print(printed.getvalue()[-4000:], file=sys.stderr)
            raise
    out = {**job, "steps_per_s": case.steps / window.seconds,
           "cpu_ms_per_step": window.cpu_seconds / case.steps * 1e3}
    if clock is not None:
        out["ms_per_step"] = h.breakdown(clock, case.steps, "trainer loop" if
                                         job["loop"] == "localsgd" else "loop")
    return out


def worker(rank: int, world: int, plan_file: str) -> None:
    plan = json.loads(Path(plan_file).read_text())
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(plan["threads"])
    device = torch.device(plan["device"])
    results = []
    for job, port in zip(plan["jobs"], plan["ports"], strict=True):
        results.append(run_job(job, rank, port, device, plan["check_dir"]))
        if rank == 0:
            r = results[-1]
            print(f"  {r['case']['model']} {r['setup']} round {r['round']} {r['loop']}: "
                  f"{r['steps_per_s']:.1f} steps/s, {r['cpu_ms_per_step']:.2f} CPU ms a "
                  "step", flush=True)
    Path(f"{plan['out']}.rank{rank}").write_text(json.dumps(results))


def plan_jobs(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    jobs = []
    for model in args.models:
        name, size = MODELS[model]
        for setup, workers, period in setups(args.periods):
            if workers != world:
                continue
            case = h.Case(name, size, args.batch[model], workers, period, args.warmup,
                          args.steps[model], args.hand_average)
            for r in range(args.rounds):
                for loop in ("hand", "localsgd"):
                    jobs.append({"setup": setup, "round": r, "loop": loop, "clocked": False,
                                 "case": asdict(case)})
            for loop in ("hand", "localsgd"):
                jobs.append({"setup": setup, "round": "clocked", "loop": loop,
                             "clocked": True, "case": asdict(case)})
    return jobs


def run_pool(args: argparse.Namespace, world: int, tmp: Path) -> list[dict[str, Any]]:
    jobs = plan_jobs(args, world)
    if not jobs:
        return []
    plan = {"jobs": jobs, "ports": free_ports(len(jobs)), "threads": args.threads,
            "device": args.device, "check_dir": args.check_dir,
            "out": str(tmp / f"results_{world}.json")}
    plan_file = tmp / f"plan_{world}.json"
    plan_file.write_text(json.dumps(plan))
    mp.start_processes(worker, args=(world, str(plan_file)), nprocs=world,
                       start_method="spawn")
    ranks = [json.loads(Path(f"{plan['out']}.rank{r}").read_text()) for r in range(world)]
    results = ranks[0]
    for i, r in enumerate(results):  # rank 0's record, with every rank's CPU time
        r["cpu_ms_per_step_ranks"] = [rank[i]["cpu_ms_per_step"] for rank in ranks]
        r["cpu_ms_per_step"] = statistics.mean(r["cpu_ms_per_step_ranks"])
    return results


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cases: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        c = cases.setdefault((r["case"]["model"], r["setup"]), {
            "model": r["case"]["model"], "setup": r["setup"], **r["case"],
            "hand_steps_per_s": [], "localsgd_steps_per_s": [], "hand_cpu_ms": [],
            "localsgd_cpu_ms": [], "ms_per_step": {}})
        if r["clocked"]:
            c["ms_per_step"][r["loop"]] = r["ms_per_step"]
        else:
            c[f"{r['loop']}_steps_per_s"].append(r["steps_per_s"])
            c[f"{r['loop']}_cpu_ms"].append(r["cpu_ms_per_step"])
    for c in cases.values():
        hand, ours = c["hand_steps_per_s"], c["localsgd_steps_per_s"]
        c["median_hand"], c["median_localsgd"] = statistics.median(hand), statistics.median(ours)
        c["ratio"] = c["median_localsgd"] / c["median_hand"]
        c["paired_ratio"] = statistics.median(o / x for o, x in zip(ours, hand, strict=True))
        # CPU time per step, the mean over ranks; the ratio is hand / localsgd, so that,
        # as for steps/s, below 1 means localsgd does more work per step.
        hand_cpu, ours_cpu = c["hand_cpu_ms"], c["localsgd_cpu_ms"]
        c["median_hand_cpu_ms"] = statistics.median(hand_cpu)
        c["median_localsgd_cpu_ms"] = statistics.median(ours_cpu)
        c["cpu_ratio"] = c["median_hand_cpu_ms"] / c["median_localsgd_cpu_ms"]
        c["cpu_paired_ratio"] = statistics.median(
            x / o for o, x in zip(ours_cpu, hand_cpu, strict=True))
    return list(cases.values())


def print_tables(cases: list[dict[str, Any]]) -> None:
    print("\n| model | setup | hand steps/s | localsgd steps/s | localsgd / hand | paired | "
          "hand CPU ms/step | localsgd CPU ms/step | CPU hand / localsgd | CPU paired |")
    print("|---|---|" + "---:|" * 8)
    for c in cases:
        print(f"| {c['model']} | {c['setup']} | {c['median_hand']:.1f} | "
              f"{c['median_localsgd']:.1f} | {c['ratio']:.3f} | {c['paired_ratio']:.3f} | "
              f"{c['median_hand_cpu_ms']:.2f} | {c['median_localsgd_cpu_ms']:.2f} | "
              f"{c['cpu_ratio']:.3f} | {c['cpu_paired_ratio']:.3f} |")
    print("\nHost ms per step, clocked run (localsgd groups; engine = its own code + model "
          "forward + backward + optimizer step):")
    print("| model | setup | localsgd total | trainer | engine | (own) | (fwd/bwd/opt) | "
          "sync controller | reporters | hand total | hand fwd/bwd/opt | hand averaging | "
          "hand loop |")
    print("|---|---|" + "---:|" * 11)
    for c in cases:
        ms, hand = c["ms_per_step"]["localsgd"], c["ms_per_step"]["hand"]
        group = {g: sum(ms.get(k, 0.0) for k in parts) for g, parts in h.GROUPS.items()}
        compute = sum(ms.get(k, 0.0) for k in ("model forward", "backward", "optimizer step"))
        hand_compute = sum(hand.get(k, 0.0) for k in ("model forward", "backward",
                                                      "optimizer step"))
        print(f"| {c['model']} | {c['setup']} | {ms['total']:.3f} | {group['trainer']:.3f} | "
              f"{group['engine']:.3f} | {ms.get('engine', 0.0):.3f} | {compute:.3f} | "
              f"{group['sync controller']:.3f} | {group['reporters']:.3f} | "
              f"{hand['total']:.3f} | {hand_compute:.3f} | {hand.get('averaging', 0.0):.3f} | "
              f"{hand['loop']:.3f} |")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a few steps of everything, H=4 instead of 16, one round (tests)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps-tiny", type=int, default=128)
    ap.add_argument("--steps-resnet20", type=int, default=None,
                    help="default 16 on CPU, 64 on CUDA")
    ap.add_argument("--batch-tiny", type=int, default=32)
    ap.add_argument("--batch-resnet20", type=int, default=None,
                    help="default 8 on CPU, 128 on CUDA")
    ap.add_argument("--models", default="tiny,resnet20")
    ap.add_argument("--periods", default="16,1", help="H of the 2-worker setups")
    ap.add_argument("--hand-average", choices=sorted(h.AVERAGES), default="flat")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check-dir", default=None,
                    help="save each 2-worker hand loop's models around its last average")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                    "step_cpu.json")
    args = ap.parse_args(argv)
    gpu = args.device == "cuda"
    args.batch = {"tiny": args.batch_tiny,
                  "resnet20": args.batch_resnet20 or (128 if gpu else 8)}
    args.steps = {"tiny": args.steps_tiny,
                  "resnet20": args.steps_resnet20 or (64 if gpu else 16)}
    args.periods = [int(p) for p in args.periods.split(",")]
    args.models = args.models.split(",")
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    if args.quick:  # the tiny model unless --models says otherwise
        args.rounds, args.warmup, args.periods = 1, 4, [4, 1]
        args.steps = {"tiny": 8, "resnet20": 8}
        args.batch = {"tiny": 8, "resnet20": 4}
        args.models = args.models if "--models" in " ".join(argv or sys.argv) else ["tiny"]
    if args.rounds < 1 or args.warmup < 1 or min(args.steps.values()) < 1:
        ap.error("--rounds, --warmup and --steps-* must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory() as tmp:
        results = [*run_pool(args, 1, Path(tmp)), *run_pool(args, 2, Path(tmp))]
    cases = summarise(results)
    print_tables(cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else platform.processor() or "cpu")
    args.out.write_text(json.dumps({
        "command": sys.argv, "device": device, "cpus": os.cpu_count(),
        "torch": torch.__version__, "threads_per_worker": args.threads, "date": started,
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
