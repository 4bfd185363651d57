"""Results, claim checks and reports: JSON, CSV, PNG plots and a Markdown report per experiment.

A :class:`Claim` is a paper's statement with numeric criteria, each computed from the results
(value, threshold, pass/fail): the verdict is ``REPRODUCED`` when every criterion passes,
``NOT REPRODUCED`` when one fails, and ``NOT CHECKED`` when the numbers it needs are missing.
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

__all__ = ["Criterion", "Claim", "versions", "mean_std", "format_table", "markdown_table", "write_outputs", "pyplot"]

REPRODUCED, NOT_REPRODUCED, NOT_CHECKED = "REPRODUCED", "NOT REPRODUCED", "NOT CHECKED"


@dataclass
class Criterion:
    """One numeric test of a claim: ``description`` holds for ``value`` (``passed``)."""

    description: str
    value: float
    threshold: float
    passed: bool

    def line(self) -> str:
        """``[pass] description: value (threshold)``."""
        mark = "pass" if self.passed else "FAIL"
        return f"[{mark}] {self.description}: {self.value:.4g} (threshold {self.threshold:.4g})"


@dataclass
class Claim:
    """A paper's claim and the criteria that check it on this run's numbers."""

    statement: str
    criteria: list[Criterion] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # parts that could not be checked, and why

    def at_least(self, description: str, value: float, threshold: float) -> None:
        """Add the criterion ``value >= threshold``."""
        self.criteria.append(Criterion(description, float(value), float(threshold), _ok(value) and value >= threshold))

    def at_most(self, description: str, value: float, threshold: float) -> None:
        """Add the criterion ``value <= threshold``."""
        self.criteria.append(Criterion(description, float(value), float(threshold), _ok(value) and value <= threshold))

    @property
    def verdict(self) -> str:
        """``REPRODUCED`` / ``NOT REPRODUCED`` / ``NOT CHECKED`` from the criteria."""
        if not self.criteria:
            return NOT_CHECKED
        return REPRODUCED if all(c.passed for c in self.criteria) else NOT_REPRODUCED

    def summary(self) -> str:
        """The verdict, the statement and each criterion with its number, one per line."""
        lines = [f"{self.verdict}: {self.statement}"] + [f"  {c.line()}" for c in self.criteria]
        lines += [f"  [not checked] {m}" for m in self.missing]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, verdict included."""
        return {"verdict": self.verdict, **asdict(self)}


def _ok(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


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


def write_outputs(
    out: Path,
    title: str,
    results: dict[str, Any],
    claim: Claim,
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    plots: Sequence[str],
    description: str,
) -> None:
    """Write ``results.json``, ``results.csv`` (the table) and ``report.md`` (plots embedded) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(results) | {"claim": claim.to_dict(), "table": {"headers": list(headers), "rows": rows}}
    (out / "results.json").write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        w.writerows([[_cell(v) for v in r] for r in rows])
    settings = results.get("settings", {})
    env = results.get("versions", {})
    # Docstring roles (:func:`x`) read as plain code in Markdown.
    description = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", description)
    md = [f"# {title}", "", description, "", "## Claim check", "", f"**{claim.verdict}**: {claim.statement}", ""]
    md += [f"- {c.line()}" for c in claim.criteria]
    md += [f"- not checked: {m}" for m in claim.missing]
    md += ["", "## Results", "", markdown_table(headers, rows), ""]
    for notes in results.get("notes", []):
        md.append(f"> {notes}")
    md += [""] + [f"![{p}]({p})" for p in plots]
    md += ["", "## Settings", "", "```", json.dumps(_jsonable(settings), indent=2), "```", ""]
    md += [f"Wall time: {results.get('wall_seconds', float('nan')):.1f} s. Seed: {results.get('seed')}.", ""]
    md += ["Versions: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    (out / "report.md").write_text("\n".join(md))
