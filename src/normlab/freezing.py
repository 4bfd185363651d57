"""Freezing: normalize with the running statistics in training too, and keep them fixed (fine-tuning)."""

from __future__ import annotations

from torch import nn

from .base import is_frozen, set_frozen, stat_layers
from .population import layers_or_warn

__all__ = ["freeze", "unfreeze", "is_frozen"]


def freeze(model: nn.Module) -> nn.Module:
    """Normalize with the running statistics also in training mode, and stop updating them.

    The usual fine-tuning setting: ``gamma`` and ``beta`` still get gradients and train; ``x`` gets
    the gradient of the fixed affine map. normlab layers have a declared ``frozen`` setting that
    their forward honours; torch's BatchNorm layers keep their class and get a forward pre-hook and
    an always-called forward hook that run them in eval mode while the model trains (the module's
    ``training`` flag is set back after each call). Layers without running statistics are left
    alone. Idempotent; undone by :func:`unfreeze`. Returns ``model``.
    """
    for _, m in layers_or_warn(model, "freeze"):
        set_frozen(m, True)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: batch statistics and running-statistics updates in training again."""
    for _, m in stat_layers(model):
        set_frozen(m, False)
    return model
