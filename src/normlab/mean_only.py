"""Mean-only batch normalization (Salimans & Kingma, "Weight Normalization: A Simple
Reparameterization to Accelerate Training of Deep Neural Networks", NeurIPS 2016, arXiv 1602.07868,
section 3: the companion of weight normalization).

Training, per channel over the ``m = N * prod(spatial)`` samples of the minibatch::

    mu_B = (1/m) sum_i t_i
    y    = t - mu_B + b                  (the paper: no division by the standard deviation)

Inference uses the running mean instead of ``mu_B``: ``y = t - mu + b``. The scale is left to the
weight-normalized layer in front (its gain ``g``), which is why the paper has no ``gamma``.

Here, as in torch's BatchNorm, ``affine=True`` gives a per-channel ``weight`` and ``bias``::

    y = weight * (t - mu_B) + bias

``weight`` starts at one, so the layer starts as the paper's; to train exactly the paper's layer
(bias only) call ``layer.weight.requires_grad_(False)``. ``eps`` is accepted for the torch
convention (and :func:`normlab.convert`) but unused: nothing is divided.

State: ``running_mean`` and ``num_batches_tracked`` with their BatchNorm meaning. There is **no**
``running_var`` (the layer never uses a variance, and tracking one would cost a pass over the
input): ``running_var`` is ``None``, and a ``running_var`` entry in a loaded checkpoint (e.g. from
a torch BatchNorm) is accepted and ignored, so BatchNorm checkpoints load into this layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import NormBase, ema, global_sum, memory_format_of, reduce_dims, stat_dtype
from .registry import build_normbase, register

__all__ = ["MeanOnlyBatchNorm", "mean_only_batch_norm"]


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def batch_mean(x: Tensor, group: Any | None = None) -> Tensor:
    """Per-channel mean of ``x`` ``(N, C, *)`` (float32 for half inputs; global over ``group``)."""
    xs = x.to(stat_dtype(x))
    dims = reduce_dims(xs)
    if group is None:
        return xs.mean(dims)
    count = torch.full((1,), float(xs.numel() // max(xs.size(1), 1)), dtype=xs.dtype, device=xs.device)
    s, count = global_sum([xs.sum(dims), count], group)
    if not bool(count > 0):
        raise ValueError("MeanOnlyBatchNorm: expected at least 1 value per channel over the process group, got 0")
    return s / count


def mean_only_batch_norm(x: Tensor, mean: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``weight * (x - mean) + bias`` along dimension 1 of ``x`` (differentiable in all inputs)."""
    shape = _channel_shape(x)
    if weight is None:
        y = x - mean.reshape(shape).to(x.dtype)
        return y if bias is None else y + bias.reshape(shape).to(x.dtype)
    # One fused multiply-add: weight * x + (bias - weight * mean).
    shift = -mean * weight if bias is None else bias - mean * weight
    return torch.addcmul(shift.reshape(shape).to(x.dtype), x, weight.reshape(shape).to(x.dtype))


