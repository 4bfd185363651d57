"""Run the benchmarks: ``python benchmarks/run.py [--only NAME ...] [--repeats N] [--markdown FILE] [--keep-memory]``.

``--only`` names case files (``cases_NAME.py``): brn, cbn, dbn, wn, model (whole models, eager) and
model_compiled (the same models under ``torch.compile``; run only when named, since compiling them
takes minutes). Without it, every case file but model_compiled runs.

Every case compares a normlab layer with torch's native BatchNorm on the same shape in the same
run, and prints the time and peak-memory ratios with their targets.

``--keep-memory`` reruns the process with glibc's heap trimming and mmap allocations turned off
(``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``), for layer and baseline alike. torch's CPU
allocator has no cache: with glibc's defaults every freed buffer of a few MB goes back to the kernel
and the next step pays its page faults again (about 1 ms per 2 MB on a small VM), which times the
machine's memory management more than the layers. A caching allocator (jemalloc, tcmalloc), which
PyTorch's CPU performance guide recommends, behaves like this setting.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import markdown, run_case  # noqa: E402

_KEEP_MEMORY = {"MALLOC_TRIM_THRESHOLD_": "1000000000000", "MALLOC_MMAP_THRESHOLD_": "1000000000"}


def memory_mode() -> str:
    """How this process's allocator returns memory (see ``--keep-memory``)."""
    kept = all(os.environ.get(k) == v for k, v in _KEEP_MEMORY.items())
    return "glibc malloc, trimming and mmap off (--keep-memory)" if kept else "glibc malloc defaults"


def machine() -> str:
    """A one-line description of this machine and software."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {memory_mode()}, {datetime.date.today().isoformat()}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="case files to run, e.g. brn dbn cbn model model_compiled")
    p.add_argument("--repeats", type=int, default=15, help="timed repetitions per case (median taken)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    p.add_argument("--keep-memory", action="store_true", help="rerun with glibc's heap trimming off (see above)")
    args = p.parse_args(argv)
    if args.keep_memory and any(os.environ.get(k) != v for k, v in _KEEP_MEMORY.items()):
        # glibc reads these at start-up: set them and start again.
        os.environ.update(_KEEP_MEMORY)
        rest = sys.argv[1:] if argv is None else argv
        os.execv(sys.executable, [sys.executable, str(Path(__file__).resolve()), *rest])
    torch.manual_seed(0)
    names = sorted(f.stem.removeprefix("cases_") for f in HERE.glob("cases_*.py"))
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            p.error(f"unknown case files {unknown}; known: {names}")
        names = [n for n in names if n in args.only]
    modules = [importlib.import_module(f"cases_{name}") for name in names]
    if not args.only:
        # A case file with DEFAULT = False (say, one that compiles models for minutes) runs only when named.
        modules = [m for m in modules if getattr(m, "DEFAULT", True)]
    results = []
    for module in modules:
        for case in module.CASES:
            r = run_case(case, args.repeats)
            print(
                f"{case.group:>24} {case.label:>22} {'x'.join(map(str, case.shape)):>16}  "
                f"time {r.time_ratio:5.2f}x  memory {r.memory_ratio:5.2f}x  {'ok' if r.ok else 'MISSED'}",
                flush=True,
            )
            results.append(r)
    table = f"Machine: {machine()}\n\n{markdown(results)}\n"
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
