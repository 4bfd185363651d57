"""The lab's experiments and the machinery that runs them and writes their outputs.

Each experiment module defines an :class:`Experiment` made of paired, per-seed jobs: ``job(ctx, s)``
trains and measures every method of the experiment with seed ``ctx.run_seed(s)`` (the same initial
weights and minibatch order for every method) and returns JSON-ready numbers; ``collect`` puts the
jobs' outputs (in seed order) into one results dict; ``claims`` checks the papers' claims from those
results alone; ``table`` and ``plot`` present them.

:func:`run_experiments` runs every (experiment, seed) job, over a pool of worker processes when
``jobs > 1`` (each with the parent's torch thread count), puts the outputs back in seed order and
writes ``results.json``, ``results.csv``, the plots and ``report.md`` per experiment, then a summary
(``summary.json``, ``index.md``). Every job seeds itself, so a pooled run gives the numbers of a
serial one.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..report import Claim, Effect, claims_markdown, format_table, markdown_table, versions, write_outputs
from ..train import SEED_RULE, Context, seed_everything

__all__ = [
    "Experiment",
    "EXPERIMENTS",
    "get",
    "default_jobs",
    "run_job",
    "run_experiments",
    "for_processes",
    "run_experiment",
    "run_all",
]


@dataclass(frozen=True)
class Experiment:
    """One experiment: what it reproduces, its per-seed job, and the functions that collect, check, tabulate and plot.

    * ``seeds(ctx)``: the number of paired repetitions for ``ctx.preset`` (at least 8 for quick and full).
    * ``job(ctx, s)``: repetition ``s`` of every method with seed ``ctx.run_seed(s)``; deterministic and
      self-seeding (the same preset, base seed and ``s`` give the same numbers in any process).
    * ``collect(ctx, outputs)``: the jobs' outputs in seed order -> the results dict (with ``settings``).
    * ``claims(results)``: the claim checks, from the results alone (recomputable from ``results.json``).
    * ``table(results)``: headers and rows; ``plot(results, out)``: writes PNGs, returns their names.
    * ``single_process``: empty when the experiment runs under torchrun (each process on its share of
      every global batch); otherwise why it cannot.
    """

    name: str
    title: str
    description: str
    seeds: Callable[[Context], int]
    job: Callable[[Context, int], dict[str, Any]]
    collect: Callable[[Context, list[dict[str, Any]]], dict[str, Any]]
    claims: Callable[[dict[str, Any]], list[Claim]]
    table: Callable[[dict[str, Any]], tuple[list[str], list[list[Any]]]]
    plot: Callable[[dict[str, Any], Path], list[str]]
    single_process: str = ""


_MODULES = {
    "small-batch": "small_batch",
    "non-iid": "non_iid",
    "whitening": "whitening",
    "domain-shift": "domain_shift",
    "weight-norm": "weight_norm",
    "normprop": "normprop",
    "batch-norm": "batch_norm",
}
EXPERIMENTS: tuple[str, ...] = tuple(_MODULES)


def for_processes(names: Sequence[str], distributed: bool) -> tuple[list[str], list[str]]:
    """``names`` split into those that run here and those left out: under torchrun (``distributed``) the
    experiments with a :attr:`Experiment.single_process` reason are left out."""
    if not distributed:
        return list(names), []
    out = [n for n in names if get(n).single_process]
    return [n for n in names if n not in out], out


def get(name: str) -> Experiment:
    """The experiment called ``name`` (one of :data:`EXPERIMENTS`)."""
    if name not in _MODULES:
        raise ValueError(f"normlab lab: unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}").EXPERIMENT


def run_job(name: str, ctx: Context, s: int) -> tuple[dict[str, Any], float]:
    """Run repetition ``s`` of experiment ``name`` after seeding every global generator with its seed.

    Returns the job's output and the CPU seconds its process spent on it (core-seconds: on a shared
    machine the wall time also counts other people's work).
    """
    exp = get(name)
    seed_everything(ctx.run_seed(s))
    start = time.process_time()
    output = exp.job(ctx, s)
    return output, time.process_time() - start


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _pooled_job(task: tuple[str, Context, int]) -> tuple[dict[str, Any], float]:
    return run_job(*task)


def _run_jobs(tasks: list[tuple[str, int]], ctx: Context, jobs: int) -> list[tuple[dict[str, Any], float]]:
    """Every task's (output, seconds), in the order of ``tasks``; over ``jobs`` worker processes if > 1."""
    with ctx.bar(total=len(tasks), desc="jobs") as bar:
        if jobs <= 1 or ctx.dist.active or len(tasks) <= 1:
            # Under torchrun every process runs every job in the same order (their collectives pair up).
            results = []
            for name, s in tasks:
                results.append(run_job(name, ctx, s))
                bar.update(1)
            return results
        quiet = dataclasses.replace(ctx, progress=False)
        # spawn, not fork: a forked child of a process that already ran torch's thread pools can hang.
        mp = multiprocessing.get_context("spawn")
        pool = mp.Pool(min(jobs, len(tasks)), initializer=_init_worker, initargs=(torch.get_num_threads(),))
        try:
            results = []
            for item in pool.imap(_pooled_job, [(name, quiet, s) for name, s in tasks], chunksize=1):
                results.append(item)
                bar.update(1)
            pool.close()  # an orderly exit: the workers finish and release their semaphores
        except BaseException:
            pool.terminate()
            raise
        finally:
            pool.join()
        return results


