"""Batch Normalization (Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015, arXiv 1502.03167), as torch implements it.

Training normalizes each channel with the batch statistics over ``m = N * prod(spatial)`` samples,

    x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps),   y = gamma * x_hat + beta,

and inference uses population statistics (Algorithm 2 of the paper; see
:func:`normlab.recompute_statistics`). Torch already has the layer; normlab reuses it:
:class:`BatchNorm` is torch's ``_BatchNorm`` that accepts any input rank >= 2, declares the tool
settings of :class:`normlab.base.ToolState` (``frozen``, ``process_group``, ``converted_from``) and
can synchronize its statistics over processes (:func:`normlab.sync`) on any backend, gloo on CPU
included. Every tool accepts torch's own ``BatchNorm1d/2d/3d`` as well.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ToolState, update_running_stats
from .checks import check_input, check_placement
from .kernels import channel_affine, channel_moments

__all__ = ["BatchNorm"]


class BatchNorm(ToolState, nn.modules.batchnorm._BatchNorm):
    """torch's batch normalization for inputs ``(N, C, *)`` of any rank >= 2.

    Same arguments, state dict and kernels as :class:`torch.nn.BatchNorm2d`. With a
    ``process_group`` set (see :func:`normlab.sync`) the batch statistics are those of the global
    batch over all processes of the group, with the matching backward. ``frozen`` (see
    :func:`normlab.freeze`) normalizes with the running statistics in training as well.
    """

    def __init__(self, num_features: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        self._init_tool_state()

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(self, input, self.num_features, training=False)
        check_placement(self, input, self.weight if self.weight is not None else self.running_mean)

    def forward(self, input: Tensor) -> Tensor:
        if self.frozen and self.running_mean is not None:
            self._check_input_dim(input)
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        use_batch = self.training or self.running_mean is None
        group = self.sync_group() if use_batch else None
        if group is None:
            self._check_input_dim(input)
            if input.numel() == 0:
                return super().forward(input)  # an empty output, as torch's layer gives (it counts the step)
            check_input(self, input, self.num_features, training=use_batch)
            if not (self.training and self.track_running_stats and self.running_mean is not None):
                return super().forward(input)
            # torch's kernel and update rule, on copies of the running statistics, which replace them
            # only if they came out finite (see on_nonfinite): bit for bit what torch's layer stores.
            steps = self.num_batches_tracked
            factor = self.momentum if self.momentum is not None else 1.0 / float(steps + 1)
            mean, var = self.running_mean.clone(), self.running_var.clone()
            y = F.batch_norm(input, mean, var, self.weight, self.bias, True, factor, self.eps)
            if self.statistics_are_finite(mean, var):
                with torch.no_grad():
                    self.running_mean.copy_(mean)
                    self.running_var.copy_(var)
                    steps.add_(1)
            return y
        # Synchronized: the sample-count check is on the global batch (in channel_moments), so a
        # process may hold one sample or none; statistics are validated before any state moves.
        self._check_input_dim(input)
        mean, var, count = channel_moments(input, group, self)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            if self.statistics_are_finite(mean, var):
                update_running_stats(self, mean, var, count)
        return channel_affine(input, mean, torch.rsqrt(var + self.eps), self.weight, self.bias)
