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

The paper's schedule (r_max = 1, d_max = 0 for 5k steps, then linear to r_max = 3 at 40k and
d_max = 5 at 25k steps) is :func:`paper_schedule`; ``r_max``/``d_max`` accept any callable of the
step count (``num_batches_tracked``, a tensor) that returns a tensor or float.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import BatchStats, NormBase
from .checks import UNSET, check_input, keyword_options
from .dispatch import FusedStep
from .kernels import (
    channel_affine,
    channel_moments,
    constant,
    in_format_of,
    inference_batch_norm,
    stats_and_output_buffer,
)

__all__ = ["BatchRenorm", "Ramp", "paper_schedule", "batch_renorm"]

Limit = float | Callable[[Tensor], Tensor | float]


_LEGACY_ORDER = ("eps", "momentum", "affine", "track_running_stats", "r_max", "d_max", "device", "dtype")


def _legacy_order(args: tuple[Any, ...]) -> bool:
    # Before the options were keyword-only, r_max came right after track_running_stats.
    return len(args) > 4 and (callable(args[4]) or isinstance(args[4], (int, float)))


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

    @keyword_options(_LEGACY_ORDER, _legacy_order)
    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
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
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
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

    # ----------------------------------------------------------------------------- the paper's steps
    # The running statistics are always tracked, so the batch's are used exactly when they move
    # (training, not frozen); eval and frozen layers are BatchNorm's inference with them.
    def normalize_batch(self, x: Tensor, group: Any | None) -> tuple[Tensor, BatchStats]:
        r_max, d_max = self.limits()
        y, mean, sigma_b, sigma = _train_step(
            x, self.weight, self.bias, self.running_mean, self.running_var, r_max, d_max, self.eps, group
        )
        return y, BatchStats(mean, None, x.numel() // x.size(1), (sigma_b, sigma))

    def guarded_statistics(self, stats: BatchStats) -> tuple[Any, ...]:
        """``mu_B`` and ``sigma_B``: the batch's own statistics (``sigma`` comes from the running ones)."""
        return stats.mean, stats.extra[0]

    def update_running(self, stats: BatchStats) -> None:
        factor = self.step_factor()
        if isinstance(factor, Tensor):
            factor = factor.to(self.running_mean.dtype)
        sigma_b, sigma = stats.extra
        _move_running(self.running_mean, self.running_var, stats.mean, sigma, sigma_b, factor, self.eps)


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


# ----------------------------------------------------------------------------------- functional core
def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = UNSET,
    momentum: float | Tensor | None = UNSET,
    eps: float = 1e-5,
    *legacy: Any,
    r_max: Tensor | float = 3.0,
    d_max: Tensor | float = 5.0,
    process_group: Any | None = None,
) -> Tensor:
    """Batch renormalization of ``x`` ``(N, C, *)``, in ``F.batch_norm``'s shape.

    ``training=False``: batch normalization with the running statistics. ``training=True``: the
    paper's training step (global batch statistics over ``process_group``), and with ``momentum``
    (default 0.01, the paper's) ``running_mean`` and ``running_var`` are updated in place: ``mu`` and
    ``sigma = sqrt(running_var + eps)`` move towards ``mu_B`` and ``sigma_B`` at that rate;
    ``momentum=None`` leaves them as they are.

    Deprecated: the earlier form ``batch_renorm(x, running_mean, running_var, weight, bias, r_max,
    d_max, eps, momentum, group)``, which always trained and updated only with a ``momentum``, is
    still accepted (positional limits, or no ``training``) with a ``DeprecationWarning``.
    """
    if training is UNSET or not isinstance(training, bool):
        old = (training, momentum, eps, *legacy)
        names = ("r_max", "d_max", "eps", "momentum", "group")
        given = {k: v for k, v in zip(names, old) if v is not UNSET}
        warnings.warn(
            "batch_renorm without training=, or with r_max/d_max positional, is deprecated; the "
            "arguments now follow F.batch_norm: (x, running_mean, running_var, weight, bias, training, "
            "momentum, eps, *, r_max, d_max, process_group)",
            DeprecationWarning,
            stacklevel=2,
        )
        r_max, d_max = given.get("r_max", r_max), given.get("d_max", d_max)
        eps, momentum = given.get("eps", 1e-5), given.get("momentum", None)
        process_group = given.get("group", process_group)
        training = True
    elif legacy:
        raise TypeError(f"batch_renorm: expected at most 8 positional arguments, got {8 + len(legacy)}")
    if momentum is UNSET:
        momentum = 0.01
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    check_input("batch_renorm", x, running_mean.numel(), process_group is None)
    y, mean, sigma_b, sigma = _train_step(x, weight, bias, running_mean, running_var, r_max, d_max, eps, process_group)
    if momentum is not None:
        if isinstance(momentum, Tensor):
            momentum = momentum.to(running_mean.dtype)
        with torch.no_grad():
            _move_running(running_mean, running_var, mean, sigma, sigma_b, momentum, eps)
    return y


