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
backward kernel; the forward computes the statistics once (:func:`normlab.base.channel_stats`)
and applies torch's inference kernel with the folded affine. The gradient to gamma is
``r * dL/d(gamma r) + d * dL/d(gamma d + beta)``. The per-channel work (r, d, the folded affine, the
moving statistics) is a few small ops on cached constants, since at small shapes their dispatch
costs as much as the kernels.

The paper's schedule (r_max = 1, d_max = 0 for 5k steps, then linear to r_max = 3 at 40k and
d_max = 5 at 25k steps) is :func:`paper_schedule`; ``r_max``/``d_max`` accept any callable of the
step count (``num_batches_tracked``, a tensor) that returns a tensor or float.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (
    NormBase,
    channel_affine,
    channel_moments,
    check_input,
    constant,
    inference_batch_norm,
    memory_format_of,
    stats_and_output_buffer,
)
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


def _bounds(r_max: Tensor | float, d_max: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(1/r_max, r_max, -d_max, d_max)`` as 0-d tensors on ``like``'s device."""
    if isinstance(r_max, Tensor) or isinstance(d_max, Tensor) or torch.compiler.is_compiling():
        r_max, d_max = (t if isinstance(t, Tensor) else like.new_tensor(float(t)) for t in (r_max, d_max))
        return r_max.reciprocal(), r_max, d_max.neg(), d_max
    return _fixed_bounds(float(r_max), float(d_max), like.device, like.dtype)


@functools.lru_cache(maxsize=256)
def _fixed_bounds(r_max: float, d_max: float, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
    return tuple(constant(v, device, dtype) for v in (1 / r_max, r_max, -d_max, d_max))


def renorm_corrections(
    mean: Tensor, sigma_b: Tensor, running_mean: Tensor, sigma: Tensor, bounds: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """The paper's ``r = clip(sigma_B / sigma)`` and ``d = clip((mu_B - mu) / sigma)`` of detached inputs.

    ``bounds`` is ``(1/r_max, r_max, -d_max, d_max)``.
    """
    r_lo, r_hi, d_lo, d_hi = bounds
    r = torch.div(sigma_b, sigma).clamp_(r_lo, r_hi)
    d = torch.sub(mean, running_mean).div_(sigma).clamp_(d_lo, d_hi)
    return r, d


def _folded_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Weight ``gamma r`` and bias ``gamma d + beta`` of the equivalent batch normalization."""
    if weight is None:
        return r, d if bias is None else d + bias
    return weight * r, weight * d if bias is None else torch.addcmul(bias, weight, d)


def _move_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    sigma: Tensor,
    sigma_b: Tensor,
    factor: Tensor | float,
    eps: float,
) -> None:
    """Without grad mode: ``mu`` and ``sigma`` move towards ``mu_B`` and ``sigma_B`` at rate ``factor``
    (the paper moves sigma, not the variance); ``running_var`` stores ``sigma^2 - eps``. Overwrites
    ``sigma``."""
    running_mean.lerp_(mean, factor)
    sigma.lerp_(sigma_b, factor)
    # Never below 0: both sigmas are >= sqrt(eps), but rounding may take a few ulps off.
    neg_eps = constant(-eps, running_var.device, running_var.dtype)
    torch.addcmul(neg_eps, sigma, sigma, out=running_var).clamp_min_(0)


def _train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    r_lo: Tensor,
    r_hi: Tensor,
    d_lo: Tensor,
    d_hi: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mu_B, sigma_B, sigma, r, d, gamma r)`` of one training step (no running update)."""
    # The statistics (mean and biased variance; float32 for half inputs), then the
    # native inference kernel with the batch statistics and the folded affine (gamma r, gamma d + beta).
    # Few small ops: at small shapes their dispatch costs as much as the kernels.
    mean, var, out = stats_and_output_buffer(x)
    if mean.dtype != running_mean.dtype:
        mean, var = mean.to(running_mean.dtype), var.to(running_mean.dtype)
    eps_t = constant(eps, running_var.device, running_var.dtype)
    sigma_b = torch.add(var, eps_t).sqrt_()
    sigma = torch.add(running_var, eps_t).sqrt_()
    r, d = renorm_corrections(mean, sigma_b, running_mean, sigma, (r_lo, r_hi, d_lo, d_hi))
    w_eff, b_eff = _folded_affine(weight, bias, r, d)
    y = inference_batch_norm(x, w_eff, b_eff, mean, var, eps, out)
    return y, mean, sigma_b, sigma, r, d, w_eff.clone() if w_eff is r else w_eff


# Under torch.compile the step is a custom op with its own backward: opaque to the compiler, so
# the compiled backward reads the r, d and statistics saved by the forward and never recomputes
# them from the running buffers, which the same step updates in place. In eager mode the same
# forward and backward run as an autograd.Function, which dispatches with less overhead.
_renorm_train = torch.library.custom_op("normlab::batch_renorm_train", _train_forward, mutates_args=())


@_renorm_train.register_fake
def _(x, weight, bias, running_mean, running_var, r_lo, r_hi, d_lo, d_hi, eps):  # noqa: ANN001, ANN202
    stat = running_mean.new_empty(running_mean.shape)
    y = torch.empty_like(x)
    return y, stat, stat.clone(), stat.clone(), stat.clone(), stat.clone(), stat.clone()


def _save_for_backward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, output) -> None:  # noqa: ANN001
    """What :func:`_renorm_backward` reads, from the inputs and outputs of :func:`_train_forward`."""
    _, mean, sigma_b, _, r, d, w_eff = output
    ctx.save_for_backward(x, w_eff, mean, sigma_b, r, d)
    ctx.eps = eps
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _renorm_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, bias, *_, eps = inputs
    _save_for_backward(ctx, x, weight, bias, eps, output)
    ctx.mark_non_differentiable(*output[1:])


def _renorm_backward(ctx, grad_y: Tensor, *_: Any) -> tuple[Tensor | None, ...]:  # noqa: ANN001
    """Gradients of ``x``, ``weight``, ``bias``, then ``None``s for the other inputs."""
    x, w_eff, mean, sigma_b, r, d = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # Gradients of batch normalization with weight gamma r, through mu_B and sigma_B, with r and
    # d constant, as the paper prescribes; then dL/dgamma = r dL/d(gamma r) + d dL/d(gamma d + beta).
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
        grad_y.contiguous(memory_format=memory_format_of(x)),
        x,
        w_eff,
        None,
        None,
        mean,
        sigma_b.reciprocal(),
        True,
        ctx.eps,
        [need_x, need_w, need_w or need_b],
    )
    g_weight = torch.addcmul(gb * d, gw, r) if (need_w and ctx.has_weight) else None
    g_bias = gb if (need_b and ctx.has_bias) else None
    return gx if need_x else None, g_weight, g_bias, None, None, None, None, None, None, None


_renorm_train.register_autograd(_renorm_backward, setup_context=_renorm_setup)


class _RenormFunction(torch.autograd.Function):
    # Tuned for dispatch overhead, which at small shapes costs as much as the kernels: forward(ctx,
    # ...) rather than a separate setup_context (apply() then binds no signature), the tensors that
    # take no gradient packed in one tuple argument (apply() inspects every argument), and the
    # running update done here, where grad mode is already off.
    @staticmethod
    def forward(ctx, x, weight, bias, rest):  # noqa: ANN001, ANN205
        running_mean, running_var, bounds, eps, factor = rest
        outputs = _train_forward(x, weight, bias, running_mean, running_var, *bounds, eps)
        _save_for_backward(ctx, x, weight, bias, eps, outputs)
        if factor is not None:
            _, mean, sigma_b, sigma = outputs[:4]
            _move_running(running_mean, running_var, mean, sigma, sigma_b, factor, eps)
        return outputs[0]

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():  # create_graph=True: this backward has no derivative of its own
            return _backward_once(ctx, grad_y)
        return _renorm_backward(ctx, grad_y)[:4]


@torch.autograd.function.once_differentiable
def _backward_once(ctx, grad_y):  # noqa: ANN001, ANN202
    return _renorm_backward(ctx, grad_y)[:4]


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    r_max: Tensor | float = 3.0,
    d_max: Tensor | float = 5.0,
    eps: float = 1e-5,
    momentum: Tensor | float | None = None,
    group: Any | None = None,
) -> Tensor:
    """Training-mode batch renormalization of ``x`` ``(N, C, *)``.

    Like ``F.batch_norm(training=True)``: with ``momentum`` given, ``running_mean`` and
    ``running_var`` are updated in place (``mu`` and ``sigma = sqrt(running_var + eps)`` move
    towards ``mu_B`` and ``sigma_B`` at that rate). With a process ``group`` the batch statistics
    are those of the global batch over the group.
    """
    if group is None and not torch.compiler.is_compiling():
        bounds = _bounds(r_max, d_max, running_mean)
        return _RenormFunction.apply(x, weight, bias, (running_mean, running_var, bounds, eps, momentum))
    if group is None:
        r_lo, r_hi, d_lo, d_hi = _bounds(r_max, d_max, running_mean)
        y, mean, sigma_b, sigma = _renorm_train(
            x, weight, bias, running_mean, running_var, r_lo, r_hi, d_lo, d_hi, eps
        )[:4]
    else:
        mean, var, _ = channel_moments(x, group, "BatchRenorm")
        sigma_b = torch.sqrt(var + eps)
        with torch.no_grad():
            sigma = torch.sqrt(running_var + eps)
        bounds = _bounds(r_max, d_max, running_mean)
        r, d = renorm_corrections(mean.detach(), sigma_b.detach(), running_mean, sigma, bounds)
        w_eff, b_eff = _folded_affine(weight, bias, r, d)
        y = channel_affine(x, mean, 1 / sigma_b, w_eff, b_eff)
    if momentum is not None:
        with torch.no_grad():
            _move_running(running_mean, running_var, mean.detach(), sigma, sigma_b.detach(), momentum, eps)
    return y


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
        """This step's ``(r_max, d_max)``: the schedule at ``num_batches_tracked`` steps done."""
        r_max, d_max = self.r_max, self.d_max
        if callable(r_max):
            r_max = r_max(self.num_batches_tracked)
        if callable(d_max):
            d_max = d_max(self.num_batches_tracked)
        return r_max, d_max

    def forward(self, x: Tensor) -> Tensor:
        # The running statistics are always tracked: the batch's are used exactly when they move.
        training = self.updates_running_stats()
        group = self.sync_group() if training else None
        check_input(self, x, self.num_features, training and group is None)
        if not training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        r_max, d_max = self.limits()
        factor = self.step_factor()
        running_mean = self.running_mean
        if isinstance(factor, Tensor):
            factor = factor.to(running_mean.dtype)
        return batch_renorm(
            x, running_mean, self.running_var, self.weight, self.bias, r_max, d_max, self.eps, factor, group
        )


register(
    "brn",
    build_normbase(BatchRenorm),
    BatchRenorm,
    "Batch Renormalization (Ioffe 2017), options r_max, d_max (numbers or paper_schedule())",
)