class _MeanOnlyFunction(torch.autograd.Function):
    """Training-mode mean-only BN on torch's native batch-norm kernels; returns ``y`` and ``mu_B``.

    ``weight * (x - mu) + bias`` is batch-norm inference with mean ``mu`` and unit variance (eps 0),
    so the forward is the native inference kernel; the backward takes ``dL/dweight`` and
    ``dL/dbias`` from the native inference backward (one reading pass) and writes
    ``dL/dx = weight * (dL/dy - mean(dL/dy))`` in one fused multiply-add. No variance is ever computed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: ANN001, ANN205
        mean = x.mean(reduce_dims(x), dtype=stat_dtype(x))
        w = None if weight is None else weight.to(mean.dtype)
        b = None if bias is None else bias.to(mean.dtype)
        if x.dim() == 2:
            # For (N, C) inputs one fused multiply-add is faster than the strided inference kernel.
            y = mean_only_batch_norm(x, mean, w, b)
        else:
            y = torch.batch_norm(x, w, b, mean, torch.ones_like(mean), False, 0.0, 0.0, False)
        ctx.save_for_backward(x, w, mean)
        ctx.param_dtype = None if weight is None else weight.dtype
        ctx.mark_non_differentiable(mean)
        return y, mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _):  # noqa: ANN001, ANN205
        x, w, mean = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        # The kernel only for the per-channel sums (dL/dweight = sum dL/dy (x - mu), dL/dbias = sum dL/dy):
        # its input gradient would take a second pass to correct for mu_B.
        g = grad_y.contiguous(memory_format=memory_format_of(x))
        _, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g,
            x,
            w,
            mean,
            torch.ones_like(mean),
            None,
            None,
            False,
            0.0,
            [False, need_w, True],
        )
        gx = None
        if need_x:
            # dL/dx = weight * (dL/dy - mean(dL/dy)), in one pass.
            shape = _channel_shape(x)
            m = x.numel() // x.size(1)
            if w is None:
                gx = g - (gb / m).reshape(shape).to(g.dtype)
            else:
                shift = (gb * w).div_(-m).reshape(shape).to(g.dtype)
                gx = torch.addcmul(shift, g, w.reshape(shape).to(g.dtype))
        if gw is not None:
            gw, gb = gw.to(ctx.param_dtype), gb.to(ctx.param_dtype)
        return gx, gw if need_w else None, gb if need_b else None


class MeanOnlyBatchNorm(NormBase):
    """Mean-only batch normalization over inputs ``(N, C, *)`` (Salimans & Kingma 2016).

    Subtracts the per-channel batch mean in training and the running mean in eval; never divides.
    See the module docstring for the equations, the affine parameters and the state dict (no
    ``running_var``; one in a loaded checkpoint is ignored).

    Args:
        num_features: ``C``.
        eps: unused (nothing is divided); kept for the torch convention.
        momentum: rate of the running mean; ``None`` for a cumulative average.
        affine: learnable per-channel ``weight`` (starts at 1) and ``bias`` (starts at 0).
        track_running_stats: keep a running mean for eval; without it eval uses the batch mean.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        # The layer has no variance to keep (see the module docstring).
        self.register_buffer("running_var", None)

    def reset_running_stats(self) -> None:
        """Zero the running mean and the step counter."""
        if self.track_running_stats and self.running_mean is not None:
            self.running_mean.zero_()
            self.num_batches_tracked.zero_()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: ANN001 - torch's signature
        # A BatchNorm checkpoint carries a running variance this layer does not use: ignore it.
        state_dict.pop(prefix + "running_var", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if not self.use_batch_stats():
            return mean_only_batch_norm(x, self.running_mean, self.weight, self.bias)
        group = self.sync_group()
        if group is None:
            y, mean = _MeanOnlyFunction.apply(x, self.weight, self.bias)
        else:
            mean = batch_mean(x, group)
            y = mean_only_batch_norm(x, mean, self.weight, self.bias)
        if self.updates_running_stats():
            ema(self.running_mean, mean, self.step_factor())
        return y

    # ----------------------------------------------------------------------------- statistics interface
    # moments() is NormBase's: the batch mean (and the biased variance, which tools may average but
    # this layer ignores).
    @torch.no_grad()
    def load_statistics(self, mean: Tensor, var: Tensor | None = None) -> None:
        """Set the running mean from a population mean; ``var`` is accepted and ignored."""
        if not self.track_running_stats:
            raise ValueError("MeanOnlyBatchNorm: has no running statistics (track_running_stats=False)")
        if tuple(mean.shape) != (self.num_features,):
            raise ValueError(
                f"MeanOnlyBatchNorm: expected a mean of shape ({self.num_features},), got {tuple(mean.shape)}"
            )
        self.running_mean.copy_(mean)

    @torch.no_grad()
    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """``(A, b)`` with eval output ``A * x + b`` per channel: ``A = weight``, ``b = bias - weight * mu``."""
        if not self.track_running_stats:
            raise ValueError("MeanOnlyBatchNorm: has no running statistics (track_running_stats=False)")
        mean = self.running_mean.float()
        scale = torch.ones_like(mean) if self.weight is None else self.weight.float()
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.float()
        return scale, shift


register(
    "mobn",
    build_normbase(MeanOnlyBatchNorm),
    MeanOnlyBatchNorm,
    "Mean-only Batch Normalization (Salimans & Kingma 2016): subtract the batch/running mean, no division",
)
