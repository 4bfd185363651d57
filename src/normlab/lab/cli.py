"""The ``normlab`` command: run the lab's experiments and check the papers' claims."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["main", "build_parser"]

EPILOG = """\
examples:
  normlab --list                              list the experiments
  normlab run small-batch                     one experiment, quick size, outputs in normlab-out/small-batch/
  normlab run all --out results/ --seed 1     every experiment and a summary (results/index.md)
  normlab run all --jobs 1                    one process (the default is 2 worker processes)
  normlab run whitening --full --device cuda  more seeds and epochs, on the GPU
  torchrun --nproc_per_node=2 -m normlab.lab.cli run non-iid
                                              two processes (gloo), synchronized normalization, DDP

Each experiment runs one job per seed (every method trained with that seed's initial weights and
minibatch order), writes results.json, results.csv, PNG plots and report.md, and prints its results
table and claim checks: each claim's paired effects over the seeds with 95 % confidence intervals
against minimum effects fixed in the code, giving REPRODUCED / NOT REPRODUCED / INCONCLUSIVE.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``normlab`` command."""
    from .experiments import EXPERIMENTS

    p = argparse.ArgumentParser(
        prog="normlab",
        description="Train and compare normalization layers on embedded data (scikit-learn digits, "
        "MNIST-1D) and check the papers' claims from the numbers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser(
        "run",
        help="run an experiment or all of them",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("experiment", choices=[*EXPERIMENTS, "all"], help="the experiment, or 'all'")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick", help="small runs (default)")
    size.add_argument("--full", dest="preset", action="store_const", const="full", help="more seeds and epochs")
    size.add_argument("--tiny", dest="preset", action="store_const", const="tiny", help=argparse.SUPPRESS)
    run.set_defaults(preset="quick")
    run.add_argument("--out", type=Path, default=Path("normlab-out"), help="output folder (default: normlab-out)")
    run.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda (when available)")
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per process (default: 1, fastest for these small networks)",
    )
    run.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes over the (experiment, seed) jobs (default: 2, or the CPUs if fewer; "
        "1: serial in this process); the numbers do not depend on it",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _list() -> None:
    from .experiments import EXPERIMENTS, get

    for name in EXPERIMENTS:
        exp = get(name)
        print(f"{name:14s} {exp.title}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normlab`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        _list()
        return 0
    if args.command != "run":
        parser.print_help()
        return 2
    from .experiments import EXPERIMENTS, default_jobs, for_processes, get, run_experiments
    from .train import Context, Dist

    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: expected at least 1")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    # Small networks: one thread per process avoids the overhead (and shared-machine contention)
    # of intra-op parallelism; two processes under torchrun each keep their own thread.
    torch.set_num_threads(args.threads or 1)
    dist = Dist.setup()
    if device.type == "cuda" and dist.active:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    ctx = Context(args.preset, args.seed, device, args.out, dist, progress=not args.no_progress)
    names, left_out = for_processes(EXPERIMENTS if args.experiment == "all" else (args.experiment,), dist.active)
    if left_out and args.experiment != "all":
        dist.close()
        parser.error(f"{args.experiment} cannot run under torchrun: {get(args.experiment).single_process}")
    if left_out and dist.main:
        for name in left_out:
            print(f"note: {name} left out under torchrun: {get(name).single_process}")
    try:
        run_experiments(ctx, names, jobs=args.jobs if args.jobs is not None else default_jobs())
    finally:
        dist.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
