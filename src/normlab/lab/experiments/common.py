"""Helpers the experiments share: plotting conventions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..report import pyplot

__all__ = ["save", "line_plot"]

def save(fig: Any, out: Path, name: str) -> str:
    """Save ``fig`` as ``out/name`` (PNG, 120 dpi), close it and return ``name``."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    pyplot().close(fig)
    return name


def line_plot(
    out: Path,
    name: str,
    series: dict[str, Sequence[float]],
    title: str,
    xlabel: str,
    ylabel: str,
    x: dict[str, Sequence[float]] | None = None,
    logy: bool = False,
) -> str:
    """One line per entry of ``series`` (against ``x[label]`` or the index); returns the file name."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in series.items():
        xs = x[label] if x is not None else range(len(ys))
        ax.plot(list(xs), list(ys), label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out, name)
