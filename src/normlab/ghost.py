"""Ghost (virtual-batch) normalization (Hoffer, Hubara, Soudry, "Train longer, generalize better:
closing the generalization gap in large batch training of neural networks", NeurIPS 2017,
arXiv 1705.08741, section 4 and Algorithm 1).

Training splits the minibatch into contiguous *ghost batches* of ``v = virtual_batch_size`` samples
(the last holds the remainder) and normalizes each with its own statistics, per channel over its
``m_k = |B_k| * prod(spatial)`` values::

    mu_k      = (1/m_k) sum_{i in B_k} x_i
    sigma_k^2 = (1/m_k) sum_{i in B_k} (x_i - mu_k)^2                  (biased)
    y_i       = gamma * (x_i - mu_k) / sqrt(sigma_k^2 + eps) + beta     for i in B_k

The running statistics take one moving-average step per ghost batch, in order, with its mean and
unbiased variance ``sigma_k^2 m_k / (m_k - 1)`` (as the authors' code, which runs BatchNorm on each
chunk; this layer uses torch's kernels per ghost batch, or once on ghost batches stacked as channels
where that is faster); ``num_batches_tracked`` counts ghost batches. Inference is batch
normalization with the running statistics. ``virtual_batch_size=None``, or a batch no larger than it,
is exactly BatchNorm.

A ghost batch stays local to its process: under :func:`normlab.sync` the layer normalizes as it
does alone (the point of ghost batches is their small size). Every ghost batch needs more than one
value per channel in training, as BatchNorm does. The micro-batch mechanism (the ``micro_batch_*``
kernels of :mod:`normlab.kernels` and :func:`micro_batch_step`) is shared with Batch Kalman
Normalization, whose layers without a prediction are ghost BN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import BatchStats, NormBase
from .checks import check_input, check_positive_int
from .dispatch import FusedStep
from .kernels import (
    LOW_PRECISION,
    check_micro_batches,
    ema_steps,
    in_format_of,
    micro_batch_affine,
    micro_batch_counts,
    micro_batch_norm,
    micro_batch_sizes,
    micro_batch_stats,
    micro_batch_steps,
    params_in,
    stacked_micro_batches,
    stat_dtype,
)

__all__ = ["GhostBatchNorm", "ghost_batch_norm", "micro_batch_step"]


class GhostBatchNorm(NormBase):
    """Ghost batch normalization over inputs ``(N, C, *)`` (Hoffer et al. 2017); see the module docstring.

    Args:
        num_features: ``C``.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as torch's BatchNorm
            (``momentum`` is per ghost batch).
        virtual_batch_size: samples per ghost batch (the last holds the remainder); ``None``: the
            whole batch, i.e. BatchNorm. Keyword-only; the default 32 is a common ghost batch size
            (the paper's experiments use 128 with much larger batches).
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
        *,
        bias: bool = True,
        virtual_batch_size: int | None = 32,
    ) -> None:
        if virtual_batch_size is not None:
            check_positive_int("GhostBatchNorm", "virtual_batch_size", virtual_batch_size)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def check_input(self, x: Tensor, training: bool | None = None) -> None:
        """As every layer's, and in training every ghost batch needs more than one value per channel.

        The ghost batches are local, so the check is local also when synchronized.
        """
        super().check_input(x, training=False)
        if self.use_batch_stats():  # (whatever ``training`` says: the skeleton skips it when synchronized)
            check_micro_batches(self, x, self.virtual_batch_size)

    # ----------------------------------------------------------------------------- the paper's steps
    def normalize_batch(self, x: Tensor, group: Any | None) -> tuple[Tensor, BatchStats]:
        y, mean, var, count = micro_batch_step(x, self.virtual_batch_size, self.weight, self.bias, self.eps)
        return y, BatchStats(mean, var, count)

    def update_running(self, stats: BatchStats) -> None:
        """One moving-average step per ghost batch, in order (``num_batches_tracked`` counts them)."""
        micro_batch_steps(self, stats.mean, stats.var, stats.count)


def ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    virtual_batch_size: int | None = 32,
) -> Tensor:
    """Ghost batch normalization of ``x`` ``(N, C, *)``, in ``F.batch_norm``'s shape.

    ``training=False``: batch normalization with the running statistics. ``training=True``: each
    ghost batch with its own statistics, and with a ``momentum`` the running statistics that are
    given take one step per ghost batch in place (``momentum=None`` leaves them as they are).
    """
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("ghost_batch_norm: expected running_mean and running_var when training=False")
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    check_input("ghost_batch_norm", x, x.size(1), False)
    check_micro_batches("ghost_batch_norm", x, virtual_batch_size)
    y, mean, var, count = micro_batch_step(x, virtual_batch_size, weight, bias, eps)
    if momentum is not None and running_mean is not None:
        ema_steps(running_mean, running_var, mean, var, count, momentum)
    return y


def micro_batch_step(
    x: Tensor, size: int | None, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch normalization of each contiguous micro-batch of ``x`` with its own statistics.

    As :func:`normlab.kernels.micro_batch_norm` (same values and returns: ``y``, the ``(G, C)`` means
    and biased variances, the counts ``(G,)``), with several micro-batches as one step
    (:data:`_STEP`) that writes each micro-batch's output and gradient in place, so neither the
    forward nor the backward joins the parts in an extra copy.
    """
    sizes = micro_batch_sizes(x.size(0), size)
    # One native call on stacked micro-batches where that is faster; the kernels' .out forms of the
    # step below take no mixed precision.
    if len(sizes) < 2 or x.dtype in LOW_PRECISION or stacked_micro_batches(x, sizes):
        return micro_batch_norm(x, size, weight, bias, eps)
    y, mean, var, _ = _STEP(x, weight, bias, sizes, eps)
    return y, mean, var, micro_batch_counts(x, sizes)


# ----------------------------------------------------------------------------------- kernels
# Each ghost batch's statistics from the two-pass kernel (kernels.channel_stats, faster on CPU than the
# statistics pass of torch's training kernel), its normalization by torch's inference kernel into a
# slice of one output (kernels.micro_batch_affine), and torch's training backward per ghost batch into
# slices of one input gradient: no joining copies forward or backward.
def _step_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, sizes: list[int], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    weight, bias = params_in(stat_dtype(x), weight, bias)
    mean, var = micro_batch_stats(x, sizes)
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return micro_batch_affine(x, sizes, scale, shift, out=torch.empty_like(x)), mean, var, invstd


def _step_fake(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, sizes: list[int], eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    stats = x.new_empty((len(sizes), x.size(1)), dtype=stat_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats), torch.empty_like(stats)


def _step_setup(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, rest: tuple, outputs) -> None:  # noqa: ANN001
    _, mean, _, invstd = outputs
    ctx.save_for_backward(x, params_in(mean.dtype, weight)[0], mean, invstd)
    ctx.sizes, ctx.eps = list(rest[0]), rest[1]
    ctx.param_dtype = None if weight is None else weight.dtype


def _step_backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN001
    x, w, mean, invstd = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    g = in_format_of(grad_y, x)
    gx = torch.empty_like(x) if need_x else None
    sums = mean.new_empty((2, *mean.shape))
    for k, (gc, xc) in enumerate(zip(g.split(ctx.sizes), x.split(ctx.sizes))):
        args = (gc, xc, w, None, None, mean[k], invstd[k], True, ctx.eps)
        if gx is None:  # (the .out form takes no output it is told not to compute)
            _, sums[0, k], sums[1, k] = torch.ops.aten.native_batch_norm_backward(*args, [False, True, True])
        else:
            torch.ops.aten.native_batch_norm_backward.out(
                *args, [True, True, True], out0=gx.split(ctx.sizes)[k], out1=sums[0, k], out2=sums[1, k]
            )
    gw = sums[0].sum(0).to(ctx.param_dtype) if need_w else None
    gb = sums[1].sum(0).to(ctx.param_dtype) if need_b else None
    return gx, gw, gb


def _step_composite(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:  # noqa: ANN001
    return micro_batch_norm(x, ctx.sizes[0], weight, bias, ctx.eps)[0]


_STEP = FusedStep(
    "normlab::micro_batch_norm",
    _step_forward,
    _step_setup,
    _step_backward,
    _step_fake,
    layer="GhostBatchNorm",
    composite=_step_composite,
)
