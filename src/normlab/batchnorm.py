"""Batch Normalization (Ioffe & Szegedy, ICML 2015) as torch implements it, plus GroupNorm.

Training normalizes each channel with the batch statistics over ``m = N * prod(spatial)`` samples,

    x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps),   y = gamma * x_hat + beta,

and inference uses population statistics (Algorithm 2 of the paper; see
:func:`normlab.recompute_statistics`). Torch already has the layer; normlab reuses it:
:class:`BatchNorm` is torch's ``_BatchNorm`` that accepts any input rank >= 2 and can synchronize
its statistics over processes (:func:`normlab.sync`) on any backend, gloo on CPU included.

This module registers the kinds ``"bn"`` and ``"gn"`` with :func:`normlab.convert`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import channel_affine, channel_moments, check_input, sync_group, update_running_stats
from .registry import common_settings, register, transfer_state

__all__ = ["BatchNorm"]


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's batch normalization for inputs ``(N, C, *)`` of any rank >= 2.

    Same arguments, state dict and kernels as :class:`torch.nn.BatchNorm2d`. With a
    ``process_group`` set (see :func:`normlab.sync`) the batch statistics are those of the global
    batch over all processes of the group, with the matching backward.
    """

    def __init__(self, num_features: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.process_group: Any | None = None

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(self, input, self.num_features, training=False)

    def forward(self, input: Tensor) -> Tensor:
        group = sync_group(self)
        use_batch = self.training or self.running_mean is None
        if group is None or not use_batch:
            # torch's kernels; an empty batch in training would only bump num_batches_tracked there.
            check_input(self, input, self.num_features, training=use_batch)
            return super().forward(input)
        # Synchronized: the sample-count check is on the global batch (in channel_moments), so a
        # process may hold one sample or none; statistics are validated before any state moves.
        self._check_input_dim(input)
        mean, var, count = channel_moments(input, group, self)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            update_running_stats(self, mean, var, count)
        return channel_affine(input, mean, torch.rsqrt(var + self.eps), self.weight, self.bias)


# ------------------------------------------------------------------------------------ registry
def _build_bn(src: nn.Module, momentum: float | None = 0.1, **kwargs: Any) -> nn.Module:
    origin = getattr(src, "_normlab_origin", type(src))
    cls = origin if isinstance(origin, type) and issubclass(origin, nn.modules.batchnorm._BatchNorm) else BatchNorm
    if cls is nn.SyncBatchNorm:
        kwargs.setdefault("process_group", getattr(src, "process_group", None))
    layer = cls(**(common_settings(src) | {"momentum": momentum} | kwargs))
    transfer_state(src, layer)
    return layer


def _build_gn(src: nn.Module, num_groups: int = 32, **kwargs: Any) -> nn.Module:
    s = common_settings(src) | kwargs
    c = s["num_features"]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(
            f"GroupNorm: expected num_groups to divide num_channels={c}, got num_groups={num_groups!r}"
        )
    layer = nn.GroupNorm(num_groups, c, eps=s["eps"], affine=s["affine"], device=s["device"], dtype=s["dtype"])
    transfer_state(src, layer)
    return layer


register(
    "bn",
    _build_bn,
    (nn.modules.batchnorm._BatchNorm,),
    "Batch Normalization (torch's layers; Ioffe & Szegedy 2015)",
)
register(
    "gn",
    _build_gn,
    (nn.GroupNorm,),
    "Group Normalization (torch's nn.GroupNorm; Wu & He 2018), option num_groups (default 32)",
    source_by_default=False,
)
