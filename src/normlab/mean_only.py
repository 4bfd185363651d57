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

import warnings
from typing import Any

import torch
from torch import Tensor

from .base import BatchStats, NormBase, write_statistics
from .comm import global_sum
from .dispatch import FusedStep
from .kernels import channel_shape, ema, in_format_of, params_in, reduce_dims, stat_dtype

__all__ = ["MeanOnlyBatchNorm", "mean_only_batch_norm"]


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

    # The layer has no variance to keep and divides by nothing (see the module docstring).
    _keeps_running_var = False
    _positive_eps_because = None

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: ANN001 - torch's signature
        # A BatchNorm checkpoint carries a running variance this layer does not use: ignore it.
        state_dict.pop(prefix + "running_var", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ----------------------------------------------------------------------------- the paper's steps
    def normalize_running(self, x: Tensor) -> Tensor:
        return _shift(x, self.running_mean, self.weight, self.bias)

    def normalize_batch(self, x: Tensor, group: Any | None) -> tuple[Tensor, BatchStats]:
        y, mean = _train_step(x, self.weight, self.bias, group)
        return y, BatchStats(mean, None, x.numel() // x.size(1))

    def update_running(self, stats: BatchStats) -> None:
        ema(self.running_mean, stats.mean, self.step_factor())

    # ----------------------------------------------------------------------------- statistics interface
    # moments() is NormBase's: the batch mean (and the biased variance, which tools may average but
    # this layer ignores).
    @torch.no_grad()
    def load_statistics(self, mean: Tensor, var: Tensor | None = None) -> None:
        """Set the running mean from a population mean (checked before it is written); ``var`` is ignored."""
        if not self.track_running_stats:
            raise ValueError("MeanOnlyBatchNorm: has no running statistics (track_running_stats=False)")
        write_statistics(self, mean, None)

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


# ----------------------------------------------------------------------------------- functional core
def mean_only_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    process_group: Any | None = None,
) -> Tensor:
    """Mean-only batch normalization of ``x`` ``(N, C, *)``, in ``F.batch_norm``'s shape.

    ``training=False``: ``weight * (x - running_mean) + bias``. ``training=True``: the batch mean
    (global over ``process_group``) instead, and ``running_mean``, when given, moves towards it at
    rate ``momentum`` in place. ``running_var`` must be ``None`` (the layer keeps no variance) and
    ``eps`` is unused; both keep the shape of the other functional cores.

    The earlier form ``mean_only_batch_norm(x, mean, weight, bias)`` still works (deprecated).
    """
    if running_var is not None:
        warnings.warn(
            "mean_only_batch_norm(x, mean, weight, bias) is deprecated; the arguments now follow "
            "F.batch_norm: (x, running_mean, None, weight, bias, training, momentum, eps)",
            DeprecationWarning,
            stacklevel=2,
        )
        return _shift(x, running_mean, running_var, weight)
    if not training:
        if running_mean is None:
            raise ValueError("mean_only_batch_norm: expected a running_mean when training=False")
        return _shift(x, running_mean, weight, bias)
    y, mean = _train_step(x, weight, bias, process_group)
    if running_mean is not None and momentum:
        ema(running_mean, mean, momentum)
    return y


# ----------------------------------------------------------------------------------- kernels
def _shift(x: Tensor, mean: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``weight * (x - mean) + bias`` along dimension 1 of ``x`` (differentiable in all inputs)."""
    shape = channel_shape(x)
    if weight is None:
        y = x - mean.reshape(shape).to(x.dtype)
        return y if bias is None else y + bias.reshape(shape).to(x.dtype)
    # One fused multiply-add: weight * x + (bias - weight * mean).
    shift = -mean * weight if bias is None else bias - mean * weight
    return torch.addcmul(shift.reshape(shape).to(x.dtype), x, weight.reshape(shape).to(x.dtype))


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


def _train_step(x: Tensor, weight: Tensor | None, bias: Tensor | None, group: Any | None) -> tuple[Tensor, Tensor]:
    """``(y, mu_B)`` of one training step: the fused step locally, composed ops over a process group."""
    if group is None:
        return _STEP(x, weight, bias)
    mean = batch_mean(x, group)
    return _shift(x, mean, weight, bias), mean


# The local step on torch's native batch-norm kernels:
#
# ``weight * (x - mu) + bias`` is batch-norm inference with mean ``mu`` and unit variance (eps 0),
# so the forward is the native inference kernel; the backward takes ``dL/dweight`` and ``dL/dbias``
# from the native inference backward (one reading pass) and writes
# ``dL/dx = weight * (dL/dy - mean(dL/dy))`` in one fused multiply-add. No variance is ever computed.
def _step_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    mean = x.mean(reduce_dims(x), dtype=stat_dtype(x))
    w = None if weight is None else weight.to(mean.dtype)
    b = None if bias is None else bias.to(mean.dtype)
    if x.dim() == 2:
        # For (N, C) inputs one fused multiply-add is faster than the strided inference kernel.
        y = _shift(x, mean, w, b)
    else:
        y = torch.batch_norm(x, w, b, mean, torch.ones_like(mean), False, 0.0, 0.0, False)
    return y, mean


def _step_fake(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), x.new_empty(x.size(1), dtype=stat_dtype(x))


def _step_setup(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, rest: tuple, outputs) -> None:  # noqa: ANN001
    mean = outputs[1]
    # params_in: no op that returns its input (a same-dtype .to), which a custom op's setup may not run.
    ctx.save_for_backward(x, params_in(mean.dtype, weight)[0], mean)
    ctx.param_dtype = None if weight is None else weight.dtype


def _step_backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN001
    x, w, mean = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # The kernel only for the per-channel sums (dL/dweight = sum dL/dy (x - mu), dL/dbias = sum dL/dy):
    # its input gradient would take a second pass to correct for mu_B.
    g = in_format_of(grad_y, x)
    _, gw, gb = torch.ops.aten.native_batch_norm_backward(
        g, x, w, mean, torch.ones_like(mean), None, None, False, 0.0, [False, need_w, True]
    )
    gx = None
    if need_x:
        # dL/dx = weight * (dL/dy - mean(dL/dy)), in one pass.
        shape = channel_shape(x)
        m = x.numel() // x.size(1)
        if w is None:
            gx = g - (gb / m).reshape(shape).to(g.dtype)
        else:
            shift = (gb * w).div_(-m).reshape(shape).to(g.dtype)
            gx = torch.addcmul(shift, g, w.reshape(shape).to(g.dtype))
    if gw is not None:
        gw, gb = gw.to(ctx.param_dtype), gb.to(ctx.param_dtype)
    return gx, gw if need_w else None, gb if need_b else None


def _step_composite(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:  # noqa: ANN001
    """The step in differentiable ops (for second derivatives)."""
    return _shift(x, x.mean(reduce_dims(x), dtype=stat_dtype(x)), weight, bias)


_STEP = FusedStep(
    "normlab::mean_only_train",
    _step_forward,
    _step_setup,
    _step_backward,
    _step_fake,
    layer="MeanOnlyBatchNorm",
    composite=_step_composite,
)
