"""The one rule for calling a model on a batch, used by every tool that runs a model over data.

Batches may be given as any iterable (a list, a ``DataLoader``, a generator) of

* a tensor ``x``: the model is called as ``model(x)``;
* a tuple or list ``(x, y, ...)``: ``model(x)``, the rest (labels) is ignored;
* a mapping: ``model(**batch)``;

or anything else with ``forward=lambda model, batch: ...``. With ``device`` given, every tensor in
a batch is moved there first.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Forward", "call_model", "to_device", "progress"]

Forward = Callable[[nn.Module, Any], Any]


def to_device(batch: Any, device: torch.device | str | None) -> Any:
    """``batch`` with every tensor in it (nested in tuples, lists and mappings) moved to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, batch: Any, forward: Forward | None = None, who: str = "normlab") -> Any:
    """Run ``model`` on one ``batch`` by the rule of the module docstring; returns the model's output."""
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(
        f"{who}: expected each batch to be a tensor, a non-empty (x, y, ...) tuple/list or a mapping of "
        f"keyword arguments (or pass forward=), got {type(batch).__name__}"
    )


def progress(batches: Iterable[Any], enabled: bool, desc: str) -> Iterator[Any]:
    """Iterate over ``batches``, with a progress bar (tqdm, or a line per batch) when ``enabled``."""
    if not enabled:
        yield from batches
        return
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency: fall back to a line per batch
        for i, batch in enumerate(batches, 1):
            print(f"{desc}: batch {i}" + (f"/{total}" if total else ""), file=sys.stderr, flush=True)
            yield batch
        return
    yield from tqdm(batches, total=total, desc=desc)
