"""Helpers the experiments share: the normalizers' options, learning-rate grids, the effects plot, saving.

Experiment modules import from here (and the :class:`Experiment` registry), never from each other.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import normlab

from ..report import NOT_REPRODUCED, REPRODUCED, Claim, pyplot

__all__ = [
    "NORM_OPTION_NOTES",
    "norm_options",
    "curve_means",
    "grid_optimum",
    "chosen_rate",
    "at_chosen",
    "VERDICT_COLORS",
    "plot_effects",
    "effects_figure",
    "save_effects",
    "legend_below",
    "save",
]

NORM_OPTION_NOTES = {
    "bn": "torch BatchNorm2d, momentum 0.1",
    "brn": "momentum 0.1, r_max/d_max: paper_schedule(steps / 130000) (the paper's warm-up over this run's steps)",
    "cbn": "window 8 (the paper's k), burn_in = steps // 4",
    "gn": "num_groups 4",
    "dbn": "group_size 8, ZCA",
    "bkn": "p 0.9, micro_batch = the small batch (micro-batches within the global batch)",
    "ghost": "virtual_batch_size = the small batch (ghost batches within the global batch), momentum 0.1 per ghost",
}


def norm_options(kind: str, steps: int, small_batch: int | None = None) -> dict[str, Any]:
    """The constructor options :func:`normlab.convert` gets for ``kind`` in a run of ``steps`` optimizer steps.

    As :data:`NORM_OPTION_NOTES` says: BRN's r_max/d_max warm-up is the paper's 130000-step schedule
    scaled to the run, CBN's burn-in is a quarter of it, ghost batches hold ``small_batch`` samples
    (the layer's default when ``None``); other kinds get their defaults.
    """
    if kind == "ghost":
        return {} if small_batch is None else {"virtual_batch_size": small_batch}
    if kind == "bkn":
        return {} if small_batch is None else {"micro_batch": small_batch}
    if kind == "brn":
        return {"momentum": 0.1, **normlab.paper_schedule(steps / 130_000)}
    if kind == "gn":
        return {"num_groups": 4}
    if kind == "cbn":
        return {"window": 8, "burn_in": steps // 4}
    if kind == "dbn":
        return {"group_size": 8}
    return {}


def curve_means(curves: Sequence[Sequence[float]]) -> list[float]:
    """Each non-empty curve's mean (a training-loss curve's area per step: lower is faster)."""
    return [sum(c) / len(c) for c in curves if c]


def grid_optimum(scores: Mapping[float, float], what: str = "learning rate") -> tuple[float, str | None]:
    """The grid value with the lowest score (e.g. final training loss) and a note if it lies on the grid's edge.

    An optimum at the smallest or largest value of the grid means the grid may not contain the true
    optimum, so a comparison at it may be unfair; the note says so (``None`` inside the grid, or for a
    grid of one value, which is a fixed setting rather than a search).
    """
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    if not finite:
        raise ValueError(f"grid_optimum: no finite score over the {what} grid {sorted(scores)}")
    best = min(finite, key=lambda k: (finite[k], k))
    grid = sorted(scores)
    note = None
    if len(grid) > 1 and best in (grid[0], grid[-1]):
        edge = "smallest" if best == grid[0] else "largest"
        note = f"optimum on the grid's edge: the best {what} {best:g} is the {edge} of {grid}"
    return best, note


VERDICT_COLORS = {REPRODUCED: "tab:green", NOT_REPRODUCED: "tab:red"}  # anything else (INCONCLUSIVE): grey


def chosen_rate(cells_by_rate: Mapping[str, Sequence[Mapping[str, Any]]], key: str) -> tuple[float | None, str | None]:
    """The grid's rate whose per-seed cells have the lowest mean ``key`` (a training loss), and
    :func:`grid_optimum`'s note when it is on the grid's edge.

    ``cells_by_rate`` maps each rate (as ``str(rate)``) to its per-seed cells. A rate where some
    seed's value is not finite (``None`` in a saved ``results.json``) does not count; ``(None, note)``
    when none counts.
    """
    scores = {}
    for lr, cells in cells_by_rate.items():
        values = [c[key] for c in cells]
        ok = values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        scores[float(lr)] = sum(values) / len(values) if ok else math.inf
    try:
        return grid_optimum(scores)
    except ValueError:
        return None, f"diverged at every learning rate of {sorted(scores)}"


def at_chosen(results: Mapping[str, Any], variant: str) -> list[dict[str, Any]]:
    """The per-seed cells of ``variant`` at its chosen rate (``settings.chosen_learning_rate``); none
    when it diverged at every rate."""
    lr = results["settings"]["chosen_learning_rate"].get(variant)
    return [] if lr is None else results["cells"][variant][str(lr)]


def plot_effects(ax: Any, claims: Sequence[Claim], title: str = "effects (paired, 95 % interval)") -> None:
    """Each effect of ``claims`` as its mean and 95 % interval on its own row, with its threshold(s).

    The axis spans the intervals and the thresholds (not 0..100 %), so a 1-point effect is visible.
    A ``greater`` effect shows its minimum effect as a dashed line, an ``equivalent`` one its margin
    as a shaded band; the colour is the verdict (green reproduced, red not, grey inconclusive).
    """
    effects = [(c, e) for c in claims for e in c.effects]
    if not effects:  # nothing measured: say why instead of drawing an empty axis
        why = "; ".join(m for c in claims for m in c.missing) or "no effect"
        text = textwrap.fill(f"not checked: {why}", 60)
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title)
        return
    for row, (_, e) in enumerate(effects):
        y = len(effects) - 1 - row
        color = VERDICT_COLORS.get(e.verdict, "tab:gray")
        lo = e.low if math.isfinite(e.low) else e.mean
        hi = e.high if math.isfinite(e.high) else e.mean
        ax.errorbar([e.mean], [y], xerr=[[e.mean - lo], [hi - e.mean]], fmt="o", color=color, capsize=4)
        if e.kind == "greater":
            ax.plot([e.threshold] * 2, [y - 0.4, y + 0.4], color="black", linestyle="--", linewidth=1)
        else:
            ax.fill_betweenx([y - 0.4, y + 0.4], -e.threshold, e.threshold, color="tab:blue", alpha=0.12)
    ax.axvline(0.0, color="gray", linewidth=0.8)
    units = sorted({e.unit for _, e in effects})
    unit = f" ({', '.join(units)})" if units else ""
    if len(effects) == 1:  # one effect (the usual case): the title names the claim, the x label the effect
        ax.set_yticks([])
        ax.set_xlabel(f"{effects[0][1].description}{unit}")
    else:  # one claim per axis is named in its title; the rows then need only the effect
        names = [e.description if len(claims) == 1 else f"{c.name}:\n{e.description}" for c, e in reversed(effects)]
        ax.set_yticks(range(len(effects)), names, fontsize=7)
        ax.set_xlabel(f"paired difference{unit}")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")


def effects_figure(claims: Sequence[Claim], title: str, columns: int = 2) -> Any:
    """A figure with one panel per claim (:func:`plot_effects`), each on its own scale, titled with its verdict."""
    plt = pyplot()
    rows = max(1, math.ceil(len(claims) / columns))
    heights = [max(1, len(c.effects)) for c in claims]
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 0.9 + 1.5 * rows * max(heights, default=1)))
    flat = list(axes.flat) if hasattr(axes, "flat") else [axes]
    for ax, c in zip(flat, claims):
        plot_effects(ax, [c], title=f"{c.name}: {c.verdict}")
    for ax in flat[len(claims) :]:
        ax.axis("off")
    fig.suptitle(title)
    return fig


def save(fig: Any, out: Path, name: str) -> str:
    """Save ``fig`` as ``out/name`` (PNG, 120 dpi), close it and return ``name``."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    pyplot().close(fig)
    return name


def save_effects(claims: Sequence[Claim], experiment: str, out: Path) -> list[str]:
    """The checked claims' :func:`effects_figure` saved as ``out/<experiment>_effects.png`` (a one-name
    list; empty when no claim could be checked)."""
    checked = [c for c in claims if c.effects]
    if not checked:
        return []
    title = f"{experiment}: paired effects over seeds (95 % intervals)"
    return [save(effects_figure(checked, title), out, f"{experiment.replace('-', '_')}_effects.png")]


def legend_below(ax: Any) -> None:
    """A two-column legend under the panel, clear of the data."""
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