def default_jobs() -> int:
    """Two worker processes, or the number of usable CPUs if fewer."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not every platform has sched_getaffinity
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


def run_experiments(ctx: Context, names: Sequence[str], jobs: int = 1) -> list[dict[str, Any]]:
    """Run every seed job of ``names`` (over ``jobs`` processes), then collect, check, print and write each.

    Returns one summary row per claim: experiment, claim name, statement, verdict, the experiment's
    job seconds (CPU seconds of its seed jobs, summed: core-seconds).
    """
    exps = [get(n) for n in names]
    counts = [exp.seeds(ctx) for exp in exps]
    tasks = [(exp.name, s) for exp, n in zip(exps, counts) for s in range(n)]
    start = time.perf_counter()
    done = _run_jobs(tasks, ctx, jobs)
    wall = time.perf_counter() - start
    summary: list[dict[str, Any]] = []
    at = 0
    for exp, n in zip(exps, counts):
        outputs = [out for out, _ in done[at : at + n]]
        seconds = sum(sec for _, sec in done[at : at + n])
        at += n
        summary += _finish(exp, ctx, outputs, seconds, n, jobs)
    if ctx.dist.main:
        _write_summary(ctx, summary, wall, jobs)
    return summary


def _finish(
    exp: Experiment, ctx: Context, outputs: list[dict[str, Any]], seconds: float, n: int, jobs: int
) -> list[dict[str, Any]]:
    results = exp.collect(ctx, outputs)
    results |= {
        "experiment": exp.name,
        "preset": ctx.preset,
        "seed": ctx.seed,
        "seeds": n,
        "seed_rule": SEED_RULE,  # the rule Context.run_seed implements
        "device": str(ctx.device),
        "processes": ctx.dist.world,
        "job_seconds": seconds,
        "versions": versions() | {"worker_processes": str(1 if ctx.dist.active else jobs)},
    }
    claims = exp.claims(results)
    headers, rows = exp.table(results)
    out = ctx.out / exp.name
    if ctx.dist.main:
        out.mkdir(parents=True, exist_ok=True)
        plots = exp.plot(results, out)
        write_outputs(out, exp.title, results, claims, headers, rows, plots, exp.description)
        print(f"\n== {exp.name}: {exp.title} ({n} seeds, {seconds:.1f} core-seconds) ==")
        print(format_table(headers, rows))
        for note in results.get("notes", []):
            print(f"note: {note}")
        for c in claims:
            print(c.summary())
        print(f"outputs: {out}")
    return [
        {
            "experiment": exp.name,
            "claim": c.name,
            "statement": c.statement,
            "verdict": c.verdict,
            "effects": [e.to_dict() for e in c.effects],
            "missing": list(c.missing),
            "job_seconds": seconds,
        }
        for c in claims
    ]


def _write_summary(ctx: Context, summary: list[dict[str, Any]], wall: float, jobs: int) -> None:
    headers = ["experiment", "claim", "verdict", "core s"]
    rows = [[s["experiment"], s["claim"], s["verdict"], round(s["job_seconds"], 1)] for s in summary]
    ctx.out.mkdir(parents=True, exist_ok=True)
    workers = 1 if ctx.dist.active else jobs
    print(f"\n== summary ({ctx.preset}, base seed {ctx.seed}, {workers} worker process(es), wall {wall:.1f} s) ==")
    print(format_table(headers, rows))
    payload = {"preset": ctx.preset, "seed": ctx.seed, "jobs": workers, "wall_seconds": wall}
    payload |= {"versions": versions(), "claims": summary}
    (ctx.out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
    md_rows = [[f"[{r[0]}]({r[0]}/report.md)", *r[1:]] for r in rows]
    index = [
        "# normlab lab: summary",
        "",
        f"Preset `{ctx.preset}`, base seed {ctx.seed}, {workers} worker process(es), {ctx.dist.world} "
        f"training process(es) on {ctx.device}; wall time {wall:.1f} s. Core seconds: the CPU time of an "
        "experiment's seed jobs, summed.",
        "",
        markdown_table(headers, md_rows),
        "",
        "Each claim below: its full statement, then each effect: the paired difference over seeds with its 95 % "
        "interval and what the claim needs (a minimum effect or an equivalence margin fixed in the experiment's "
        "code).",
        "",
    ]
    for name in dict.fromkeys(s["experiment"] for s in summary):
        index += [f"## [{name}]({name}/report.md)", ""]
        index += claims_markdown([_claim_of(s) for s in summary if s["experiment"] == name])
    index += ["Versions: " + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()), ""]
    (ctx.out / "index.md").write_text("\n".join(index))


def _claim_of(row: dict[str, Any]) -> Claim:
    effects = [Effect(**{k: v for k, v in e.items() if k != "verdict"}) for e in row["effects"]]
    return Claim(row["claim"], row["statement"], effects, list(row["missing"]))


def run_experiment(name: str, ctx: Context, jobs: int = 1) -> list[dict[str, Any]]:
    """Run one experiment (:func:`run_experiments` with one name); return its claims' summary rows."""
    return run_experiments(ctx, [name], jobs)


def run_all(ctx: Context, names: Sequence[str] = EXPERIMENTS, jobs: int = 1) -> list[dict[str, Any]]:
    """Run ``names`` (all experiments by default) and write the summary; return the claims' summary rows."""
    return run_experiments(ctx, names, jobs)
