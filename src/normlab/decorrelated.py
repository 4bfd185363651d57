"""Decorrelated Batch Normalization (Huang, Yang, Lang, Deng, "Decorrelated Batch Normalization",
CVPR 2018, arXiv 1804.08450), with the iterative whitening of IterNorm (Huang, Yang, Liu, Zhu, Shao,
"Iterative Normalization: Beyond Standardization towards Efficient Whitening", CVPR 2019,
arXiv 1904.03441) as a third method.

Channels are split into consecutive groups of ``g = group_size`` channels (the last group is smaller
when ``C`` is not a multiple of ``g``; ``group_size >= C`` whitens all channels together). Each group
is whitened on its own over the ``m = N * prod(spatial)`` samples of the batch (Algorithm 1 of the
paper)::

    mu      = (1/m) X 1                                   (batch mean of the group, g values)
    Xc      = X - mu 1^T
    Sigma   = (1/m) Xc Xc^T + eps I                       (biased covariance)
    Sigma   = D Lambda D^T                                (eigendecomposition)
    zca:    W = D Lambda^{-1/2} D^T,   x_hat = W Xc       (the paper's DBN)
    pca:    W = Lambda^{-1/2} D^T,     x_hat = W Xc
    newton: Sigma_N = Sigma / tr(Sigma),  P_0 = I,
            P_k = 1.5 P_{k-1} - 0.5 P_{k-1}^3 Sigma_N   (k = 1..T, T = iterations),
            W = P_T / sqrt(tr(Sigma))                    (IterNorm; matrix products only)
    y       = gamma * x_hat + beta                        (per channel)

The Newton iteration is meant for few steps (the paper's default is 5): it converges to
``Sigma^{-1/2}`` but is not self-correcting, and for a covariance with condition number above 9 the
rounding errors grow again after many more steps (Higham, "Functions of Matrices", 2008, section 6.4).

``group_size = 1`` is batch normalization. ``method="pca"`` exists to show the *stochastic axis
swapping* that the paper identifies as the reason PCA whitening fails: the order and signs of the
eigenvectors change from batch to batch, so the same channel of ``x_hat`` means a different
direction in each batch. It is not meant for real training.

Running statistics: ``running_mean`` (C,) and ``running_whitening`` (G, g, g) move towards the batch
mean and the batch whitening matrix ``W`` with ``momentum``, as the paper's Algorithm 1 does; eval
computes ``y = gamma * (W_run (x - mu_run)) + beta``. The whitening matrix (not ``Sigma``) is averaged
because that is the paper's choice and it makes eval apply a matrix of the same kind training applied
(for ``newton``, the T-step iterate rather than an exact inverse square root of an averaged
covariance), with no decomposition at inference. ``running_var`` (C,) is also kept: the unbiased
per-channel variance (the diagonal of the covariance), moved as BatchNorm moves it. The layer does not
use it; it keeps BatchNorm's meaning so that ``normlab.convert`` to and from ``"bn"`` carries it.

Large groups and eval: an average of whitening matrices is not the whitening matrix of an average
covariance, and the gap grows with the group size and with how much the batches' eigenvectors turn
from batch to batch. In the lab's whitening experiment (a 3-layer MLP on digits, 64 channels in one
group of 64, batches of 128), eval with the moving average scored 11 % test accuracy where the same
weights scored 93 % after :func:`normlab.recompute_statistics` (whose population covariance gives
one whitening matrix per group). With group sizes near the channel count, recompute the statistics
before evaluating, or compare eval against the training-mode output on a large batch.

Layout of the per-group matrices (``running_whitening``, ``moments().var``, ``load_statistics``):
``(G, g, g)`` with ``G = ceil(C / g)``; group ``k`` holds channels ``k*g .. k*g + g - 1``. When ``C``
is not a multiple of ``g`` the last group's ``r`` channels occupy its top-left ``r x r`` block; the
padding is the identity in ``running_whitening`` and zero in covariances, and is ignored on input.

Backward. Autograd through ``torch.linalg.eigh`` divides by ``lambda_i - lambda_j`` and gives NaN or
Inf when eigenvalues coincide (identity-like covariance, duplicated or constant channels, m < g).
For ``zca`` the layer uses the Daleckii-Krein form of the derivative of the matrix function
``Sigma^{-1/2}``, equal to the paper's backward where the eigenvalues differ::

    dL/dSigma = D (K o (D^T sym(dL/dW) D)) D^T,
    K_ij = (l_i^{-1/2} - l_j^{-1/2}) / (l_i - l_j) = -1 / (s_i s_j (s_i + s_j)),  s = sqrt(l),

whose closed form has no difference of eigenvalues and is the exact limit (``f'(l_i)``) where they
coincide. For ``pca`` (a function of the eigenvectors themselves, discontinuous where eigenvalues
coincide) the ``1/(l_j - l_i)`` terms of the eigenvector derivative are set to zero where the gap is
below ``sqrt(machine eps) * l_max``. ``newton`` differentiates the matrix products (by hand, step by
step, in the training step; by autograd elsewhere).

The training step is one :class:`normlab.dispatch.FusedStep` (a hand-written backward), batched over
groups, that keeps the centred input Xc for the backward (for (N, C) input sample-major, ``Xc^T`` per
group with a column of ones appended; for maps, ``(g x L)`` per sample and group in the input's order,
or for small maps one ``(g x N L)`` matrix per group): the forward makes the mean, the centring, the
covariance GEMM and the whitening GEMM ``diag(gamma) W Xc + beta`` (affine included); the backward
the GEMM ``dL/dy Xc^T`` (which gives ``dL/dW`` and ``dL/dgamma``), the sum of ``dL/dy`` (on the ones
column for (N, C) input) and the input gradient ``(diag(gamma) W)^T (dL/dy - mean(dL/dy)) + (G_S +
G_S^T)/m Xc`` as two GEMMs accumulated in one buffer.

Distributed (``process_group`` set, see :func:`normlab.sync`): the count, per-channel sums and per-group
sums of ``x x^T`` travel in one differentiable :func:`normlab.comm.global_sum`, so the mean and the
covariance (``E[x x^T] - mu mu^T``) are those of the global batch; that path is composed of
differentiable ops and autograd gives the gradient of the whole batch.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchStats, Moments, NormBase
from .checks import UNSET, check_global_count, check_input, keyword_options
from .comm import global_sum
from .dispatch import FusedStep
from .kernels import (
    accumulation_dtype,
    buffer_dtype,
    ema,
    identity,
    in_format_of,
    memory_format_of,
    params_in,
    running_update,
    stat_dtype,
)

__all__ = [
    "DecorrelatedBatchNorm",
    "GroupedMoments",
    "decorrelated_batch_norm",
    "whitening_matrix",
    "group_layout",
    "group_covariance",
    "METHODS",
]

METHODS = ("zca", "pca", "newton")


_LEGACY_ORDER = (
    "group_size",
    "method",
    "eps",
    "momentum",
    "affine",
    "track_running_stats",
    "iterations",
    "device",
    "dtype",
)


def _legacy_order(args: tuple[Any, ...]) -> bool:
    # Before the options were keyword-only, group_size (an int) and method (a str) came second and third.
    first = args[0]
    return (isinstance(first, int) and not isinstance(first, bool)) or (len(args) > 1 and isinstance(args[1], str))


class DecorrelatedBatchNorm(NormBase):
    """Decorrelated Batch Normalization over inputs ``(N, C, *)`` (Huang et al. 2018); see the module docstring.

    Args:
        num_features: ``C``.
        eps: added to the covariance diagonal (must be > 0: a rank-deficient covariance has no inverse
            square root).
        momentum: rate of the running mean, variance and whitening matrix; ``None`` for a cumulative average.
        affine: learnable per-channel ``gamma``/``beta`` after the whitening.
        track_running_stats: keep running statistics and use them in eval.
        group_size: channels whitened together (the last group is smaller when ``C`` is not a multiple;
            ``group_size >= C`` whitens all channels together; 1 is batch normalization).
        method: ``"zca"`` (the paper's DBN), ``"pca"`` (for comparison only, see the module docstring) or
            ``"newton"`` (IterNorm's iterative whitening).
        iterations: Newton steps ``T`` for ``method="newton"``.

    ``group_size``, ``method`` and ``iterations`` are keyword-only (the earlier positional order,
    ``DecorrelatedBatchNorm(C, group_size, method, ...)``, still works with a ``DeprecationWarning``).

    Buffers: ``running_mean`` (C,) and ``running_var`` (C,) with BatchNorm's meaning, ``running_whitening``
    (G, g, g) (layout in the module docstring) and ``num_batches_tracked``. Eval uses ``running_mean``
    and ``running_whitening`` only; with ``group_size=1`` training is exactly BatchNorm, while eval
    averages ``1/sqrt(var_B + eps)`` (the paper's running whitening matrix) where BatchNorm averages
    ``var_B``. Converting a BatchNorm layer (``normlab.convert(model, "dbn")``) starts the running
    whitening matrix at ``diag(1/sqrt(running_var + eps))``, so the converted model's eval output is
    the original one until it trains.
    """

    _positive_eps_because = "whitening needs a positive definite covariance"

    @keyword_options(_LEGACY_ORDER, _legacy_order)
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
        group_size: int = 16,
        method: str = "zca",
        iterations: int = 5,
    ) -> None:
        name = type(self).__name__
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{name}: expected group_size to be a positive int, got {group_size!r}")
        _check_method(name, method, iterations)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.group_size = group_size
        self.method = method
        self.iterations = iterations
        self.num_groups, self.padded_group_size = group_layout(num_features, group_size)
        if track_running_stats:
            sdt = buffer_dtype(dtype)
            self.register_buffer("running_whitening", self._identity(device, sdt))
        else:
            self.register_buffer("running_whitening", None)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, group_size={self.group_size}, method={self.method!r}, "
            f"iterations={self.iterations}"
        )

    # ----------------------------------------------------------------------------- the paper's steps
    def normalize_running(self, x: Tensor) -> Tensor:
        """Eval (or frozen): ``y = diag(gamma) W_run (x - mu_run) + beta`` per group."""
        A, b = self._grouped_affine(torch.promote_types(stat_dtype(x), self.running_whitening.dtype))
        xv = _grouped(x.to(A.dtype), self.num_groups, self.padded_group_size)
        y = _apply(A, xv).add_(_expand(b, xv))
        return _like_input(_ungrouped(y, x.shape).to(x.dtype), x)

    def normalize_batch(self, x: Tensor, group: Any | None) -> tuple[Tensor, BatchStats]:
        m, g = x.numel() // x.size(1), self.padded_group_size
        if self.method == "newton" and group is None and m <= g and not self.__dict__.get("_warned_rank", False):
            self._warned_rank = True
            warnings.warn(
                f"DecorrelatedBatchNorm(method='newton'): {m} samples per channel for groups of {g} channels: "
                f"the covariance is rank-deficient (rank <= {m - 1}), most of its eigenvalues are eps, and "
                "Newton's iteration is not self-correcting there: its rounding errors grow with every step "
                f"(iterations={self.iterations}; float32 diverges within about 10). Use more samples per step, "
                "a smaller group_size, or method='zca' (warned once per layer)",
                RuntimeWarning,
                stacklevel=5,
            )
        y, mean, cov, W, count = _batch_step(
            x,
            self.weight,
            self.bias,
            self.num_groups,
            self.padded_group_size,
            self.eps,
            self.method,
            self.iterations,
            group,
        )
        return y, BatchStats(mean, cov, count, (W,))

    def guarded_statistics(self, stats: BatchStats) -> tuple[Any, ...]:
        """The whitening matrix alone: it is not finite wherever the covariance is not (``_eig`` gives
        such a group NaN eigenvalues; Newton's products carry NaN and Inf), and the covariance is not
        wherever the mean is not."""
        return stats.extra

    def update_running(self, stats: BatchStats) -> None:
        """The running mean, variance (the covariance diagonal) and whitening matrix move towards the batch's."""
        (W,) = stats.extra
        _move_running(
            self.running_mean,
            self.running_var,
            self.running_whitening,
            stats.mean,
            stats.var,
            W,
            stats.count,
            self.step_factor(),
        )

    # ----------------------------------------------------------------------------- state
    def _identity(self, device: torch.device | str | None, dtype: torch.dtype | None) -> Tensor:
        G, g = self.num_groups, self.padded_group_size
        return torch.eye(g, device=device, dtype=dtype).repeat(G, 1, 1)

    def _float32_buffers(self) -> tuple[str, ...]:
        return (*super()._float32_buffers(), "running_whitening")

    def reset_running_stats(self) -> None:
        """Reset as BatchNorm does, and the running whitening matrix to the identity."""
        super().reset_running_stats()
        buf = getattr(self, "running_whitening", None)
        if buf is not None:
            buf.copy_(self._identity(buf.device, buf.dtype))

    def _diagonal_whitening(self, running_var: Tensor) -> Tensor:
        """The running whitening matrix of a channel-wise layer: ``diag(1/sqrt(running_var + eps))``."""
        inv = torch.rsqrt(running_var.to(self.running_whitening.dtype) + self.eps)
        return torch.diag_embed(_pad_vector(inv, self.num_groups, self.padded_group_size, 1.0))

    def adopt(self, source: nn.Module, copied: list[str]) -> None:
        """From a channel-wise layer: a diagonal whitening matrix, so eval is what it was before."""
        if self.track_running_stats and "running_var" in copied and "running_whitening" not in copied:
            with torch.no_grad():
                self.running_whitening.copy_(self._diagonal_whitening(self.running_var))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: ANN001 - torch's signature
        key, var = prefix + "running_whitening", state_dict.get(prefix + "running_var")
        if (
            self.track_running_stats
            and key not in state_dict
            and isinstance(var, Tensor)
            and var.shape == (self.num_features,)
        ):
            # A BatchNorm checkpoint: its eval map, as a diagonal whitening matrix.
            state_dict[key] = self._diagonal_whitening(var.to(self.running_whitening.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _mask(self, like: Tensor) -> Tensor | None:
        return _pad_mask(self.num_features, self.num_groups, self.padded_group_size, like)

    def _grouped_affine(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Eval map per group: ``A = diag(gamma) W_run`` (G, g, g) and ``b = beta - A mu_run`` (G, g).

        Differentiable in ``gamma`` and ``beta``: a frozen layer (running statistics in training)
        still trains its affine."""
        return _running_affine(
            self.running_mean,
            self.running_whitening,
            self.weight,
            self.bias,
            self.num_groups,
            self.padded_group_size,
            dtype,
        )

    # ----------------------------------------------------------------------------- statistics interface
    @torch.no_grad()
    def moments(self, x: Tensor) -> Moments:
        """Batch mean (C,) and biased per-group covariance (G, g, g) (zero padding) of ``x``."""
        self.check_input(x)
        mean, cov, m = group_covariance(x, self.group_size)
        return GroupedMoments(m, mean, cov)

    @torch.no_grad()
    def load_statistics(self, mean: Tensor, var: Tensor) -> None:
        """Set the running statistics from a population mean (C,) and *unbiased* covariance (G, g, g).

        ``running_whitening`` becomes the whitening matrix of ``var + eps I`` by this layer's method:
        an eigendecomposition for zca/pca, ``iterations`` Newton steps for newton. ``running_var``
        becomes the covariance diagonal. Padding entries of ``var`` are ignored.
        """
        name = type(self).__name__
        if not self.track_running_stats:
            raise ValueError(f"{name}: has no running statistics (track_running_stats=False)")
        G, g, c = self.num_groups, self.padded_group_size, self.num_features
        if tuple(mean.shape) != (c,):
            raise ValueError(f"{name}: expected a mean of shape ({c},), got {tuple(mean.shape)}")
        if tuple(var.shape) != (G, g, g):
            raise ValueError(
                f"{name}: expected a per-group covariance of shape ({G}, {g}, {g}), got {tuple(var.shape)}"
            )
        cov = var.to(self.running_whitening.device, torch.float64 if var.dtype == torch.float64 else torch.float32)
        if not (bool(torch.isfinite(cov).all()) and bool(torch.isfinite(mean).all())):
            raise ValueError(f"{name}: expected a finite mean and covariance, got non-finite values")
        if not torch.allclose(cov, cov.mT, rtol=1e-4, atol=1e-6 * float(cov.abs().max().clamp_min(1))):
            raise ValueError(f"{name}: expected symmetric per-group covariances, got a non-symmetric one")
        mask = self._mask(cov)
        W = _whitening(_regularized(cov, self.eps, mask, self.method), self.method, self.iterations, mask, self.eps)
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"{name}: the covariance gives a non-finite whitening matrix (is it symmetric PSD?)")
        self.running_mean.copy_(mean)
        self.running_var.copy_(cov.diagonal(dim1=-2, dim2=-1).reshape(-1)[:c])
        self.running_whitening.copy_(_stored(W, mask))

    @torch.no_grad()
    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """``(A, b)`` with eval output ``y = A x + b`` along channels: ``A`` dense block-diagonal (C, C)."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__}: has no running statistics (track_running_stats=False)")
        # float32 at least, as the channel-wise layers return it; float64 for float64 layers.
        A, b = self._grouped_affine(torch.promote_types(self.running_whitening.dtype, torch.float32))
        G, g, c = self.num_groups, self.padded_group_size, self.num_features
        dense = A.new_zeros(G, g, G, g)
        idx = torch.arange(G, device=A.device)
        dense[idx, :, idx, :] = A
        return dense.reshape(G * g, G * g)[:c, :c].contiguous(), b.reshape(-1)[:c].contiguous()


class GroupedMoments(Moments):
    """:class:`~normlab.base.Moments` whose ``var`` is per-group covariances ``(G, g, g)`` (zero padding).

    The groups cover consecutive channels; the last may be padded at its end (a group smaller than
    the others), the padding being zero.
    """

    __slots__ = ()

    def _blocks(self, delta: Tensor) -> Tensor:
        """``delta`` laid out as the rows of the covariance blocks, ``(G, g)`` (zero padding)."""
        var = self.var
        g, c = var.shape[-1], delta.numel()
        slots = var.numel() // g
        if var.dim() < 2 or var.shape[-1] != var.shape[-2] or not c <= slots < c + g:
            raise ValueError(
                f"exact pooling: expected square covariance blocks (..., g, g) covering the {c} mean entries, "
                f"got shape {tuple(var.shape)}"
            )
        flat = delta.reshape(-1)
        if slots > c:
            flat = torch.cat([flat, flat.new_zeros(slots - c)])
        return flat.reshape(var.shape[:-1])

    def outer(self, delta: Tensor) -> Tensor:
        """``delta delta^T`` per covariance block."""
        d = self._blocks(delta)
        return d.unsqueeze(-1) * d.unsqueeze(-2)

    def marginal_var(self) -> Tensor:
        """The per-channel variances: the blocks' diagonals, without the padding."""
        self._blocks(self.mean)  # validates the layout
        return torch.diagonal(self.var, dim1=-2, dim2=-1).reshape(-1)[: self.mean.numel()]


# ------------------------------------------------------------------------------------ functional core
def decorrelated_batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = UNSET,
    momentum: float | Tensor | None = UNSET,
    eps: float = UNSET,
    *,
    running_whitening: Tensor | None = None,
    group_size: int = 16,
    method: str = "zca",
    iterations: int = 5,
    process_group: Any | None = None,
    group: Any | None = None,
) -> Tensor:
    """Decorrelated batch normalization of ``x`` ``(N, C, *)``, in ``F.batch_norm``'s shape.

    ``training=False``: ``y = diag(gamma) W_run (x - running_mean) + beta`` per group, with
    ``running_whitening`` (G, g, g) (required; ``running_var`` is unused). ``training=True``: the
    paper's training step on the batch (global over ``process_group``); with ``momentum`` (default
    0.1) the running buffers that are given move towards the batch's mean, unbiased variance (the
    covariance diagonal) and whitening matrix in place; ``momentum=None`` leaves them as they are.

    Deprecated: the earlier form ``decorrelated_batch_norm(x, weight, bias, group_size, method, eps,
    iterations, group)``, which always trained and returned ``(y, mean, cov, W, m)``, is still
    accepted (any call without a bool ``training``) with a ``DeprecationWarning``.
    """
    if training is UNSET or not isinstance(training, bool):
        # The earlier positional order: (x, weight, bias, group_size, method, eps, iterations, group).
        warnings.warn(
            "decorrelated_batch_norm(x, weight, bias, group_size, method, ...) is deprecated; the arguments "
            "now follow F.batch_norm: (x, running_mean, running_var, weight, bias, training, momentum, eps, *, "
            "running_whitening, group_size, method, iterations, process_group)",
            DeprecationWarning,
            stacklevel=2,
        )
        group_size = group_size if weight is None else weight
        method = method if bias is None else bias
        old_eps = 1e-5 if eps is UNSET or not isinstance(eps, (int, float)) else eps
        old_eps = old_eps if training is UNSET else training
        iterations = iterations if momentum is UNSET else momentum
        if eps is not UNSET and not isinstance(eps, (int, float)):
            group = eps
        _check_method("decorrelated_batch_norm", method, iterations)
        G, g = group_layout(x.size(1), group_size)
        y, mean, cov, W, m = _batch_step(x, running_mean, running_var, G, g, old_eps, method, iterations, group)
        return y, mean, cov, W, torch.as_tensor(m, dtype=cov.dtype, device=cov.device)
    momentum = 0.1 if momentum is UNSET else momentum
    eps = 1e-5 if eps is UNSET else eps
    _check_method("decorrelated_batch_norm", method, iterations)
    G, g = group_layout(x.size(1), group_size)
    if not training:
        if running_mean is None or running_whitening is None:
            raise ValueError("decorrelated_batch_norm: expected running_mean and running_whitening when training=False")
        A, b = _running_affine(running_mean, running_whitening, weight, bias, G, g, running_whitening.dtype)
        xv = _grouped(x.to(A.dtype), G, g)
        return _like_input(_ungrouped(_apply(A, xv).add_(_expand(b, xv)), x.shape).to(x.dtype), x)
    check_input("decorrelated_batch_norm", x, x.size(1), process_group is None)
    y, mean, cov, W, count = _batch_step(x, weight, bias, G, g, eps, method, iterations, process_group)
    if momentum is not None and running_mean is not None:
        _move_running(running_mean, running_var, running_whitening, mean, cov, W, count, momentum)
    return y


def whitening_matrix(cov: Tensor, method: str = "zca", eps: float = 1e-5, iterations: int = 5) -> Tensor:
    """The whitening matrix of each covariance in ``cov`` (..., k, k), differentiable.

    ``zca``: ``(cov + eps I)^{-1/2}``; ``pca``: ``Lambda^{-1/2} D^T``; ``newton``: ``iterations`` steps of
    the IterNorm iteration. See the module docstring for the formulas and the backward.
    """
    _check_method("whitening_matrix", method, iterations)
    if cov.dim() < 2 or cov.size(-1) != cov.size(-2):
        raise ValueError(f"whitening_matrix: expected square matrices (..., k, k), got shape {tuple(cov.shape)}")
    k = cov.size(-1)
    flat = cov.reshape(-1, k, k)
    sigma = flat + eps * torch.eye(k, dtype=cov.dtype, device=cov.device)
    return _whitening(sigma, method, iterations, None, eps).reshape(cov.shape)


@torch.no_grad()
def group_covariance(x: Tensor, group_size: int) -> tuple[Tensor, Tensor, int]:
    """``(mean (C,), biased per-group covariance (G, g, g), m)`` of ``x`` (N, C, *), zero padded."""
    c = x.size(1)
    G, g = group_layout(c, group_size)
    xv = _grouped(x.to(stat_dtype(x)), G, g)
    m = xv.numel() // (G * g)
    mean = xv.mean(_sample_dims(xv))
    xc = xv - _expand(mean, xv)
    return mean.reshape(-1)[:c], _gram(xc, xc) / m, m


def group_layout(num_features: int, group_size: int) -> tuple[int, int]:
    """``(G, g)``: the number of groups and the (padded) group size for ``num_features`` channels."""
    g = min(group_size, num_features)
    return -(-num_features // g), g


# ------------------------------------------------------------------------------------ the training step
def _batch_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    G: int,
    g: int,
    eps: float,
    method: str,
    iterations: int,
    group: Any | None,
    composed: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | float]:
    """``(y, mean (C,), cov (G, g, g), W (G, g, g), m)`` of one training step (no running update).

    ``m`` is the sample count per channel: a number from the fused step, a tensor from the composed
    one (the global count over a group).

    ``cov`` is the biased per-group covariance without ``eps`` and ``W`` the batch whitening matrices
    (padding as computed, not as stored). Locally the fused step below; over a process group (or
    with ``composed``) the same maths composed of differentiable ops on the statistics summed over
    the group, so that autograd gives the gradient of the whole batch.
    """
    if group is None and not composed:
        y, mean, cov, W = _STEP(x, weight, bias, G, g, eps, method, iterations)[:4]
        return y, mean, cov, W, float(x.numel() // x.size(1))
    c = x.size(1)
    sdt = stat_dtype(x)
    xv = _grouped(x.to(sdt), G, g)
    # Raw sums of x x^T lose the covariance to cancellation in float32: accumulate in float64.
    xa = xv.to(accumulation_dtype(sdt, x.device))
    dims = _sample_dims(xa)
    count = torch.full((1,), float(xa.numel() // (G * g)), dtype=xa.dtype, device=xa.device)
    s, ss, count = global_sum([xa.sum(dims), _gram(xa, xa), count], group)
    count = count.reshape(())
    check_global_count(count, "DecorrelatedBatchNorm", x)
    mean = s / count
    cov = (ss / count - mean.unsqueeze(-1) * mean.unsqueeze(-2)).to(sdt)
    mean, count = mean.to(sdt), count.to(sdt)
    mask = _pad_mask(c, G, g, cov)
    W = _whitening(_regularized(cov, eps, mask, method), method, iterations, mask, eps)
    A = W if weight is None else _pad_vector(weight.to(W.dtype), G, g, 1.0).unsqueeze(-1) * W
    y = _apply(A, xv - _expand(mean, xv))
    if bias is not None:
        y = y + _expand(_pad_vector(bias.to(W.dtype), G, g, 0.0), y)
    y = _like_input(_ungrouped(y, x.shape).to(x.dtype), x)
    return y, mean.detach().reshape(-1)[:c], cov.detach(), W.detach(), count


@torch.no_grad()
def _move_running(
    running_mean: Tensor,
    running_var: Tensor | None,
    running_whitening: Tensor | None,
    mean: Tensor,
    cov: Tensor,
    W: Tensor,
    count: Tensor | float,
    factor: Tensor | float,
) -> None:
    """The running mean and unbiased variance (the covariance diagonal) as BatchNorm moves them, and the
    running whitening matrix (the paper's) towards ``W`` with its padding stored as the identity."""
    c = running_mean.numel()
    running_update(running_mean, running_var, mean, cov.diagonal(dim1=-2, dim2=-1).reshape(-1)[:c], count, factor)
    if running_whitening is not None:
        G, g = W.shape[:2]
        ema(running_whitening, _stored(W, _pad_mask(c, G, g, W)), factor)


def _running_affine(
    running_mean: Tensor,
    running_whitening: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    G: int,
    g: int,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The eval map per group: ``A = diag(gamma) W_run`` (G, g, g) and ``b = beta - A mu_run`` (G, g)."""
    W = running_whitening.to(dtype)
    A = W if weight is None else _pad_vector(weight.to(dtype), G, g, 1.0).unsqueeze(-1) * W
    mu = _pad_vector(running_mean.to(dtype), G, g, 0.0)
    b = -(A @ mu.unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        b = b + _pad_vector(bias.to(dtype), G, g, 0.0)
    return A, b


def _step_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    G: int,
    g: int,
    eps: float,
    method: str,
    iterations: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, cov, W, xa, mats, vec)`` of the local step: ``xa`` (the centred input in the layouts
    described above :func:`_by_groups`), ``mats`` and ``vec`` (the eigenvectors ``(1, G, g,
    g)`` and ``sqrt(lambda)``, or the Newton iterates and the traces) are what the backward reads."""
    c = x.size(1)
    xv = _grouped(x.to(stat_dtype(x)), G, g)
    m = xv.numel() // (G * g)
    mean = xv.mean(_sample_dims(xv))
    by_groups = _by_groups(x)
    xa = _centred(xv, mean, by_groups)
    cov = _scatter(xa, g, by_groups).div_(m)
    mask = _pad_mask(c, G, g, cov)
    sigma = _regularized(cov, eps, mask, method)
    if method == "newton":
        W, (mats, vec) = _newton_forward(sigma, iterations, mask)
    else:
        vec, D = _eig(sigma, eps)
        W = _zca_forward(D, vec) if method == "zca" else _pca_forward(D, vec)
        mats = D.unsqueeze(0).contiguous()  # (eigh returns column-major eigenvectors)
    A = W if weight is None else _pad_vector(weight.to(W.dtype), G, g, 1.0).unsqueeze(-1) * W
    beta = W.new_zeros(G, g) if bias is None else _pad_vector(bias.to(W.dtype), G, g, 0.0)
    if xa.dim() == 4 and G * g == c and x.dtype == W.dtype:
        # The GEMM writes straight into an output of the input's shape (no copy, and not a view);
        # group-major, its result is copied there in one copy.
        y = x.new_empty(x.shape)
        if by_groups:
            y.view(xa.size(2), G, g, xa.size(3)).copy_(_affine(A, beta, xa, by_groups=True))
        else:
            _affine(A, beta, xa, out=y.view(xa.size(0) * G, g, xa.size(3)))
    else:
        y = _fresh(_ungrouped(_affine(A, beta, xa, by_groups=by_groups), x.shape).to(x.dtype))
    return _like_input(y, x), mean.reshape(-1)[:c].clone(), cov, W, xa, mats, vec


def _step_fake(x, weight, bias, G, g, eps, method, iterations):  # noqa: ANN001, ANN202
    n, sdt = x.size(0), stat_dtype(x)
    if x.dim() == 2:
        xa = x.new_empty((n, G, g + 1), dtype=sdt)
    else:
        L = math.prod(x.shape[2:])
        xa = x.new_empty((G, g, n, L) if _by_groups(x) else (n, G, g, L), dtype=sdt)
    k = 3 * (iterations - 1) + 2 if method == "newton" else 1
    mat = x.new_empty((G, g, g), dtype=sdt)
    vec = x.new_empty((G, 1, 1) if method == "newton" else (G, g), dtype=sdt)
    y = torch.empty_like(x, memory_format=memory_format_of(x))
    return y, x.new_empty(x.size(1), dtype=sdt), mat, mat.clone(), xa, x.new_empty((k, G, g, g), dtype=sdt), vec


def _step_setup(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, rest: tuple, outputs) -> None:  # noqa: ANN001
    _, _, cov, W, xa, mats, vec = outputs
    G, g, eps, method, iterations = rest
    (weight,) = params_in(W.dtype, weight)  # no op that returns its input (a same-dtype .to) in a setup
    gamma = None if weight is None else _pad_vector(weight, G, g, 1.0)
    ctx.save_for_backward(xa, W, gamma, mats, vec)
    m = x.numel() // x.size(1)
    mask = _pad_mask(x.size(1), G, g, cov)
    ctx.setup = (x.shape, x.dtype, m, mask, method, _dtype(weight), _dtype(bias), _by_groups(x))
    ctx.memory_format = memory_format_of(x)


def _step_backward(ctx, gy: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN001
    xa, W, gamma, mats, vec = ctx.saved_tensors
    shape, dtype, m, mask, method, w_dtype, b_dtype, by_groups = ctx.setup
    G, g = W.shape[:2]
    c = shape[1]
    gv = _grouped(gy.to(W.dtype), G, g)
    if by_groups:  # laid out as xa: (G, g, N, L)
        gv = gv.permute(1, 2, 0, 3).contiguous()
    P, gsum = _grad_products(gv, xa, by_groups)
    g_weight = (P * W).sum(-1).reshape(-1)[:c].to(w_dtype) if ctx.needs_input_grad[1] else None
    g_bias = gsum.reshape(-1)[:c].to(b_dtype) if ctx.needs_input_grad[2] else None
    if not ctx.needs_input_grad[0]:
        return None, g_weight, g_bias
    A = W if gamma is None else gamma.unsqueeze(-1) * W
    gW = P if gamma is None else gamma.unsqueeze(-1) * P
    # d/dXc of W Xc and of Xc Xc^T / m, which is (dL/dSigma + dL/dSigma^T) / m Xc: 2/m dL/dSigma for
    # zca and pca, whose dL/dSigma is symmetric already (zca's backward takes the factor).
    if method == "newton":
        g_sigma = _newton_backward((mats, vec), gW, mask)
    elif method == "zca":
        g_sigma = _zca_backward(mats[0], vec, gW, 2 / m)
    else:
        g_sigma = _pca_backward(mats[0], vec, gW).mul_(2 / m)
    if mask is not None:
        g_sigma = g_sigma * (mask.unsqueeze(-1) * mask.unsqueeze(-2))
    # The mean's backward subtracts the mean gradient, which is A^T mean(dL/dy) because Xc sums to
    # zero: one GEMM over Xc (with that shift), one over dL/dy.
    shift = torch.bmm(A.mT, gsum.unsqueeze(-1)).mul_(-1 / m)
    g_xc = g_sigma if method != "newton" else (g_sigma + g_sigma.mT).div_(m)
    gx = _input_grad(g_xc, shift.squeeze(-1), A.mT, gv, xa, by_groups)
    gx = _ungrouped(gx, shape).to(dtype)
    if ctx.memory_format is not torch.contiguous_format:  # as the input is laid out
        gx = in_format_of(gx, ctx.memory_format)
    return gx, g_weight, g_bias


_SECOND_ORDER = (
    "For a gradient penalty (WGAN-GP), normalize the critic with a layer that does not mix the batch (the "
    "WGAN-GP paper uses layer normalization), or with torch's BatchNorm."
)
_STEP = FusedStep(
    "normlab::decorrelated_train",
    _step_forward,
    _step_setup,
    _step_backward,
    _step_fake,
    layer="DecorrelatedBatchNorm",
    refusal=_SECOND_ORDER,
)


def _dtype(t: Tensor | None) -> torch.dtype | None:
    return None if t is None else t.dtype


def _like_input(y: Tensor, x: Tensor) -> Tensor:
    """``y`` in ``x``'s memory format (channels_last stays channels_last, as with torch's layers)."""
    fmt = memory_format_of(x)
    return y if fmt is torch.contiguous_format else in_format_of(y, fmt)


def _fresh(y: Tensor) -> Tensor:
    """``y`` as a tensor of its own: a step's output must not be a view (in-place ops on it would fail).

    Judged by ``_base`` and by its storage (tracing modes do not always set ``_base``): not a view,
    contiguous, and the whole of its storage."""
    size = y.numel() * y.element_size()
    owns = y._base is None and y.is_contiguous() and y.storage_offset() == 0 and y.untyped_storage().nbytes() == size
    return y if owns else y.clone(memory_format=torch.contiguous_format)


def _check_method(name: str, method: str, iterations: int) -> None:
    if method not in METHODS:
        raise ValueError(f"{name}: expected method in {METHODS}, got {method!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{name}: expected iterations to be a positive int, got {iterations!r}")


# ------------------------------------------------------------------------------------ whitening matrices
def _eig(sigma: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    # A group with NaN or Inf in its covariance (a non-finite batch) gets NaN eigenvalues, so that its
    # output is NaN as BatchNorm's would be; eigh itself would fail to converge on it. Eagerly, one
    # sum read on the host tells whether any group is so (eigh synchronizes with the host anyway);
    # traced, a data-dependent branch would break the graph, so every group goes through the masks.
    if not torch.compiler.is_compiling() and math.isfinite(sigma.sum().item()):
        lam, D = torch.linalg.eigh(sigma)
        # Sigma >= eps I in exact arithmetic: the floor only removes rounding below it.
        return lam.clamp_min_(floor).sqrt_(), D
    bad = torch.isnan((sigma * 0).sum((-2, -1)))  # NaN or Inf anywhere in the group
    eye = identity(sigma.size(-1), sigma.device, sigma.dtype)
    lam, D = torch.linalg.eigh(torch.where(bad[..., None, None], eye, sigma))
    s = lam.clamp_min(floor).sqrt()
    return torch.where(bad[..., None], torch.nan, s), D


# The zca products of (G, g, g) batches are bmm, not matmul (@), whose batched path adds a handful of
# shape ops per product: at g = 16 the dispatch is most of their cost.
def _zca_forward(D: Tensor, s: Tensor) -> Tensor:
    return torch.bmm(D / s.unsqueeze(-2), D.mT)


def _zca_backward(D: Tensor, s: Tensor, gW: Tensor, scale: float = 1.0) -> Tensor:
    """``scale`` dL/dSigma (the module docstring's form), from dL/dW."""
    M = torch.bmm(torch.bmm(D.mT, gW + gW.mT), D)
    si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
    # M o K with K = -1 / (s_i s_j (s_i + s_j)), the 1/2 of sym() and the scale folded in.
    M = M.div_((si * sj).mul_(si + sj).mul_(-2 / scale))
    return torch.bmm(torch.bmm(D, M), D.mT)


def _pca_forward(D: Tensor, s: Tensor) -> Tensor:
    return D.mT / s.unsqueeze(-1)


def _pca_backward(D: Tensor, s: Tensor, gW: Tensor) -> Tensor:
    # W = S D^T with S = diag(lambda^{-1/2}): dL/dD = gW^T S, dL/dlambda_i = -1/2 lambda_i^{-3/2} (gW D)_ii.
    lam = s * s
    g_lam = -0.5 * (gW * D.mT).sum(-1) / (lam * s)
    g_D = gW.mT / s.unsqueeze(-2)
    gap = lam.unsqueeze(-2) - lam.unsqueeze(-1)  # gap_ij = lambda_j - lambda_i
    tol = math.sqrt(torch.finfo(lam.dtype).eps) * lam.amax(-1, keepdim=True).unsqueeze(-1)
    Fm = torch.where(gap.abs() > tol, 1.0 / torch.where(gap == 0, torch.ones_like(gap), gap), torch.zeros_like(gap))
    inner = torch.diag_embed(g_lam) + Fm * (D.mT @ g_D)
    gS = D @ inner @ D.mT
    return (gS + gS.mT) * 0.5


def _newton(sigma: Tensor, iterations: int, mask: Tensor | None) -> Tensor:
    """IterNorm's ``W`` for ``sigma`` (B, g, g), differentiable by autograd (the synchronized path)."""
    diag = sigma.diagonal(dim1=-2, dim2=-1)
    trace = (diag if mask is None else diag * mask).sum(-1).reshape(-1, 1, 1)
    sigma_n = sigma / trace
    P = torch.eye(sigma.size(-1), dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    for _ in range(iterations):
        P = torch.baddbmm(P, P @ P @ P, sigma_n, beta=1.5, alpha=-0.5)
    return P / trace.sqrt()


def _newton_forward(sigma: Tensor, iterations: int, mask: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """:func:`_newton` without autograd, keeping what :func:`_newton_backward` needs.

    ``saved`` is ``(mats, trace)``: ``mats`` (3 (T - 1) + 2, B, g, g) holds each step's ``P``, ``P P``
    and ``(P P) P``, then ``P_T`` and ``Sigma_N``, written in place as the iteration runs.
    """
    diag = sigma.diagonal(dim1=-2, dim2=-1)
    trace = (diag if mask is None else diag * mask).sum(-1).reshape(-1, 1, 1)
    mats = sigma.new_empty((3 * (iterations - 1) + 2, *sigma.shape))
    sigma_n = torch.div(sigma, trace, out=mats[-1])
    # The first step from P_0 = I is 1.5 I - 0.5 Sigma_N: no products.
    first = torch.diag_embed(torch.full(sigma.shape[:-1], 1.5, dtype=sigma.dtype, device=sigma.device))
    P = torch.sub(first, sigma_n, alpha=0.5, out=mats[0] if iterations > 1 else mats[-2])
    for k in range(iterations - 1):
        PP = torch.bmm(P, P, out=mats[3 * k + 1])
        Q = torch.bmm(PP, P, out=mats[3 * k + 2])
        P = torch.baddbmm(P, Q, sigma_n, beta=1.5, alpha=-0.5, out=mats[3 * k + 3] if k < iterations - 2 else mats[-2])
    return P / trace.sqrt(), (mats, trace)


def _newton_backward(saved: tuple[Tensor, ...], gW: Tensor, mask: Tensor | None) -> Tensor:
    """dL/dSigma of :func:`_newton` from dL/dW: the iteration differentiated by hand, step by step.

    For ``P' = 1.5 P - 0.5 Q S`` with ``Q = (P P) P`` and ``G = dL/dP'``: ``dL/dS += -0.5 Q^T G``,
    ``dL/dQ = -0.5 G S^T``, ``dL/d(PP) = dL/dQ P^T`` and ``dL/dP = 1.5 G + (PP)^T dL/dQ + dL/d(PP) P^T
    + P^T dL/d(PP)``: six small GEMMs per step, the same products autograd forms, without its graph.
    """
    mats, trace = saved
    *steps, P_T, sigma_n = mats.unbind(0)
    root = trace.sqrt()
    G = gW / root
    g_trace = -0.5 * (gW * P_T).sum((-2, -1), keepdim=True) / (trace * root)
    g_sn = torch.zeros_like(sigma_n)
    for k in range(len(steps) // 3 - 1, -1, -1):
        P, PP, Q = steps[3 * k : 3 * k + 3]
        g_sn.baddbmm_(Q.mT, G, alpha=-0.5)
        gQ = torch.bmm(G, sigma_n.mT).mul_(-0.5)
        gPP = torch.bmm(gQ, P.mT)
        G = torch.baddbmm(G, PP.mT, gQ, beta=1.5)
        G.baddbmm_(gPP, P.mT).baddbmm_(P.mT, gPP)
    g_sn.sub_(G, alpha=0.5)  # the first step, P_1 = 1.5 I - 0.5 Sigma_N
    # sigma_n = Sigma / tr(Sigma) with the trace over the real channels.
    g_trace = g_trace - (g_sn * sigma_n).sum((-2, -1), keepdim=True) / trace
    ones = torch.ones(sigma_n.shape[:-1], dtype=sigma_n.dtype, device=sigma_n.device) if mask is None else mask
    return g_sn / trace + g_trace * torch.diag_embed(ones)


class _EigenWhitening(torch.autograd.Function):
    """``Sigma -> W`` for zca/pca with the stable backward of the module docstring (batched)."""

    @staticmethod
    def forward(ctx, sigma, method, floor):  # noqa: ANN001, ANN205
        s, D = _eig(sigma, floor)
        ctx.save_for_backward(D, s)
        ctx.method = method
        return _zca_forward(D, s) if method == "zca" else _pca_forward(D, s)

    @staticmethod
    def backward(ctx, gW):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():  # create_graph: D and s were computed without a graph
            raise RuntimeError(
                f"DecorrelatedBatchNorm / whitening_matrix ({ctx.method}): second derivatives (create_graph=True) "
                f"are not supported through the eigendecomposition. {_SECOND_ORDER}"
            )
        D, s = ctx.saved_tensors
        back = _zca_backward if ctx.method == "zca" else _pca_backward
        return back(D, s, gW), None, None


def _whitening(sigma: Tensor, method: str, iterations: int, mask: Tensor | None, floor: float) -> Tensor:
    """Differentiable whitening matrices of the regularized, padded covariances ``sigma`` (G, g, g)."""
    if method == "newton":
        return _newton(sigma, iterations, mask)
    return _EigenWhitening.apply(sigma, method, floor)


# ------------------------------------------------------------------------------------ group layout
def _grouped(x: Tensor, G: int, g: int) -> Tensor:
    """``x`` (N, C, *) as ``(N, G, g)`` (2-D input) or ``(N, G, g, L)``, zero channels appended to G*g."""
    n, c = x.shape[:2]
    pad = G * g - c
    if x.dim() == 2:
        v = F.pad(x, (0, pad)) if pad else x
        return v.reshape(n, G, g)
    v = x.reshape(n, c, math.prod(x.shape[2:]))  # explicit sizes: a process may hold no samples
    if pad:
        v = F.pad(v, (0, 0, 0, pad))
    return v.reshape(n, G, g, v.size(-1))


def _ungrouped(v: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_grouped`: ``(N, G, g[, L])`` back to ``shape`` (padding dropped)."""
    n, c = shape[0], shape[1]
    v = v.reshape(n, v.size(1) * v.size(2)) if v.dim() == 3 else v.reshape(n, v.size(1) * v.size(2), v.size(-1))
    if v.size(1) != c:
        v = v[:, :c]
    return v.reshape(shape)


def _sample_dims(v: Tensor) -> tuple[int, ...]:
    return (0,) if v.dim() == 3 else (0, 3)


def _expand(t: Tensor, v: Tensor) -> Tensor:
    """A per-group vector ``(G, g)`` shaped to broadcast against the grouped layout ``v``."""
    return t if v.dim() == 3 else t.unsqueeze(-1)


def _gram(a: Tensor, b: Tensor) -> Tensor:
    """Per group, the sum over samples of ``a b^T``: ``(G, g, g)``."""
    if a.dim() == 3:
        return torch.einsum("ngi,ngj->gij", a, b)
    # Batched over (sample, group) with the spatial axis as the inner dimension, then summed over N:
    # no permuted copy of the data.
    return torch.matmul(a, b.transpose(-1, -2)).sum(0)


def _apply(M: Tensor, v: Tensor) -> Tensor:
    """Per group, ``M_k @ v_k`` for ``M`` (G, g, g) and the grouped layout ``v``; same layout out."""
    if v.dim() == 3:
        return torch.einsum("gij,ngj->ngi", M, v)
    return torch.matmul(M, v)


# The training step keeps the centred input Xc in a buffer laid out for the step's GEMMs:
# - 2-D input: sample-major, (N, G, g + 1), each group a row-major (samples x g) matrix Xc^T with a
#   column of ones appended, which folds the per-channel constants into the GEMMs: [A | b] [Xc; 1] is
#   the whitening with its bias, and dL/dy [Xc^T, 1] gives dL/dy Xc^T and the sum of dL/dy in one
#   product.
# - Spatial input: (N, G, g, L), contiguous, in the order of an (N, C, L) input (which fills it by a
#   plain subtraction; a channels_last one by a transposing one), one row-major (g x L) matrix per
#   sample and group; the products are batched over samples and groups and read dL/dy in place. (A
#   sample-major (N, G, L, g) buffer, once faster, costs an element-wise transpose to fill; with
#   torch 2.13 on CPU the products on this layout are as fast, and centring, products and copies
#   together take 0.8-0.9x the time at 8x8 to 32x32.) No ones row here: the separate sum and the bias
#   term of baddbmm cost less than filling it.
# - Spatial input with small maps (at most _GROUP_MAJOR_EXTENT values per sample and channel, see
#   _by_groups): group-major and channel-major, (G, g, N, L), one row-major (g x N L) matrix per
#   group. Per-sample batches of (L x g) blocks are then too small for BLAS, and their per-sample
#   copies of the whitening matrix and per-sample products outweigh the data. The price is a copy of
#   the output, and of dL/dy and the input gradient in the backward, between (N, C, L) and (C, N, L):
#   rows of L contiguous values moved whole, 2-4x faster on CPU than the element-wise transposes of a
#   (G, N, L, g) layout.
_GROUP_MAJOR_EXTENT = 16


def _by_groups(x: Tensor) -> bool:
    """Whether the step keeps spatial input ``x`` group-major, ``(G, g, N, L)`` (small maps)."""
    return x.dim() > 2 and math.prod(x.shape[2:]) <= _GROUP_MAJOR_EXTENT


def _centred(xv: Tensor, mean: Tensor, by_groups: bool = False) -> Tensor:
    """The step's buffer (layouts above) of the grouped input ``xv`` (N, G, g[, L]) minus its ``mean`` (G, g)."""
    n, G, g = xv.shape[:3]
    if by_groups:
        xa = xv.new_empty((G, g, n, xv.size(3)))
        torch.sub(xv, mean.unsqueeze(-1), out=xa.permute(2, 0, 1, 3))
        return xa
    if xv.dim() == 3:
        xa = xv.new_empty((n, G, g + 1))
        xa[..., g].fill_(1.0)  # a fill, not an indexed assignment: the strided copy of a scalar is slow
        torch.sub(xv, mean, out=xa[..., :g])
        return xa
    # A contiguous buffer whatever the input's strides (a channels_last input's grouped view is not).
    xa = xv.new_empty(xv.shape)
    return torch.sub(xv, mean.unsqueeze(-1), out=xa)


def _per_sample(M: Tensor, n: int) -> Tensor:
    """``M`` (G, ...) repeated for each of ``n`` samples, as a batch (n * G, ...)."""
    return M.expand(n, *M.shape).reshape(n * M.size(0), *M.shape[1:])


def _scatter(xa: Tensor, g: int, by_groups: bool = False) -> Tensor:
    """Per group, ``sum Xc Xc^T`` over the samples: (G, g, g)."""
    if by_groups:
        rows = xa.flatten(2)
        return torch.bmm(rows, rows.mT)
    if xa.dim() == 3:
        rows = xa.transpose(0, 1)[..., :g]
        return torch.bmm(rows.mT, rows)
    flat = xa.flatten(0, 1)
    return torch.bmm(flat, flat.mT).reshape(*xa.shape[:2], g, g).sum(0)


def _affine(
    M: Tensor, b: Tensor, xa: Tensor, out: Tensor | None = None, flat: bool = False, by_groups: bool = False
) -> Tensor:
    """Per group, ``M_k Xc + b_k`` for ``M`` (G, g, g) and ``b`` (G, g), in the grouped layout (N, G, g[, L]).

    For 2-D input the GEMM is group-major and the result a transposed view of it (a GEMM writing each
    group's block into the (N, C) result in place is several times slower than one contiguous GEMM and
    a transposing copy); so for group-major spatial input, where ``flat`` returns the GEMM's
    ``(G, g, N L)`` result itself. For other spatial input the GEMM writes into ``out`` (N * G, g, L)
    when given, and ``flat`` returns it in that shape."""
    if by_groups:
        rows = torch.baddbmm(b.unsqueeze(-1), M, xa.flatten(2))
        return rows if flat else rows.view(xa.shape).permute(2, 0, 1, 3)
    if xa.dim() == 3:
        return torch.bmm(xa.transpose(0, 1), torch.cat([M, b.unsqueeze(-1)], -1).mT).transpose(0, 1)
    n = xa.size(0)
    args = (_per_sample(b.unsqueeze(-1), n), _per_sample(M, n), xa.flatten(0, 1))
    out = torch.baddbmm(*args) if out is None else torch.baddbmm(*args, out=out)
    # reshape, not unflatten: batched gradients (is_grads_batched, vmap) have a rule for it
    return out if flat else out.reshape(*xa.shape[:2], *out.shape[1:])


def _grad_products(gv: Tensor, xa: Tensor, by_groups: bool = False) -> tuple[Tensor, Tensor]:
    """Per group, ``sum dL/dy Xc^T`` (G, g, g) and ``sum dL/dy`` (G, g), for ``gv`` in the grouped layout
    (group-major: laid out as ``xa``)."""
    if by_groups:
        rows = gv.reshape(*gv.shape[:2], -1)  # (reshape: batched gradients have a rule for it)
        return torch.bmm(rows, xa.flatten(2).mT), rows.sum(-1)
    n, G, g = gv.shape[:3]
    if gv.dim() == 3:
        Pa = torch.bmm(gv.transpose(0, 1).mT, xa.transpose(0, 1))
        return Pa[..., :g], Pa[..., g]
    P = torch.bmm(gv.reshape(n * G, g, -1), xa.flatten(0, 1).mT).reshape(n, G, g, g).sum(0)
    return P, gv.sum((0, 3))


def _input_grad(M: Tensor, b: Tensor, At: Tensor, gv: Tensor, xa: Tensor, by_groups: bool = False) -> Tensor:
    """Per group, ``M_k Xc + b_k + At_k dL/dy`` in the grouped layout (N, G, g[, L])."""
    # Accumulated into the contiguous GEMM result of _affine.
    if by_groups:
        rows = _affine(M, b, xa, flat=True, by_groups=True).baddbmm_(At, gv.reshape(*gv.shape[:2], -1))
        return rows.view(xa.shape).permute(2, 0, 1, 3)
    if gv.dim() == 3:
        out = _affine(M, b, xa)
        out.transpose(0, 1).baddbmm_(gv.transpose(0, 1), At.mT)
        return out
    n, G = xa.shape[:2]
    out = _affine(M, b, xa, flat=True).baddbmm_(_per_sample(At, n), gv.reshape(n * G, *gv.shape[2:]))
    return out.reshape(n, G, *out.shape[1:])


def _pad_mask(num_features: int, G: int, g: int, like: Tensor) -> Tensor | None:
    """``(G, g)`` with 1 for real channels and 0 for padding, or ``None`` without padding."""
    if G * g == num_features:
        return None
    mask = torch.zeros(G * g, dtype=like.dtype, device=like.device)
    mask[:num_features] = 1
    return mask.view(G, g)


def _pad_vector(t: Tensor, G: int, g: int, value: float) -> Tensor:
    pad = G * g - t.numel()
    return (F.pad(t, (0, pad), value=value) if pad else t).view(G, g)


def _regularized(cov: Tensor, eps: float, mask: Tensor | None, method: str) -> Tensor:
    """``cov + eps I`` on the real channels, with a padding block that leaves them unaffected.

    The padding block is ``c I`` (no gradient): for newton ``c`` is the trace of the real block, so
    that ``Sigma_N`` is the identity there and the iterate stays the identity; for zca/pca it is
    larger than every real eigenvalue, so the padding eigenvectors come last and stay separate.
    """
    if mask is None:
        return torch.add(cov, identity(cov.size(-1), cov.device, cov.dtype), alpha=eps)
    sigma = cov * (mask.unsqueeze(-1) * mask.unsqueeze(-2)) + torch.diag_embed(eps * mask)
    with torch.no_grad():
        trace = (sigma.diagonal(dim1=-2, dim2=-1) * mask).sum(-1, keepdim=True)
        fill = trace if method == "newton" else 2 * trace  # trace >= eps > 0 bounds every eigenvalue
    return sigma + torch.diag_embed(fill * (1 - mask))


def _stored(W: Tensor, mask: Tensor | None) -> Tensor:
    """``W`` with its padding block replaced by the identity (the storage layout)."""
    if mask is None:
        return W
    return W * (mask.unsqueeze(-1) * mask.unsqueeze(-2)) + torch.diag_embed(1 - mask)
