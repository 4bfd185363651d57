"""Argument and input checks shared by every layer: clear errors, raised before any state changes.

Every message names the layer, what was expected and what was given.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "layer_name",
    "check_input",
    "check_global_count",
    "check_settings",
    "check_positive_int",
    "check_placement",
    "keyword_options",
    "UNSET",
]

#: The default of a functional core's argument whose absence means its deprecated form (``training``).
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "<unset>"})()


def layer_name(module: nn.Module | str) -> str:
    """The name used in messages: the class name of ``module``, or ``module`` itself if a string."""
    return module if isinstance(module, str) else type(module).__name__


def check_input(module: nn.Module | str, x: Tensor, num_features: int, training: bool) -> None:
    """Raise a clear ``ValueError`` unless ``x`` is ``(N, num_features, *)`` and usable.

    In training with batch statistics, at least two values per channel are required (the batch
    variance of a single value is zero and its normalization meaningless).
    """
    name = layer_name(module)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{name}: expected input of shape (N, {num_features}, *) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}"
        )
    if x.size(1) != num_features:
        raise ValueError(
            f"{name}: expected {num_features} channels in dimension 1 (input (N, {num_features}, *)), "
            f"got shape {tuple(x.shape)} with {x.size(1)} channels"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got dtype {x.dtype}")
    if training and x.numel() // max(num_features, 1) <= 1:
        raise ValueError(
            f"{name}: expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)}"
        )


def check_placement(module: nn.Module | str, x: Tensor, reference: Tensor | None) -> None:
    """Raise a clear ``ValueError`` unless ``x`` is on the layer's device and of a dtype it computes in.

    ``reference`` is a parameter or buffer of the layer. Same dtype, or a half/bfloat16 input with
    float32 parameters (autocast, or statistics kept float32) are accepted; anything else (a float64
    input into a float32 layer, say) is refused, as torch's BatchNorm refuses it, before any state moves.
    """
    if reference is None or not isinstance(x, Tensor):
        return
    name = layer_name(module)
    if x.device != reference.device:
        raise ValueError(f"{name}: expected an input on {reference.device} (the layer's device), got {x.device}")
    low = (torch.float16, torch.bfloat16)
    if x.dtype != reference.dtype and not (x.dtype in low and reference.dtype == torch.float32):
        raise ValueError(
            f"{name}: expected an input of dtype {reference.dtype} (the layer's; half/bfloat16 inputs go with "
            f"float32 layers), got {x.dtype}: convert the input or the layer (layer.to(dtype))"
        )


def check_global_count(count: Tensor, module: nn.Module | str, x: Tensor) -> None:
    """Raise (on every process alike) unless the group's batch has more than one value per channel."""
    if not bool(count > 1):
        raise ValueError(
            f"{layer_name(module)}: expected more than 1 value per channel over the process group when "
            f"training, got {int(count)} in all (this process: input of shape {tuple(x.shape)})"
        )


def check_settings(name: str, num_features: Any, eps: Any, momentum: Any) -> None:
    """Validate the torch-convention constructor settings of layer ``name``."""
    check_positive_int(name, "num_features", num_features)
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{name}: expected eps to be a finite number >= 0, got {eps!r}")
    if momentum is not None and not (
        isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0 <= momentum <= 1
    ):
        raise ValueError(f"{name}: expected momentum in [0, 1] or None, got {momentum!r}")


def check_positive_int(name: str, what: str, value: Any, minimum: int = 1) -> None:
    """Raise unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name}: expected {what} to be {kind}, got {value!r}")


def keyword_options(legacy: Sequence[str], is_legacy: Callable[[tuple[Any, ...]], bool]) -> Callable:
    """Decorate a layer's ``__init__`` whose variant options became keyword-only.

    ``legacy`` is the old positional order after ``num_features``. A call whose positional
    arguments (after ``num_features``) ``is_legacy`` recognizes as that order is mapped to keywords
    with a ``DeprecationWarning``; any other call goes through unchanged, so the new signature is
    checked by Python as usual.
    """

    def decorate(init: Callable) -> Callable:
        @functools.wraps(init)
        def wrapper(self: nn.Module, num_features: Any, *args: Any, **kwargs: Any) -> None:
            if args and is_legacy(args):
                if len(args) > len(legacy):
                    raise TypeError(f"{type(self).__name__}: too many positional arguments")
                named = dict(zip(legacy, args))
                clash = sorted(set(named) & set(kwargs))
                if clash:
                    raise TypeError(f"{type(self).__name__}: got multiple values for {', '.join(clash)}")
                warnings.warn(
                    f"{type(self).__name__}: passing {', '.join(list(named))} positionally is deprecated; "
                    f"the variant options are keyword-only, after torch's (num_features, eps, momentum, "
                    f"affine, track_running_stats, device, dtype)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return init(self, num_features, **named, **kwargs)
            return init(self, num_features, *args, **kwargs)

        wrapper.__signature__ = inspect.signature(init)
        return wrapper

    return decorate
