"""Helpers the experiments share: which kinds the library provides, and plotting conventions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import normlab

from ..report import pyplot

__all__ = ["available", "missing_note", "save", "line_plot"]

# The library piece each optional kind comes from, for the notes of a run without it.
_SOURCES = {
    "cbn": "normlab.CrossIterationBatchNorm (cross_iteration.py)",
    "dbn": "normlab.DecorrelatedBatchNorm (decorrelated.py)",
}


def available(kind: str) -> bool:
    """Whether :func:`normlab.convert` knows the kind ``kind`` in this installation."""
    return kind == "none" or kind in normlab.kinds()


def missing_note(what: str, piece: str) -> str:
    """The note an experiment records when it leaves ``what`` out because ``piece`` is missing."""
    return f"{what} left out: {piece} is not available in this normlab installation"


def kind_note(kind: str) -> str:
    """:func:`missing_note` for a conversion kind."""
    return missing_note(kind, _SOURCES.get(kind, f"the normalization kind {kind!r}"))


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
