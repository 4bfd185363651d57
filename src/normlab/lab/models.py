"""The lab's small networks, built with torch's BatchNorm and converted to any kind by name.

Every network is written once with ``nn.BatchNorm*d`` after each hidden conv/linear layer;
:func:`with_norm` turns it into the variant under test with :func:`normlab.convert` (or removes the
normalization for ``"none"``), so all variants share the exact same architecture and initial weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import normlab

__all__ = ["cnn", "mlp", "with_norm", "run_with_hooks"]


def cnn(in_channels: int = 1, width: int = 16, num_classes: int = 10, dims: int = 2) -> nn.Sequential:
    """Three 3x3 (or 3-tap) conv layers of stride 2, each followed by BatchNorm and ReLU; global
    average pool; linear.

    An 8x8 digit becomes 4x4, 2x2 and 1x1 maps (``width``, ``2 * width``, ``2 * width`` channels), so
    the third normalization sees one value per example and channel: at batch size ``N`` its batch
    statistics come from ``N`` values. An MNIST-1D signal of 40 becomes 20, 10 and 5 taps.
    """
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims]
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}[dims]
    w1, w2 = width, 2 * width
    return nn.Sequential(
        conv(in_channels, w1, 3, stride=2, padding=1),
        bn(w1),
        nn.ReLU(),
        conv(w1, w2, 3, stride=2, padding=1),
        bn(w2),
        nn.ReLU(),
        conv(w2, w2, 3, stride=2, padding=1),
        bn(w2),
        nn.ReLU(),
        pool(1),
        nn.Flatten(),
        nn.Linear(w2, num_classes),
    )


def mlp(
    in_features: int,
    hidden: int = 64,
    depth: int = 3,
    num_classes: int = 10,
    *,
    activation: type[nn.Module] = nn.ReLU,
    flatten: bool = True,
) -> nn.Sequential:
    """``depth`` hidden layers ``Linear -> BatchNorm1d -> activation`` of width ``hidden``, then a linear
    classifier; with ``flatten``, an ``nn.Flatten`` first."""
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), activation()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _strip_norms(model: nn.Module) -> None:
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            _strip_norms(child)


def with_norm(model: nn.Module, kind: str, **options: Any) -> nn.Module:
    """A copy of ``model`` with its BatchNorm layers converted to ``kind`` (``"none"``: removed)."""
    if kind == "none":
        out = copy.deepcopy(model)
        _strip_norms(out)
        return out
    return normlab.convert(model, kind, **options)


def run_with_hooks(model: nn.Module, x: torch.Tensor, layers: list[nn.Module], hook: Callable[..., None]) -> None:
    """Run ``model(x)`` with the forward ``hook`` on each of ``layers`` (removed afterwards)."""
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
