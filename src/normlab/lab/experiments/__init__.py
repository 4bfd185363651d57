"""The lab's experiments and the machinery that runs them and writes their outputs.

Each experiment module defines an :class:`Experiment`: ``run(ctx)`` trains and measures and returns
a JSON-ready results dict (with its ``settings``), ``claim(results)`` checks the paper's claim from
those numbers alone, ``table(results)`` gives the results table and ``plot(results, out)`` writes the
PNG plots. :func:`run_experiment` times it, seeds it and writes ``results.json``, ``results.csv``,
the plots and ``report.md``; :func:`run_all` adds a summary over experiments and an index report.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..report import Claim, format_table, markdown_table, versions, write_outputs
from ..train import SEED_RULE, Context, seed_everything

__all__ = ["Experiment", "EXPERIMENTS", "get", "run_experiment", "run_all"]


@dataclass(frozen=True)
class Experiment:
    """One experiment: what it reproduces and the functions that run, check, tabulate and plot it."""

    name: str
    title: str
    description: str
    run: Callable[[Context], dict[str, Any]]
    claim: Callable[[dict[str, Any]], Claim]
    table: Callable[[dict[str, Any]], tuple[list[str], list[list[Any]]]]
    plot: Callable[[dict[str, Any], Path], list[str]]


_MODULES = {
    "small-batch": "small_batch",
    "non-iid": "non_iid",
    "whitening": "whitening",
    "domain-shift": "domain_shift",
    "weight-norm": "weight_norm",
    "normprop": "normprop",
}
EXPERIMENTS: tuple[str, ...] = tuple(_MODULES)


def get(name: str) -> Experiment:
    """The experiment called ``name`` (one of :data:`EXPERIMENTS`)."""
    if name not in _MODULES:
        raise ValueError(f"normlab lab: unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}").EXPERIMENT


def run_experiment(name: str, ctx: Context, out: Path | None = None) -> dict[str, Any]:
    """Run one experiment, print its table and claim check, write its outputs; return a summary row."""
    exp = get(name)
    out = Path(out if out is not None else ctx.out / name)
    seed_everything(ctx.seed)
    start = time.perf_counter()
    results = exp.run(ctx)
    wall = time.perf_counter() - start
    results |= {
        "experiment": name,
        "preset": ctx.preset,
        "seed": ctx.seed,
        "seed_rule": SEED_RULE,  # the rule Context.run_seed implements
        "device": str(ctx.device),
        "processes": ctx.dist.world,
        "wall_seconds": wall,
        "versions": versions(),
    }
    claim = exp.claim(results)
    headers, rows = exp.table(results)
    if ctx.dist.main:
        out.mkdir(parents=True, exist_ok=True)
        plots = exp.plot(results, out)
        write_outputs(out, exp.title, results, claim, headers, rows, plots, exp.description)
        print(f"\n== {name}: {exp.title} ({wall:.1f} s) ==")
        print(format_table(headers, rows))
        for note in results.get("notes", []):
            print(f"note: {note}")
        print(claim.summary())
        print(f"outputs: {out}")
    passed = f"{sum(c.passed for c in claim.criteria)}/{len(claim.criteria)}"
    return {
        "experiment": name,
        "verdict": claim.verdict,
        "criteria_passed": passed,
        "claim": claim.statement,
        "wall_seconds": wall,
    }


def run_all(ctx: Context, names: Sequence[str] = EXPERIMENTS) -> list[dict[str, Any]]:
    """Run ``names`` in order, then print and write the summary (``summary.json``, ``index.md``)."""
    start = time.perf_counter()
    summary = [run_experiment(n, ctx) for n in names]
    wall = time.perf_counter() - start
    headers = ["experiment", "verdict", "criteria passed", "wall s", "claim"]
    rows = [
        [s["experiment"], s["verdict"], s["criteria_passed"], round(s["wall_seconds"], 1), s["claim"]] for s in summary
    ]
    if ctx.dist.main:
        ctx.out.mkdir(parents=True, exist_ok=True)
        print(f"\n== summary ({ctx.preset}, seed {ctx.seed}, {wall:.1f} s) ==")
        print(format_table(headers, rows))
        payload = {"preset": ctx.preset, "seed": ctx.seed, "wall_seconds": wall, "versions": versions()}
        payload["experiments"] = summary
        (ctx.out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n")
        md_rows = [[f"[{r[0]}]({r[0]}/report.md)", *r[1:]] for r in rows]
        index = [
            "# normlab lab: summary",
            "",
            f"Preset `{ctx.preset}`, seed {ctx.seed}, {ctx.dist.world} process(es) on {ctx.device}; "
            f"total wall time {wall:.1f} s.",
            "",
            markdown_table(headers, md_rows),
            "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()),
            "",
        ]
        (ctx.out / "index.md").write_text("\n".join(index))
    return summary
