"""Normalization Propagation (Arpit, Zhou, Kota & Govindaraju, "Normalization Propagation: A
Parametric Technique for Removing Internal Covariate Shift in Deep Networks", ICML 2016,
arXiv 1603.01431).

Data-independent normalization: no batch statistics, the same computation in train and eval, any
batch size (1 included). The input is standardized once with dataset statistics
(:func:`dataset_statistics`, :class:`Standardize`); after that, if a layer's input is ``N(0, I)``,
each unit's normalized pre-activation is ``N(0, 1)`` and the ReLU's output is re-standardized in
closed form, so every layer's input stays (approximately) zero-mean and unit-variance::

    u_i = gamma_i * (W_i . x) / (c * ||W_i||_2) + beta_i         (NormPropLinear / NormPropConv2d)
    o   = (ReLU(u) - sqrt(1 / (2 pi))) / sqrt((1 / 2) (1 - 1 / pi))   (NormPropReLU)

For convolutions ``W_i`` is output channel ``i``'s filter and the norm runs over ``C_in * kh * kw``.
``sqrt(1/(2 pi))`` and ``sqrt((1/2)(1 - 1/pi))`` are the mean and standard deviation of
``ReLU(z)`` for ``z ~ N(0, 1)``. The paper initializes ``gamma = 1``, ``beta = 0``.

The constant ``c``: besides the two ReLU constants, the paper's Algorithm 1 divides the normalized
pre-activation by 1.21 (:data:`PAPER_FACTOR`), a correction the paper reports finding empirically;
it is not part of the derivation (section 3), under which ``c = 1`` gives ``u`` exactly unit
variance for white input. The layers take ``c`` as ``factor``: the default is the derivation's 1.0
(what the tested zero-mean/unit-variance propagation relies on; with ``c = 1.21`` every
pre-activation starts at variance ``1 / 1.21^2``), and ``factor=PAPER_FACTOR`` is Algorithm 1
exactly. Since ``gamma`` is learnable, ``c`` only changes the initial scale ``gamma / c`` and the
step size of the effective gain.

Deployment: :meth:`NormPropLinear.as_plain` / :meth:`NormPropConv2d.as_plain` return the
equivalent ``nn.Linear`` / ``nn.Conv2d`` (weight ``gamma_i W_i / (c ||W_i||)``, bias ``beta``);
:class:`NormPropReLU` is a fixed affine map after a ReLU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .weight_norm import normalized_weight

__all__ = [
    "NormPropLinear",
    "NormPropConv2d",
    "NormPropReLU",
    "Standardize",
    "dataset_statistics",
    "PAPER_FACTOR",
    "RELU_MEAN",
    "RELU_STD",
]

#: Algorithm 1's empirical divisor of the normalized pre-activation.
PAPER_FACTOR = 1.21
#: Mean of ReLU(z) for z ~ N(0, 1): sqrt(1 / (2 pi)).
RELU_MEAN = math.sqrt(1.0 / (2.0 * math.pi))
#: Standard deviation of ReLU(z) for z ~ N(0, 1): sqrt((1 / 2) (1 - 1 / pi)).
RELU_STD = math.sqrt(0.5 * (1.0 - 1.0 / math.pi))


class _NormPropParametric(nn.Module):
    """Shared parameters of the NormProp linear and convolution layers: ``weight``, ``gain``, ``bias``."""

    weight: Tensor
    bias: Tensor | None

    def _init_params(
        self, weight_shape: tuple[int, ...], bias: bool, factor: float, eps: float, factory: dict[str, Any]
    ) -> None:
        self.factor = _check_factor(type(self).__name__, factor)
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        self.gain = nn.Parameter(torch.empty(weight_shape[0], **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(weight_shape[0], **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random ``weight`` (torch's default for the layer; its scale cancels), ``gain = 1``, ``bias = 0``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.ones_(self.gain)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @torch.no_grad()
    def _fill_plain(self, layer: M) -> M:
        """Give the plain ``layer`` this layer's effective weight and bias."""
        layer.weight.copy_(self.effective_weight())
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer

    def effective_weight(self) -> Tensor:
        """``gamma_i * W_i / (c * ||W_i||)``: the weight of the equivalent plain layer (differentiable)."""
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        return normalized_weight(self.weight, (self.gain / self.factor).reshape(shape), 0, self.eps)


class NormPropLinear(_NormPropParametric):
    """``u_i = gamma_i (W_i . x) / (c ||W_i||) + beta_i`` over inputs ``(*, in_features)``.

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (``bias`` is the paper's ``beta``).
        factor: ``c``; 1.0 (the derivation) by default, :data:`PAPER_FACTOR` for Algorithm 1.
        eps: lower bound of ``||W_i||`` (an all-zero row gives ``u_i = beta_i``, not NaN).

    Parameters: ``weight`` ``(out, in)`` (``W``), ``gain`` ``(out,)`` (``gamma``), ``bias``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        factor: float = 1.0,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_positive("NormPropLinear", "in_features", in_features)
        _check_positive("NormPropLinear", "out_features", out_features)
        self.in_features = in_features
        self.out_features = out_features
        self._init_params((out_features, in_features), bias, factor, eps, {"device": device, "dtype": dtype})

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.size(-1) != self.in_features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"NormPropLinear: expected input of shape (*, {self.in_features}), got {shape}")
        return F.linear(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def as_plain(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (same outputs), for deployment."""
        w = self.weight
        layer = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        return self._fill_plain(layer)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"factor={self.factor}"
        )


