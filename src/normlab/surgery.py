"""Model surgery shared by the tools: a layer's settings, its state carried over, a module replaced by name."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["common_settings", "transfer_state", "replace_module"]


def common_settings(layer: nn.Module) -> dict[str, Any]:
    """The torch-convention constructor settings of a normalization layer.

    ``num_features``, ``eps``, ``affine``, ``track_running_stats``, ``device`` and ``dtype`` (the
    latter two from its parameters or buffers), and ``bias=False`` for an affine layer without a
    bias. ``momentum`` is not carried: each kind keeps its own default unless the caller passes one.
    """
    num = getattr(layer, "num_features", None) or getattr(layer, "num_channels", None)
    tensors = [t for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)) if t is not None]
    floats = [t for t in tensors if t.is_floating_point()]
    params = list(layer.parameters(recurse=False))
    ref = params[0] if params else (floats[0] if floats else None)
    affine = bool(getattr(layer, "affine", getattr(layer, "elementwise_affine", True)))
    settings = {
        "num_features": int(num),
        "eps": float(getattr(layer, "eps", 1e-5)),
        "affine": affine,
        "track_running_stats": bool(getattr(layer, "track_running_stats", True)),
        "device": ref.device if ref is not None else None,
        "dtype": ref.dtype if ref is not None else None,
    }
    if affine and getattr(layer, "weight", None) is not None and getattr(layer, "bias", None) is None:
        settings["bias"] = False  # a scale without a shift (torch >= 2.13's bias=False)
    return settings


@torch.no_grad()
def transfer_state(src: nn.Module, dst: nn.Module) -> list[str]:
    """Copy every parameter/buffer that ``src`` and ``dst`` share by name and shape; return the names."""
    dst_state = dict(dst.named_parameters(recurse=False)) | {
        k: v for k, v in dst.named_buffers(recurse=False) if v is not None
    }
    copied = []
    for name, value in [*src.named_parameters(recurse=False), *src.named_buffers(recurse=False)]:
        target = dst_state.get(name)
        if value is None or target is None or target.shape != value.shape:
            continue
        target.copy_(value.to(target.dtype))
        copied.append(name)
    return copied


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the qualified ``name`` in ``model``; return the model (``new`` itself for ``""``)."""
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
