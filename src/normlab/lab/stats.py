"""The lab's statistics: Student-t confidence intervals of a mean and of a paired mean difference.

Every effect the lab reports is a mean over seeds with a two-sided confidence interval
``mean ± t_{(1 + level) / 2, n - 1} * sd / sqrt(n)``. A paired difference pairs ``a[s]`` with
``b[s]``: the same seed ``s`` gives both methods the same initial weights and minibatch order, so
the seed-to-seed variation they share cancels in ``a[s] - b[s]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from . import require

__all__ = ["Interval", "mean_interval", "paired_interval"]


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and its two-sided ``level`` confidence interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def text(self, unit: str = "") -> str:
        """``"+3.1 [+1.2, +5.0] points (n=8)"`` (three significant digits, signed)."""
        suffix = f" {unit}" if unit else ""
        return f"{_num(self.mean)} [{_num(self.low)}, {_num(self.high)}]{suffix} (n={self.n})"


def _num(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    if abs(x) < 1e-9:  # rounding residue of a difference of equal means
        return "+0"
    return f"{x:+.3g}"


def mean_interval(d: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``d`` and its Student-t confidence interval.

    With fewer than two values the interval is ``(-inf, +inf)`` (no spread can be estimated); with
    none, the mean is ``nan`` too. A non-finite value makes the whole interval ``nan``; ``None`` (how
    ``results.json`` stores a non-finite number) counts as one.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"mean_interval: expected 0 < level < 1, got {level}")
    values = [math.nan if v is None else float(v) for v in d]
    n = len(values)
    if n == 0:
        return Interval(math.nan, -math.inf, math.inf, 0, level)
    mean = math.fsum(values) / n
    if not math.isfinite(mean):
        return Interval(math.nan, math.nan, math.nan, n, level)
    if n < 2:
        return Interval(mean, -math.inf, math.inf, n, level)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    t = float(require("scipy.stats").t.ppf((1.0 + level) / 2.0, n - 1))
    half = t * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``a[s] - b[s]`` over seeds ``s`` and its Student-t confidence interval."""
    if len(a) != len(b):
        raise ValueError(f"paired_interval: expected as many values in a as in b, got {len(a)} and {len(b)}")
    return mean_interval([float(x) - float(y) for x, y in zip(a, b)], level)
