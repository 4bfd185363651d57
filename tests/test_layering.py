"""The library's import graph points one way: every module imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import normlab

SRC = Path(normlab.__file__).parent

# Bottom to top; a module may import from its own row only where the row lists it earlier.
LAYERS = [
    ["comm", "checks", "kernels", "dispatch", "batches"],
    ["base"],
    ["pairing", "surgery"],
    [
        "weight_norm",
        "batchnorm",
        "batch_renorm",
        "mean_only",
        "decorrelated",
        "cross_iteration",
        "ghost",
        "kalman",
        "normprop",
    ],
    ["population", "adabn", "diagnostics", "freezing", "fold", "registry", "distributed"],
    ["statistics", "__init__"],
]
RANK = {name: (i, j) for i, row in enumerate(LAYERS) for j, name in enumerate(row)}


def _imports(path: Path) -> set[str]:
    """normlab modules imported anywhere in ``path`` (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.level == 0 and (node.module or "").startswith("normlab."):
                names = [node.module.split(".")[1]]
            else:
                continue
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("normlab."))
    return {n for n in found if n != "lab"}


def test_every_library_module_is_placed() -> None:
    modules = {p.stem for p in SRC.glob("*.py")}
    assert modules == set(RANK), f"unplaced: {modules - set(RANK)}, missing: {set(RANK) - modules}"


def test_imports_point_down() -> None:
    wrong = []
    for path in SRC.glob("*.py"):
        me = RANK[path.stem]
        for other in _imports(path):
            if other in RANK and RANK[other] >= me:
                wrong.append(f"{path.stem} -> {other}")
    assert not wrong, wrong


def test_library_never_imports_the_lab() -> None:
    for path in SRC.glob("*.py"):
        assert "normlab.lab" not in path.read_text().replace("normlab.lab`", ""), path.stem


def test_moved_names_still_work_with_a_deprecation_warning() -> None:
    """Public names that moved keep working from their old homes, warning where they went."""
    import pytest
    from torch import nn

    from normlab import base, comm, freezing, kernels, population, statistics

    for old, name, home in (
        (statistics, "stat_layers", base),
        (statistics, "is_frozen", freezing),
        (statistics, "MomentPool", population),
        (base, "two_pass_stats", kernels),
        (base, "global_sum", comm),
    ):
        with pytest.warns(DeprecationWarning, match=f"{name} is deprecated"):
            assert getattr(old, name) is getattr(home, name)
    layer = normlab.BatchNorm(3)
    with pytest.warns(DeprecationWarning, match="sync_group is deprecated"):
        assert base.sync_group(layer) is None and base.sync_group(nn.BatchNorm1d(3)) is None
