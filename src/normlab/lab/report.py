"""Results, claim checks and reports: JSON, CSV, PNG plots and a Markdown report per experiment.

A :class:`Claim` is a paper's statement checked by one or more :class:`Effect`: a paired mean
difference over seeds with its 95 % confidence interval (:mod:`normlab.lab.stats`), tested against a
minimum effect or an equivalence margin fixed in the experiment's code before it runs.

* ``greater`` (the difference exceeds ``min_effect`` in the claimed direction): ``REPRODUCED`` if the
  interval's low end is above ``min_effect``, ``NOT REPRODUCED`` if its high end is below it,
  ``INCONCLUSIVE`` otherwise (the interval straddles it).
* ``equivalent`` (the difference lies within ``±margin``): ``REPRODUCED`` if the whole interval lies
  inside ``(-margin, margin)``, ``NOT REPRODUCED`` if it lies entirely beyond one end, ``INCONCLUSIVE``
  otherwise.

A claim is ``REPRODUCED`` when all its effects are, ``NOT REPRODUCED`` when any is, ``INCONCLUSIVE``
otherwise, and ``NOT CHECKED`` when it has no effect (what it could not check is in ``missing``).
"""

from __future__ import annotations

import csv
import json
import math
import platform
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from . import require
from .stats import Interval

__all__ = [
    "REPRODUCED",
    "NOT_REPRODUCED",
    "INCONCLUSIVE",
    "NOT_CHECKED",
    "VERDICTS",
    "Effect",
    "Claim",
    "versions",
    "mean_std",
    "format_table",
    "markdown_table",
    "claims_markdown",
    "write_outputs",
    "pyplot",
]

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_CHECKED = "REPRODUCED", "NOT REPRODUCED", "INCONCLUSIVE", "NOT CHECKED"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_CHECKED)
GREATER, EQUIVALENT = "greater", "equivalent"


@dataclass(frozen=True)
class Effect:
    """One measured effect of a claim and its verdict.

    ``kind`` is ``"greater"`` (claimed: ``mean > threshold``, the minimum effect) or ``"equivalent"``
    (claimed: ``|mean| < threshold``, the margin); ``mean``/``low``/``high``/``n`` are the paired
    difference's interval.
    """

    description: str
    kind: str
    threshold: float
    mean: float
    low: float
    high: float
    n: int
    unit: str = "points"
    level: float = 0.95

    @property
    def interval(self) -> Interval:
        """The measured :class:`Interval`."""
        return Interval(self.mean, self.low, self.high, self.n, self.level)

    @property
    def verdict(self) -> str:
        """``REPRODUCED``, ``NOT REPRODUCED`` or ``INCONCLUSIVE`` from the interval and the threshold."""
        lo, hi, t = self.low, self.high, self.threshold
        if math.isnan(lo) or math.isnan(hi):
            return INCONCLUSIVE
        if self.kind == GREATER:
            if lo > t:
                return REPRODUCED
            return NOT_REPRODUCED if hi < t else INCONCLUSIVE
        if -t < lo and hi < t:
            return REPRODUCED
        return NOT_REPRODUCED if lo > t or hi < -t else INCONCLUSIVE

    def criterion(self) -> str:
        """What the claim needs, e.g. ``"> +2 points"`` or ``"within ±1 points"``."""
        unit = f" {self.unit}" if self.unit else ""
        if self.kind == GREATER:
            return f"> {self.threshold:+g}{unit}"
        return f"within ±{self.threshold:g}{unit}"

    def line(self) -> str:
        """``[VERDICT] description: interval (needs criterion)``."""
        return f"[{self.verdict}] {self.description}: {self.interval.text(self.unit)}; claimed {self.criterion()}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, verdict included."""
        return asdict(self) | {"verdict": self.verdict}


