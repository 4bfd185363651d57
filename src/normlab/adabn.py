"""AdaBN (Li, Wang, Shi, Liu & Hou, "Revisiting Batch Normalization For Practical Domain Adaptation",
arXiv 1603.04779, 2016, Algorithm 1): every neuron ``j`` is standardized at test time
with the mean and standard deviation of its responses over *all* target-domain images,
``y_j = gamma_j (x_j - mu_j^t) / sigma_j^t + beta_j``. :func:`adapt` computes them with exact pooling
(the paper's definition) or, optionally, the Algorithm 2 average.

Batch formats: :mod:`normlab.batches`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .batches import Forward
from .population import (
    check_mode,
    collect,
    finish,
    layers_or_warn,
    load_all,
    population_statistics,
    restore,
    snapshot,
)

__all__ = ["adapt"]


def adapt(
    model: nn.Module,
    target_batches: Iterable[Any],
    *,
    mode: str = "one-pass",
    pooling: str = "exact",
    progress: bool = False,
    forward: Forward | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """AdaBN: set every normalization layer's statistics from unlabeled target-domain data.

    Afterwards, in eval mode, every channel is standardized with its target-domain mean and
    variance (Li et al., Algorithm 1); the weights are not touched.

    * ``mode="one-pass"`` (fast): one pass over ``target_batches`` with the normalization layers
      normalizing each batch by its own statistics, as :func:`recompute_statistics` does; each
      layer's input is then that of the network whose earlier layers use the target *batch*
      statistics, close to the adapted ones for large batches.
    * ``mode="layerwise"``: one pass per layer, in the order the layers are called, with the model
      in eval mode: layer ``k``'s statistics are computed on inputs that layers ``1..k-1`` have
      already normalized with their adapted target statistics, which is what the paper's
      per-neuron definition implies for a deep network. Needs a re-iterable ``target_batches``
      (a list or a ``DataLoader``, not a generator); each pass stops at the layer it adapts when
      no layer is called twice per forward.

    ``pooling="exact"`` (default) uses the mean and variance over all target samples, the paper's
    definition; ``pooling="average"`` the Algorithm 2 average of batch statistics. On any error
    every layer keeps its original statistics. Returns ``model`` (modified in place; deep-copy it
    first to keep the source-domain model).
    """
    who = "adapt"
    check_mode(who, mode, ("one-pass", "layerwise"))
    check_mode(who, pooling, ("average", "exact"), "pooling")
    if mode == "one-pass":
        return population_statistics(model, target_batches, pooling, progress, forward, device, who)
    if iter(target_batches) is target_batches:
        raise ValueError(
            "adapt: mode='layerwise' passes over the batches once per layer; expected a re-iterable "
            f"(a list, a DataLoader), got a one-shot iterator ({type(target_batches).__name__})"
        )
    layers = layers_or_warn(model, who)
    if not layers:
        return model
    modules = dict(layers)
    original = snapshot(layers)
    common = {"pooling": pooling, "batch_stats": False, "forward": forward, "device": device, "who": who}
    try:
        # First pass: the call order, and the first layer's statistics (its input does not depend on
        # any other normalization layer).
        pools, order, calls = collect(model, layers, target_batches, progress=progress, **common)
        if not order:
            warnings.warn("adapt: no normalization layer received input; nothing changed", stacklevel=2)
            return model
        early_stop = all(c == 1 for c in calls.values())
        load_all(finish({order[0]: pools[order[0]]}, [(order[0], modules[order[0]])], who), layers)
        for name in order[1:]:
            one = [(name, modules[name])]
            pools, _, _ = collect(
                model,
                one,
                target_batches,
                progress=progress,
                stop_after=modules[name] if early_stop else None,
                **common,
            )
            load_all(finish(pools, one, who), one)
    except BaseException:
        restore(original)
        raise
    unseen = [n for n, _ in layers if n not in order]
    if unseen:
        warnings.warn(f"adapt: layers {unseen} received no input; left unchanged", stacklevel=2)
    return model