# ----------------------------------------------------------------------------------- kernels
def _train_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    r_max: Tensor | float,
    d_max: Tensor | float,
    eps: float,
    group: Any | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mu_B, sigma_B, sigma)`` of one training step (the running statistics are not moved).

    Locally the fused step below; over a process group the same maths composed of differentiable
    ops on the global statistics.
    """
    bounds = _bounds(r_max, d_max, running_mean)
    if group is None:
        return _STEP(x, weight, bias, running_mean, running_var, *bounds, eps)[:4]
    mean, var, _ = channel_moments(x, group, "BatchRenorm")
    sigma_b = torch.sqrt(var + eps)
    with torch.no_grad():
        sigma = torch.sqrt(running_var + eps)
    r, d = renorm_corrections(mean.detach(), sigma_b.detach(), running_mean, sigma, bounds)
    w_eff, b_eff = _folded_affine(weight, bias, r, d)
    y = channel_affine(x, mean, 1 / sigma_b, w_eff, b_eff)
    return y, mean.detach(), sigma_b.detach(), sigma


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


# The local step. ``y = (x - mu_B) / sigma_B * (gamma r) + (gamma d + beta)`` is batch normalization
# with the weight ``gamma r`` and bias ``gamma d + beta``, so the backward is torch's native
# batch-norm backward kernel; the forward computes the statistics once (kernels.channel_stats) and
# applies torch's inference kernel with the folded affine. The gradient to gamma is
# ``r * dL/d(gamma r) + d * dL/d(gamma d + beta)``. The per-channel work (r, d, the folded affine,
# the moving statistics) is a few small ops on cached constants, since at small shapes their
# dispatch costs as much as the kernels. Under torch.compile the step is a custom op, so the
# compiled backward reads the r, d and statistics saved by the forward and never recomputes them
# from the running buffers, which the same step updates in place.
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


def _step_fake(x, weight, bias, running_mean, running_var, r_lo, r_hi, d_lo, d_hi, eps):  # noqa: ANN001, ANN202
    stat = running_mean.new_empty(running_mean.shape)
    y = torch.empty_like(x)
    return y, stat, stat.clone(), stat.clone(), stat.clone(), stat.clone(), stat.clone()


def _step_setup(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, rest: tuple, outputs) -> None:  # noqa: ANN001
    """What :func:`_step_backward` reads, from the inputs and outputs of :func:`_train_forward`."""
    _, mean, sigma_b, _, r, d, w_eff = outputs
    ctx.save_for_backward(x, w_eff, mean, sigma_b, r, d)
    ctx.eps = rest[-1]
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _step_backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN001
    """Gradients of ``x``, ``weight`` and ``bias``."""
    x, w_eff, mean, sigma_b, r, d = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    # Gradients of batch normalization with weight gamma r, through mu_B and sigma_B, with r and
    # d constant, as the paper prescribes; then dL/dgamma = r dL/d(gamma r) + d dL/d(gamma d + beta).
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
        in_format_of(grad_y, x),
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
    return gx if need_x else None, g_weight, g_bias


def _step_composite(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:  # noqa: ANN001
    """The step in differentiable ops, with this step's r and d (for second derivatives)."""
    r, d = ctx.saved_tensors[4:]
    mean, var, _ = channel_moments(x)
    w_eff, b_eff = _folded_affine(weight, bias, r, d)
    return channel_affine(x, mean, torch.rsqrt(var + ctx.eps), w_eff, b_eff)


_STEP = FusedStep(
    "normlab::batch_renorm_train",
    _train_forward,
    _step_setup,
    _step_backward,
    _step_fake,
    layer="BatchRenorm",
    composite=_step_composite,
)