class NormPropConv2d(_NormPropParametric):
    """``u_i = gamma_i (W_i * x) / (c ||W_i||) + beta_i`` over inputs ``(N, C_in, H, W)`` or ``(C_in, H, W)``.

    ``||W_i||`` runs over the ``C_in / groups * kh * kw`` weights of output channel ``i``. Arguments
    as ``nn.Conv2d`` (zero padding only), plus ``factor`` and ``eps`` as :class:`NormPropLinear`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        factor: float = 1.0,
        eps: float = 1e-12,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = "NormPropConv2d"
        _check_positive(name, "in_channels", in_channels)
        _check_positive(name, "out_channels", out_channels)
        _check_positive(name, "groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{name}: expected groups to divide in_channels and out_channels, got groups={groups}, "
                f"in_channels={in_channels}, out_channels={out_channels}"
            )
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"{name}: expected padding 'same', 'valid', an int or a pair, got {padding!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_params(shape, bias, factor, eps, {"device": device, "dtype": dtype})

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() not in (3, 4) or x.size(-3) != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"NormPropConv2d: expected input of shape (N, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W), got {shape}"
            )
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def as_plain(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d`` (same outputs), for deployment."""
        w = self.weight
        layer = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        return self._fill_plain(layer)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"bias={self.bias is not None}, factor={self.factor}"
        )


class NormPropReLU(nn.Module):
    """``(ReLU(u) - sqrt(1/(2 pi))) / sqrt((1/2)(1 - 1/pi))``: zero mean, unit variance for ``u ~ N(0, 1)``."""

    def forward(self, x: Tensor) -> Tensor:
        # relu's output is saved for its backward, so the affine map must not be in place on it.
        return F.relu(x).mul(1.0 / RELU_STD).sub_(RELU_MEAN / RELU_STD)


# ----------------------------------------------------------------------------------- input statistics
@torch.no_grad()
def dataset_statistics(batches: Iterable[Any], dim: int = 1) -> tuple[Tensor, Tensor]:
    """Per-feature (per-channel) mean and standard deviation over a data iterable.

    Args:
        batches: tensors, or tuples/lists whose first element is the input (as data loaders yield).
        dim: the feature/channel dimension of each batch (1 for ``(N, C, *)``; ``-1`` for
            ``(N, *, F)``); statistics are over every other dimension and all batches.

    Returns ``(mean, std)``, each of the size of ``dim``, in the data's dtype. ``std`` is the
    population standard deviation (divide by the count), combined exactly across batches in
    float64 (Chan et al.'s pairwise update), so the result does not depend on the batching.
    """
    count = 0
    mean = m2 = None
    size = None
    for i, batch in enumerate(batches):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
            what = f"shape {tuple(x.shape)} dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"dataset_statistics: expected floating-point tensors, got {what} in batch {i}")
        if not -x.dim() <= dim < x.dim():
            raise ValueError(f"dataset_statistics: dim={dim} is out of range for batch {i} of shape {tuple(x.shape)}")
        d = dim % x.dim()
        if size is None:
            size, dtype = x.size(d), x.dtype
        elif x.size(d) != size:
            raise ValueError(
                f"dataset_statistics: expected {size} features in dimension {dim}, got shape {tuple(x.shape)} "
                f"in batch {i}"
            )
        xd = x.movedim(d, 0).reshape(size, -1).to(torch.float64)
        n = xd.size(1)
        if n == 0:
            continue
        bmean = xd.mean(1)
        bm2 = (xd - bmean[:, None]).square().sum(1)
        if mean is None:
            count, mean, m2 = n, bmean, bm2
            continue
        total = count + n
        delta = bmean - mean
        mean = mean + delta * (n / total)
        m2 = m2 + bm2 + delta.square() * (count * n / total)
        count = total
    if mean is None:
        raise ValueError("dataset_statistics: expected at least one non-empty batch, got none")
    std = (m2 / count).sqrt()
    return mean.to(dtype), std.to(dtype)


class Standardize(nn.Module):
    """``(x - mean) / std`` along dimension ``dim`` with fixed dataset statistics (NormProp's input step).

    ``mean`` and ``std`` (e.g. from :func:`dataset_statistics`) are buffers, so they are saved with
    the model. Features with ``std == 0`` are divided by 1 instead (they are constant: centred to 0).
    """

    def __init__(self, mean: Tensor, std: Tensor, dim: int = 1) -> None:
        super().__init__()
        if mean.dim() != 1 or mean.shape != std.shape:
            raise ValueError(
                f"Standardize: expected 1-D mean and std of one shape, got {tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if bool((std < 0).any()) or not bool(torch.isfinite(std).all()):
            raise ValueError("Standardize: expected finite std >= 0")
        self.dim = dim
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", torch.where(std > 0, std, torch.ones_like(std)).detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        if not -x.dim() <= self.dim < x.dim() or x.size(self.dim) != self.mean.numel():
            raise ValueError(
                f"Standardize: expected {self.mean.numel()} features in dimension {self.dim}, "
                f"got shape {tuple(x.shape)}"
            )
        d = self.dim % x.dim()
        shape = [1] * x.dim()
        shape[d] = -1
        return (x - self.mean.reshape(shape)) / self.std.reshape(shape)

    def extra_repr(self) -> str:
        return f"features={self.mean.numel()}, dim={self.dim}"


# ----------------------------------------------------------------------------------- checks
def _check_factor(name: str, factor: float) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"{name}: expected factor to be a finite number > 0, got {factor!r}")
    return float(factor)


def _check_positive(name: str, what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected {what} to be a positive int, got {value!r}")


M = TypeVar("M", nn.Linear, nn.Conv2d)
