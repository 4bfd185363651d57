"""Deprecated: population statistics, AdaBN, the statistic-shift diagnostic and freezing now have one module each.

:mod:`normlab.population` (``recompute_statistics``, ``MomentPool``), :mod:`normlab.adabn` (``adapt``),
:mod:`normlab.diagnostics` (``statistic_shift``, ``symmetric_kl``), :mod:`normlab.freezing`
(``freeze``, ``unfreeze``, ``is_frozen``) and :mod:`normlab.base` (``stat_layers``). Every name is
still importable from here, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_HOMES = {
    "recompute_statistics": "population",
    "MomentPool": "population",
    "adapt": "adabn",
    "statistic_shift": "diagnostics",
    "symmetric_kl": "diagnostics",
    "freeze": "freezing",
    "unfreeze": "freezing",
    "is_frozen": "freezing",
    "stat_layers": "base",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"normlab.statistics.{name} is deprecated; import it from normlab.{home} (or normlab)",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(f"normlab.{home}"), name)
