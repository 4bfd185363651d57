"""The normlab lab: experiments that train and compare normalizers and check the papers' claims.

Run from the command line (``normlab run small-batch``, ``normlab run all``; ``normlab --help``) or
from Python with :func:`normlab.lab.experiments.run_experiment`. The lab needs the optional
dependencies of ``pip install -e ".[lab]"`` (numpy, scikit-learn, matplotlib, tqdm, mnist1d); the
library itself never imports this package.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

_LAB_PACKAGES = ("numpy", "sklearn", "matplotlib", "tqdm", "mnist1d")


def require(name: str) -> ModuleType:
    """Import the optional lab dependency ``name`` or raise an ``ImportError`` saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"normlab lab: the optional dependency {name.split('.')[0]!r} is missing; install the lab's "
            f'dependencies with: pip install -e ".[lab]" (needs {", ".join(_LAB_PACKAGES)})'
        ) from err
