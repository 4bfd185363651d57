"""Batch Renormalization (Ioffe, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models", NeurIPS 2017, arXiv 1702.03275).

Training (Algorithm 1 of the paper), per channel over the ``m`` samples of the minibatch::

    mu_B    = (1/m) sum_i x_i
    sigma_B = sqrt((1/m) sum_i (x_i - mu_B)^2 + eps)          (biased variance)
    r       = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max))
    d       = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    x_hat   = (x - mu_B) / sigma_B * r + d
    y       = gamma * x_hat + beta
    mu     <- mu + momentum * (mu_B - mu)
    sigma  <- sigma + momentum * (sigma_B - sigma)

Inference: ``y = gamma * (x - mu) / sigma + beta``, i.e. batch normalization with the moving
statistics. With ``r_max = 1, d_max = 0`` training is exactly batch normalization.

Storage: ``sigma`` is kept as ``running_var = sigma^2 - eps`` so that ``running_var`` has its
BatchNorm meaning (eval is ``F.batch_norm`` with it) and BatchNorm checkpoints interchange.

Speed: ``y = (x - mu_B) / sigma_B * (gamma r) + (gamma d + beta)`` is batch normalization with the
weight ``gamma r`` and bias ``gamma d + beta``, so the backward is torch's native batch-norm
backward kernel; the forward computes the statistics once and applies one fused multiply-add.
The gradient to gamma is ``r * dL/d(gamma r) + d * dL/d(gamma d + beta)``.

The paper's schedule (r_max = 1, d_max = 0 for 5k steps, then linear to r_max = 3 at 40k and
d_max = 5 at 25k steps) is :func:`paper_schedule`; ``r_max``/``d_max`` accept any callable of the
step count (``num_batches_tracked``, a tensor) that returns a tensor or float.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LOW_PRECISION, NormBase, channel_affine, channel_moments, ema, reduce_dims
from .registry import build_normbase, register

__all__ = ["BatchRenorm", "Ramp", "paper_schedule", "batch_renorm"]

Limit = float | Callable[[Tensor], Tensor | float]


@dataclass(frozen=True)
class Ramp:
    """A limit that is ``start`` until ``begin`` steps, then linear to ``end`` at ``finish`` steps."""

    start: float
    end: float
    begin: float
    finish: float

    def __call__(self, step: Tensor) -> Tensor:
        span = max(self.finish - self.begin, 1e-12)
        t = ((step.to(torch.float32) - self.begin) / span).clamp(0, 1)
        return self.start + (self.end - self.start) * t


def paper_schedule(scale: float = 1.0) -> dict[str, Ramp]:
    """The paper's r_max/d_max warm-up, with its step counts multiplied by ``scale``.

    ``BatchRenorm(C, **paper_schedule())`` uses r_max = 1 and d_max = 0 (plain BN) for the first
    5000 steps, then r_max rises linearly to 3 at 40k steps and d_max to 5 at 25k steps. For a run
    of T steps instead of the paper's ~130k, ``paper_schedule(T / 130_000)`` keeps the proportions.
    """
    if not scale > 0:
        raise ValueError(f"paper_schedule: expected scale > 0, got {scale!r}")
    return {
        "r_max": Ramp(1.0, 3.0, 5000 * scale, 40000 * scale),
        "d_max": Ramp(0.0, 5.0, 5000 * scale, 25000 * scale),
    }


class _RenormFunction(torch.autograd.Function):
    """Training-mode batch renormalization on the native batch-norm backward kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, r_max, d_max, eps):  # noqa: ANN001, ANN205
        xs = x.float() if x.dtype in LOW_PRECISION else x
        var, mean = torch.var_mean(xs, dim=reduce_dims(x), correction=0)
        invstd = torch.rsqrt(var + eps)
        r, d = renorm_corrections(mean, var, running_mean, running_var, r_max, d_max, eps)
        w_eff = r if weight is None else weight * r
        b_eff = d if weight is None else weight * d
        if bias is not None:
            b_eff = b_eff + bias
        y = channel_affine(x, mean, invstd, w_eff, b_eff)
        ctx.save_for_backward(x, w_eff, mean, invstd, r, d)
        ctx.eps = eps
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _gm, _gv):  # noqa: ANN001, ANN205
        x, w_eff, mean, invstd, r, d = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad_y.contiguous(memory_format=_memory_format(x)),
            x,
            w_eff,
            None,
            None,
            mean,
            invstd,
            True,
            ctx.eps,
            [need_x, need_w, need_w or need_b],
        )
        g_weight = (gw * r + gb * d) if (need_w and ctx.has_weight) else None
        g_bias = gb if (need_b and ctx.has_bias) else None
        return gx if need_x else None, g_weight, g_bias, None, None, None, None, None


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _limit(limit: Limit, step: Tensor) -> Tensor | float:
    return limit(step) if callable(limit) else limit


