"""Helpers the experiments share: the normalizers' options, the statistics of the claim checks, plotting.

Experiment modules import from here (and the :class:`Experiment` registry), never from each other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import normlab

from ..report import Claim, Criterion, pyplot

__all__ = ["NORM_OPTION_NOTES", "norm_options", "paired_difference", "exceeds", "curve_means", "save"]

NORM_OPTION_NOTES = {
    "bn": "torch BatchNorm2d, momentum 0.1",
    "brn": "momentum 0.1, r_max/d_max: paper_schedule(steps / 130000) (the paper's warm-up over this run's steps)",
    "cbn": "window 8 (the paper's k), burn_in = steps // 4",
    "gn": "num_groups 4",
    "dbn": "group_size 8, ZCA",
}


def norm_options(kind: str, steps: int) -> dict[str, Any]:
    """The constructor options :func:`normlab.convert` gets for ``kind`` in a run of ``steps`` optimizer steps.

    As :data:`NORM_OPTION_NOTES` says: BRN's r_max/d_max warm-up is the paper's 130000-step schedule
    scaled to the run, CBN's burn-in is a quarter of it; other kinds get their defaults.
    """
    if kind == "brn":
        return {"momentum": 0.1, **normlab.paper_schedule(steps / 130_000)}
    if kind == "gn":
        return {"num_groups": 4}
    if kind == "cbn":
        return {"window": 8, "burn_in": steps // 4}
    if kind == "dbn":
        return {"group_size": 8}
    return {}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of ``a[s] - b[s]`` over seeds ``s`` (paired); the error is 0 for one seed."""
    d = [x - y for x, y in zip(a, b)]
    if not d:
        return float("nan"), float("nan")
    m = sum(d) / len(d)
    if len(d) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def exceeds(claim: Claim, description: str, value: float, threshold: float) -> None:
    """Add the strict criterion ``value > threshold`` (an effect must be larger than the noise, not equal to it)."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value > threshold
    claim.criteria.append(Criterion(description, float(value), float(threshold), ok))


def curve_means(curves: Sequence[Sequence[float]]) -> list[float]:
    """Each non-empty curve's mean (a training-loss curve's area per step: lower is faster)."""
    return [sum(c) / len(c) for c in curves if c]


def save(fig: Any, out: Path, name: str) -> str:
    """Save ``fig`` as ``out/name`` (PNG, 120 dpi), close it and return ``name``."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    pyplot().close(fig)
    return name