@dataclass
class Claim:
    """A paper's claim (``name``: a short label; ``statement``: the full text) and the effects that check it."""

    name: str
    statement: str
    effects: list[Effect] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # parts that could not be checked, and why

    def greater(self, description: str, interval: Interval, min_effect: float, unit: str = "points") -> None:
        """Add the effect "the paired difference exceeds ``min_effect`` (>= 0)", oriented so the claim is positive."""
        if not min_effect >= 0:
            raise ValueError(f"Claim.greater: expected min_effect >= 0, got {min_effect}")
        self._add(description, GREATER, interval, min_effect, unit)

    def equivalent(self, description: str, interval: Interval, margin: float, unit: str = "points") -> None:
        """Add the effect "the paired difference lies within ``±margin`` (> 0)"."""
        if not margin > 0:
            raise ValueError(f"Claim.equivalent: expected margin > 0, got {margin}")
        self._add(description, EQUIVALENT, interval, margin, unit)

    def _add(self, description: str, kind: str, iv: Interval, threshold: float, unit: str) -> None:
        self.effects.append(Effect(description, kind, float(threshold), iv.mean, iv.low, iv.high, iv.n, unit, iv.level))

    @property
    def verdict(self) -> str:
        """All effects reproduced: ``REPRODUCED``; any not: ``NOT REPRODUCED``; else ``INCONCLUSIVE``."""
        if not self.effects:
            return NOT_CHECKED
        verdicts = {e.verdict for e in self.effects}
        if verdicts == {REPRODUCED}:
            return REPRODUCED
        return NOT_REPRODUCED if NOT_REPRODUCED in verdicts else INCONCLUSIVE

    def summary(self) -> str:
        """The verdict, the name and statement and each effect with its interval, one per line."""
        lines = [f"{self.verdict}: {self.name}: {self.statement}"] + [f"  {e.line()}" for e in self.effects]
        lines += [f"  [not checked] {m}" for m in self.missing]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, verdicts included."""
        return {
            "name": self.name,
            "statement": self.statement,
            "verdict": self.verdict,
            "effects": [e.to_dict() for e in self.effects],
            "missing": list(self.missing),
        }


def versions() -> dict[str, str]:
    """Versions of python, torch, normlab and the lab's dependencies, and the machine."""
    import normlab

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "normlab": normlab.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
    }
    for dist in ("numpy", "scikit-learn", "matplotlib", "tqdm", "mnist1d"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; ``nan`` for no values."""
    if not values:
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in r) + " |" for r in rows]
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend."""
    mpl = require("matplotlib")
    mpl.use("Agg")
    return require("matplotlib.pyplot")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no nan/inf
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    return obj


def claims_markdown(claims: Sequence[Claim]) -> list[str]:
    """Markdown lines: each claim's verdict, name and full statement, then its effects with their intervals."""
    md: list[str] = []
    for c in claims:
        md += [f"### {c.name}: **{c.verdict}**", "", c.statement, ""]
        md += [f"- {e.line()}" for e in c.effects]
        md += [f"- not checked: {m}" for m in c.missing]
        md.append("")
    return md


def write_outputs(
    out: Path,
    title: str,
    results: dict[str, Any],
    claims: Sequence[Claim],
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    plots: Sequence[str],
    description: str,
) -> None:
    """Write ``results.json``, ``results.csv`` (the table) and ``report.md`` (plots embedded) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(results) | {
        "claims": [c.to_dict() for c in claims],
        "table": {"headers": list(headers), "rows": rows},
    }
    (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows([[_cell(v) for v in r] for r in rows])
    settings = results.get("settings", {})
    env = results.get("versions", {})
    # Docstring roles (:func:`x`) read as plain code in Markdown.
    description = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", description)
    md = [f"# {title}", "", description, "", "## Claim checks", ""]
    md += claims_markdown(claims)
    md += ["## Results", "", markdown_table(headers, rows), ""]
    for notes in results.get("notes", []):
        md.append(f"> {notes}")
    md += [""] + [f"![{p}]({p})" for p in plots]
    md += ["", "## Settings", "", "```", json.dumps(_jsonable(settings), indent=2), "```", ""]
    md += [
        f"Job time: {results.get('job_seconds', float('nan')):.1f} CPU seconds in {results.get('seeds', '?')} seed "
        f"jobs (core-seconds). Base seed: {results.get('seed')}; {results.get('seed_rule', '')}.",
        "",
    ]
    md += ["Versions: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    (out / "report.md").write_text("\n".join(md))