def renorm_corrections(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    r_max: Tensor | float,
    d_max: Tensor | float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The paper's ``r`` and ``d`` (no gradient) from batch and running statistics."""
    with torch.no_grad():
        sigma_b = torch.sqrt(var.detach() + eps)
        sigma = torch.sqrt(running_var.to(sigma_b.dtype) + eps)
        r_max = torch.as_tensor(r_max, dtype=sigma.dtype, device=sigma.device)
        d_max = torch.as_tensor(d_max, dtype=sigma.dtype, device=sigma.device)
        r = torch.minimum(torch.maximum(sigma_b / sigma, 1 / r_max), r_max)
        d = torch.minimum(torch.maximum((mean.detach() - running_mean.to(sigma.dtype)) / sigma, -d_max), d_max)
    return r, d


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    r_max: Tensor | float,
    d_max: Tensor | float,
    eps: float = 1e-5,
    group: Any | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training-mode batch renormalization of ``x`` ``(N, C, *)``.

    Returns ``(y, mu_B, biased var_B, m)``; the running statistics are read, not updated. With a
    process ``group`` the batch statistics are those of the global batch.
    """
    if group is None:
        y, mean, var = _RenormFunction.apply(x, weight, bias, running_mean, running_var, r_max, d_max, eps)
        count = x.numel() // x.size(1)
        return y, mean, var, torch.tensor(float(count), device=x.device)
    mean, var, count = channel_moments(x, group)
    r, d = renorm_corrections(mean, var, running_mean, running_var, r_max, d_max, eps)
    w_eff = r if weight is None else weight * r
    b_eff = d if weight is None else weight * d
    if bias is not None:
        b_eff = b_eff + bias
    return channel_affine(x, mean, torch.rsqrt(var + eps), w_eff, b_eff), mean.detach(), var.detach(), count


class BatchRenorm(NormBase):
    """Batch Renormalization over inputs ``(N, C, *)`` (Ioffe 2017); see the module docstring.

    Args:
        num_features: ``C``.
        eps: added to the variance.
        momentum: rate of the moving mean and standard deviation (the paper's ``alpha``); ``None``
            for a cumulative average. The default 0.01 is the paper's.
        affine: learnable ``gamma``/``beta``.
        track_running_stats: must be ``True``: the corrections need the moving statistics.
        r_max: bound of ``r`` (>= 1): a number, or a callable of the step count such as
            ``paper_schedule()["r_max"]``.
        d_max: bound of ``|d|`` (>= 0): a number or a callable of the step count.

    ``running_mean``/``running_var``/``num_batches_tracked`` mean what they mean in BatchNorm2d.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not track_running_stats:
            raise ValueError(
                "BatchRenorm: expected track_running_stats=True (r and d are corrections towards the "
                "moving statistics), got track_running_stats=False"
            )
        if not callable(r_max) and not (isinstance(r_max, (int, float)) and r_max >= 1):
            raise ValueError(f"BatchRenorm: expected r_max >= 1 or a callable of the step, got {r_max!r}")
        if not callable(d_max) and not (isinstance(d_max, (int, float)) and d_max >= 0):
            raise ValueError(f"BatchRenorm: expected d_max >= 0 or a callable of the step, got {d_max!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.r_max = r_max
        self.d_max = d_max

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}"

    def limits(self) -> tuple[Tensor | float, Tensor | float]:
        """This step's ``(r_max, d_max)``, from the schedule if one was given."""
        step = self.num_batches_tracked
        return _limit(self.r_max, step), _limit(self.d_max, step)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        if not self.use_batch_stats():
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        r_max, d_max = self.limits()
        y, mean, var, _ = batch_renorm(
            x, self.running_mean, self.running_var, self.weight, self.bias, r_max, d_max, self.eps, self.sync_group()
        )
        if self.updates_running_stats():
            self._update(mean, var)
        return y

    @torch.no_grad()
    def _update(self, mean: Tensor, var: Tensor) -> None:
        # The paper moves sigma (not the variance) towards sigma_B = sqrt(var_B + eps).
        factor = self.step_factor()
        sigma = torch.sqrt(self.running_var + self.eps)
        ema(sigma, torch.sqrt(var + self.eps), factor)
        ema(self.running_mean, mean, factor)
        self.running_var.copy_((sigma * sigma - self.eps).clamp_min(0))


register(
    "brn",
    build_normbase(BatchRenorm),
    BatchRenorm,
    "Batch Renormalization (Ioffe 2017), options r_max, d_max (numbers or paper_schedule())",
)
