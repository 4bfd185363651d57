"""Batch Kalman Normalization (Wang, Peng, Luo, Wang, Lin, "Batch Kalman Normalization: Towards
Training Deep Neural Networks with Micro-Batches", arXiv 1802.03133; NeurIPS 2018 as "Kalman
Normalization: Normalizing Internal Representations Across Network Layers").

BKN estimates a layer's statistics from its own micro-batch *and* from the estimate of the layer
before it, as a Kalman filter combines an observation with a prediction carried through the system.

Training splits the batch into contiguous micro-batches of ``micro_batch`` samples (``None``: one
group; the last holds the remainder). For each group ``g`` and channel, over its ``m_g`` values::

    observation   mu_obs, var_obs      the group's mean and biased variance
    prediction    mu_pred, var_pred    the previous BKN layer's posterior carried through the
                                       activation and the layer between the two norms (below)
    posterior     mu  = p mu_pred  + (1 - p) mu_obs
                  var = p var_pred + (1 - p) var_obs + p (1 - p) (mu_obs - mu_pred)^2
    output        y = gamma (x - mu) / sqrt(var + eps) + beta

The posterior is the mean and variance of the p : (1 - p) mixture of the two estimates. The gain
``p`` is fixed (no gradient); gradients flow through the observation and through the prediction
into the producer's weights and the earlier layers' estimates.

The transition. The previous layer's posterior ``(mu_h, var_h)`` of *its* (un-normalized) input
``h`` is carried through the activation ``phi`` and the conv or linear layer ``W, b`` that feeds
this one, with that layer's own weights, taking inputs and kernel taps as independent::

    E[phi(h)], Var[phi(h)]             ReLU: the rectified Gaussian's moments; identity: (mu_h, var_h)
    mu_pred  = sum_{i, taps} W[o, i, t]   E[phi(h_i)] + b[o]
    var_pred = sum_{i, taps} W[o, i, t]^2 Var[phi(h_i)]

What follows the paper and what the authors' code (wanggrun/Kalman-Normalization,
``KalmanNorm/kalman_norm.py`` and ``cifar-kn-microbatch.py``) decided where the paper leaves a
choice open:

* paper: the micro-batch observation, the prediction from the preceding layer, the gain ``p`` and
  the posterior update above; the first layer (or one without a linked predecessor) uses its
  observation alone, i.e. is ghost batch normalization;
* code: the gain is a fixed 0.9; the previous posterior enters the activation *un-normalized*
  (the code samples ``relu(N(mu_h, var_h))``, not the previous layer's normalized, affine output);
  the prediction passes through the same conv, with its weights; the groups are contiguous
  micro-batches. The code estimates the transition by Monte Carlo (one random map per step); this
  layer computes its deterministic limit in closed form (equal at interior positions; the code's
  zero padding pulls border positions towards ``b``);
* code, off by default here: a guard that falls back to the observation when the mean ratio
  ``var_pred / var_obs`` over the layer's groups and channels reaches 100 (``max_variance_ratio``);
* this layer: the running statistics take one moving-average step per group from its posterior
  (unbiased variance ``var m_g / (m_g - 1)``, as torch stores it; the code keeps a biased moving
  variance of the first group), so ``p = 0`` is exactly ghost BN and one group without a prior is
  exactly BN. Inference is BN with the running statistics.

Residual networks: the code adds the estimates of the two branches of a residual sum (means add,
variances add: independent branches). :func:`sum_estimates` is that rule; links are made by hand
(:meth:`BatchKalmanNorm.attach`, ``forward(x, prior=...)``), never across a sum by
:func:`normlab.convert`.

Micro-batches stay local to a process under :func:`normlab.sync`, as ghost batches do.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .base import BatchStats, NormBase
from .checks import check_input, check_positive_int, layer_name
from .dispatch import recomputed_grads
from .ghost import micro_batch_step
from .kernels import (
    check_micro_batches,
    ema_steps,
    in_format_of,
    micro_batch_accumulate_,
    micro_batch_affine,
    micro_batch_counts,
    micro_batch_moments,
    micro_batch_sizes,
    micro_batch_stats,
    micro_batch_steps,
    micro_batch_sums,
    params_in,
)

__all__ = [
    "BatchKalmanNorm",
    "batch_kalman_norm",
    "kalman_update",
    "predict",
    "relu_moments",
    "sum_estimates",
    "TRANSITIONS",
    "ACTIVATIONS",
]

#: Layers a prediction can pass through (their output channels in dimension 1).
TRANSITIONS: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Elementwise activations between a BKN layer and the next layer's producer.
ACTIVATIONS = ("relu", "identity")

Estimate = tuple[Tensor, Tensor]


class BatchKalmanNorm(NormBase):
    """Batch Kalman Normalization over inputs ``(N, C, *)`` (Wang et al. 2018); see the module docstring.

    Args:
        num_features: ``C``.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as torch's BatchNorm
            (``momentum`` is per micro-batch).
        p: the Kalman gain given to the prediction, in ``[0, 1]`` (the authors' 0.9); ``0`` is ghost BN.
        micro_batch: samples per micro-batch (the last holds the remainder); ``None``: one group.
        max_variance_ratio: the authors' code's guard, off by default: where the mean of
            ``var_pred / var_obs`` over the groups and channels reaches it, the layer uses its
            observation alone for that step (the code uses 100).

    A training forward publishes its posterior (:attr:`posterior`) for the layer linked after it
    (:meth:`attach`), which takes it in its own forward of the same pass. ``forward(x, prior=(mean,
    var))`` gives the prediction explicitly instead (a ``(C,)`` or ``(groups, C)`` mean and variance).
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
        p: float = 0.9,
        micro_batch: int | None = None,
        max_variance_ratio: float | None = None,
    ) -> None:
        name = type(self).__name__
        _check_gain(name, p)
        if micro_batch is not None:
            check_positive_int(name, "micro_batch", micro_batch)
        if max_variance_ratio is not None and not (
            isinstance(max_variance_ratio, (int, float)) and max_variance_ratio > 0
        ):
            raise ValueError(f"{name}: expected max_variance_ratio > 0 or None, got {max_variance_ratio!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.p = float(p)
        self.micro_batch = micro_batch
        self.max_variance_ratio = None if max_variance_ratio is None else float(max_variance_ratio)
        # (prev, transition, activation): plain tuples, so neither module becomes a submodule.
        self._link: tuple[BatchKalmanNorm, nn.Module, str] | None = None
        self._consumer: tuple[BatchKalmanNorm] | None = None  # the layer attached to this one
        self._posterior: Estimate | None = None
        self._prior: Estimate | None = None

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, p={self.p}, micro_batch={self.micro_batch}"
        if self.max_variance_ratio is not None:
            s += f", max_variance_ratio={self.max_variance_ratio}"
        return s

    def __getstate__(self) -> dict[str, Any]:
        # A pass's estimates (tensors with their graph) are not state: copies and pickles start without.
        return {**super().__getstate__(), "_posterior": None, "_prior": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_link", None)
        self.__dict__.setdefault("_consumer", None)
        self.__dict__.setdefault("_posterior", None)
        self.__dict__.setdefault("_prior", None)

    # ----------------------------------------------------------------------------- links
    def attach(
        self, layer: nn.Module | None, prev: BatchKalmanNorm | None = None, activation: str = "relu"
    ) -> BatchKalmanNorm:
        """Predict this layer's statistics from ``prev``'s posterior through ``activation`` and ``layer``.

        ``layer`` is the conv or linear (:data:`TRANSITIONS`) whose output this layer normalizes,
        ``prev`` the BKN layer whose normalized output, after ``activation`` (:data:`ACTIVATIONS`),
        is ``layer``'s input; a layer feeds at most one other. ``attach(None)`` removes the link
        (the layer is then ghost BN unless given a ``prior``). Returns ``self``.
        """
        name = layer_name(self)
        if layer is None:
            self._unlink()
            return self
        if not isinstance(layer, TRANSITIONS):
            kinds = ", ".join(t.__name__ for t in TRANSITIONS)
            raise ValueError(
                f"{name}.attach: expected the layer between the two norms to be one of {kinds}, "
                f"got {type(layer).__name__}"
            )
        if not isinstance(prev, BatchKalmanNorm) or prev is self:
            raise ValueError(f"{name}.attach: expected prev to be another BatchKalmanNorm, got {type(prev).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}.attach: expected activation in {ACTIVATIONS}, got {activation!r}")
        outs = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        ins = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        if outs != self.num_features or ins != prev.num_features:
            raise ValueError(
                f"{name}.attach: expected {type(layer).__name__} from prev's {prev.num_features} to this layer's "
                f"{self.num_features} channels, got {ins} -> {outs}"
            )
        if prev.micro_batch != self.micro_batch:
            raise ValueError(
                f"{name}.attach: expected prev to split batches as this layer (micro_batch={self.micro_batch}), "
                f"got micro_batch={prev.micro_batch}"
            )
        if prev._consumer is not None and prev._consumer[0] is not self:
            raise ValueError(
                f"{name}.attach: prev already feeds another {type(self).__name__} (a posterior serves one "
                "layer); detach that one first with attach(None)"
            )
        self._unlink()
        self._link = (prev, layer, activation)
        prev._consumer = (self,)
        return self

    def _unlink(self) -> None:
        if self._link is not None:
            self._link[0]._consumer = None
        self._link = None

    @property
    def link(self) -> tuple[BatchKalmanNorm, nn.Module, str] | None:
        """``(prev, layer, activation)`` as given to :meth:`attach`, or ``None``."""
        return self._link

    @property
    def posterior(self) -> Estimate | None:
        """The ``(groups, C)`` posterior mean and variance of this layer's input in the last training
        forward, until the linked layer after it takes it (``None`` after an eval forward)."""
        return self._posterior

    # ----------------------------------------------------------------------------- the paper's steps
    def forward(self, x: Tensor, prior: Estimate | None = None) -> Tensor:
        """Normalize ``x`` ``(N, C, *)``; ``prior``: an explicit ``(mean, var)`` prediction (training only)."""
        if not self.use_batch_stats():
            self._posterior = None  # nothing estimated: the next layer must not predict from an older pass
            return super().forward(x)
        self._prior = prior
        try:
            return super().forward(x)
        finally:
            self._prior = None

    def check_input(self, x: Tensor, training: bool | None = None) -> None:
        """As every layer's, and in training every micro-batch needs more than one value per channel."""
        super().check_input(x, training=False)
        if self.use_batch_stats():
            check_micro_batches(self, x, self.micro_batch)

    def normalize_batch(self, x: Tensor, group: Any | None) -> tuple[Tensor, BatchStats]:
        sizes = micro_batch_sizes(x.size(0), self.micro_batch)
        prediction = self._prediction(x, len(sizes))
        feeds = self._consumer is not None
        y, mean, var, count = _kalman_step(
            x, sizes, self.weight, self.bias, self.eps, self.p, prediction, self.max_variance_ratio, feeds
        )
        self._posterior = (mean, var)
        return y, BatchStats(mean.detach(), var.detach(), count)

    def update_running(self, stats: BatchStats) -> None:
        """One moving-average step per micro-batch from its posterior (``num_batches_tracked`` counts them)."""
        micro_batch_steps(self, stats.mean, stats.var, stats.count)

    def _prediction(self, x: Tensor, groups: int) -> Estimate | None:
        """The explicit prior, or the linked predecessor's posterior carried forward (taking it), or None."""
        name = layer_name(self)
        if self._prior is not None:
            return _check_estimate(name, "prior", self._prior, groups, self.num_features, x)
        if self._link is None:
            return None
        prev, layer, activation = self._link
        estimate = prev._posterior
        if estimate is None:
            return None
        _check_estimate(name, "the linked layer's posterior", estimate, groups, prev.num_features, x)
        prev._posterior = None  # taken: one pass's estimate serves one forward
        return predict(*estimate, layer, activation)


def _check_gain(name: str, p: Any) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: expected the gain p in [0, 1], got {p!r}")


def _check_estimate(name: str, what: str, estimate: Any, groups: int, channels: int, x: Tensor) -> Estimate:
    """Raise unless ``estimate`` is a (mean, var) pair of ``(C,)`` or ``(groups, C)`` floating tensors."""
    if not (isinstance(estimate, (tuple, list)) and len(estimate) == 2):
        raise ValueError(f"{name}: expected {what} as a (mean, var) pair of tensors, got {type(estimate).__name__}")
    for t in estimate:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name}: expected {what} as floating-point tensors, got {type(t).__name__}")
        if tuple(t.shape) not in ((channels,), (groups, channels)):
            raise ValueError(
                f"{name}: expected {what} of shape ({channels},) or ({groups}, {channels}) (the batch's "
                f"{groups} micro-batch(es) of {x.size(0)} samples), got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"{name}: expected {what} on {x.device}, got {t.device}")
    return estimate[0], estimate[1]


def batch_kalman_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    p: float = 0.9,
    micro_batch: int | None = None,
    prior: Estimate | None = None,
    max_variance_ratio: float | None = None,
) -> Tensor:
    """Batch Kalman normalization of ``x`` ``(N, C, *)``, in ``F.batch_norm``'s shape.

    ``training=False``: batch normalization with the running statistics. ``training=True``: each
    micro-batch with its posterior from its observation and ``prior`` (the prediction, ``(C,)`` or
    ``(groups, C)`` mean and variance; ``None``: the observation alone, i.e. ghost BN); with a
    ``momentum``, the running statistics that are given take one step per micro-batch in place.
    """
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_kalman_norm: expected running_mean and running_var when training=False")
        return torch.nn.functional.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    _check_gain("batch_kalman_norm", p)
    check_input("batch_kalman_norm", x, x.size(1), False)
    check_micro_batches("batch_kalman_norm", x, micro_batch)
    sizes = micro_batch_sizes(x.size(0), micro_batch)
    if prior is not None:
        prior = _check_estimate("batch_kalman_norm", "prior", prior, len(sizes), x.size(1), x)
    y, mean, var, count = _kalman_step(x, sizes, weight, bias, eps, p, prior, max_variance_ratio)
    if momentum is not None and running_mean is not None:
        with torch.no_grad():
            ema_steps(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
    return y


def kalman_update(obs: Estimate, pred: Estimate, p: float | Tensor) -> Estimate:
    """The posterior: the mean and variance of the ``p : (1 - p)`` mixture of ``pred`` and ``obs``."""
    (mu_o, var_o), (mu_p, var_p) = obs, pred
    d = mu_o - mu_p
    mean = torch.lerp(mu_p, mu_o, 1 - p)  # p mu_p + (1 - p) mu_o
    var = torch.lerp(var_p, var_o, 1 - p)
    if isinstance(p, Tensor):  # (the guard's gain)
        return mean, var + p * (1 - p) * d.square()
    return mean, torch.addcmul(var, d, d, value=p * (1 - p))


def relu_moments(mean: Tensor, var: Tensor) -> Estimate:
    """Mean and variance of ``relu(h)`` for ``h ~ N(mean, var)`` (the rectified Gaussian), elementwise.

    Written with ``erfc`` for both tails, so that neither ``Phi`` nor ``1 - Phi`` cancels: far on the
    positive side the variance tends to ``var``, far on the negative side to 0. Differentiable, with
    the closed-form derivatives ``de/dmean = Phi``, ``de/dvar = phi / (2 s)``, ``dv/dmean = 2 e (1 -
    Phi)`` and ``dv/dvar = Phi - e phi / s`` (``s = sqrt(var)``, ``phi`` the density at ``mean / s``).
    """
    if torch.compiler.is_compiling():
        return _relu_moments(mean, var)
    return _ReluMoments.apply(mean, var)


def _relu_moments(mean: Tensor, var: Tensor, parts: list | None = None) -> Estimate:
    """:func:`relu_moments` in differentiable ops; ``parts`` (a list) receives what the backward reads."""
    # s >= sqrt(tiny): clamped before the root, so that no gradient (nor 0 * inf) reaches var below it
    tiny = torch.finfo(var.dtype).tiny
    s = var.clamp_min(tiny).sqrt()
    a = mean / s
    upper = 0.5 * torch.erfc(-a / math.sqrt(2))  # Phi(a)
    lower = 0.5 * torch.erfc(a / math.sqrt(2))  # 1 - Phi(a)
    density = torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    e = mean * upper + s * density
    # E[r^2] - E[r]^2 with its mean^2 (Phi - Phi^2) term written as mean^2 Phi (1 - Phi).
    v = mean.square() * upper * lower + var * upper + mean * s * density * (lower - upper) - (s * density).square()
    if parts is not None:
        # phi / s, 0 where s is held at its floor (var < tiny): no gradient reaches var through s there
        parts += [upper, lower, torch.where(var >= tiny, density / s, 0.0), e, v >= 0]
    return e, v.clamp_min(0)


class _ReluMoments(torch.autograd.Function):
    """:func:`_relu_moments` with its closed-form backward (a few ops on the moments' shape, against
    about twice the forward's ops through autograd); second derivatives recompute the composite."""

    @staticmethod
    def forward(ctx, mean, var):  # noqa: ANN001, ANN205
        parts: list[Tensor] = []
        with torch.no_grad():
            e, v = _relu_moments(mean, var, parts=parts)
        ctx.save_for_backward(*parts)
        ctx.inputs = (mean, var)
        ctx.versions = (mean._version, var._version)
        return e, v

    @staticmethod
    def backward(ctx, grad_e, grad_v):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite
            return tuple(recomputed_grads(ctx, "BatchKalmanNorm", _relu_moments, (grad_e, grad_v)))
        upper, lower, t, e, kept = ctx.saved_tensors  # t = phi / s
        grad_v = grad_v * kept  # the clamp at 0
        g_mean = torch.addcmul(grad_e * upper, grad_v, e * lower, value=2)
        g_var = torch.addcmul(grad_v * torch.addcmul(upper, e, t, value=-1), grad_e, t, value=0.5)
        return g_mean, g_var


def predict(mean: Tensor, var: Tensor, layer: nn.Module, activation: str = "relu") -> Estimate:
    """The statistics of ``layer(activation(h))`` per output channel, from ``h``'s ``(..., C_in)`` mean and variance.

    Closed form, taking inputs and kernel taps as independent: ``W E[phi] + b`` and ``W^2 Var[phi]``
    summed over inputs and taps (a grouped conv sums over its group's inputs). Computed in the
    statistics' dtype (float32 under autocast).
    """
    if activation == "relu":
        mean, var = relu_moments(mean, var)
    elif activation != "identity":
        raise ValueError(f"predict: expected activation in {ACTIVATIONS}, got {activation!r}")
    if not isinstance(layer, TRANSITIONS):
        raise ValueError(f"predict: expected one of {[t.__name__ for t in TRANSITIONS]}, got {type(layer).__name__}")
    weight = layer.weight.to(mean.dtype)
    groups = getattr(layer, "groups", 1)
    lead = mean.shape[:-1]
    e, d = mean.reshape(-1, mean.size(-1)), var.reshape(-1, var.size(-1))
    with torch.autocast(mean.device.type, enabled=False):
        if torch.compiler.is_compiling():
            mu, v = _transition(e, d, weight, groups)
        else:
            mu, v = _Transition.apply(e, d, weight, groups)
        mu, v = mu.reshape(*lead, -1), v.reshape(*lead, -1)
        if layer.bias is not None:
            mu = mu + layer.bias.to(mu.dtype)
    return mu, v


def sum_estimates(*estimates: Estimate) -> Estimate:
    """The estimate of a sum of independent branches (a residual sum): means add, variances add."""
    if not estimates:
        raise ValueError("sum_estimates: expected at least one (mean, var) estimate")
    mean = sum(e[0] for e in estimates)
    var = sum(e[1] for e in estimates)
    return mean, var


# ----------------------------------------------------------------------------------- kernels
def _kalman_step(
    x: Tensor,
    sizes: list[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    p: float,
    prediction: Estimate | None,
    max_ratio: float | None,
    differentiable: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalize each micro-batch of ``x`` with its posterior; return ``y``, the ``(G, C)`` posterior
    mean and biased variance (differentiable), and the value counts ``(G,)``.

    Without a prediction (or with ``p = 0``), when no later layer predicts from this one
    (``differentiable`` off), the posterior is the observation: ghost BN's step
    (:func:`normlab.ghost.micro_batch_step`). Otherwise :class:`_KalmanStep`, or under
    ``torch.compile`` its composite (:func:`_composite`), which the compiler fuses itself.
    """
    if prediction is None or p == 0.0:
        prediction, p = None, 0.0
        if not (differentiable and torch.is_grad_enabled() and x.requires_grad):
            return micro_batch_step(x, sizes[0] if len(sizes) > 1 else None, weight, bias, eps)
    count = micro_batch_counts(x, sizes)
    mu_p, var_p = (None, None) if prediction is None else prediction
    settings = (tuple(sizes), float(p), float(eps), max_ratio)
    if torch.compiler.is_compiling():
        y, mean, var = _composite(x, weight, bias, mu_p, var_p, settings)
    else:
        y, mean, var = _KalmanStep.apply(x, weight, bias, mu_p, var_p, settings)
    return y, mean, var, count


def _posterior(
    mean_o: Tensor, var_o: Tensor, mu_p: Tensor | None, var_p: Tensor | None, p: float, max_ratio: float | None
) -> tuple[Tensor, Tensor, Tensor | float]:
    """The posterior from the observation and the prediction, and the gain used (0 where the guard chose
    the observation: a tensor then, so that the choice needs no host synchronization)."""
    if mu_p is None or p == 0.0:
        return mean_o, var_o, 0.0
    mu_p, var_p = mu_p.to(mean_o.dtype).expand_as(mean_o), var_p.to(mean_o.dtype).expand_as(mean_o)
    gain: Tensor | float = p
    if max_ratio is not None:  # the authors' guard: one decision for the layer
        gain = torch.where((var_p / var_o).mean() < max_ratio, p, 0.0).to(mean_o.dtype)
    mean, var = kalman_update((mean_o, var_o), (mu_p, var_p), gain)
    return mean, var, gain


def _scale_shift(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The normalization ``y = A x + B`` of each (group, channel): ``r = 1 / sqrt(var + eps)``, ``A = gamma r``
    and ``B = beta - mu A`` (differentiable)."""
    r = torch.rsqrt(var + eps)
    scale = r if weight is None else r * weight
    shift = -(mean * scale) if bias is None else torch.addcmul(bias, mean, scale, value=-1)
    return r, scale, shift


def _composite(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mu_p: Tensor | None, var_p: Tensor | None, settings: tuple
) -> tuple[Tensor, Tensor, Tensor]:
    """The step in differentiable torch ops: ``(y, posterior mean, posterior variance)``."""
    sizes, p, eps, max_ratio = settings
    mean_o, var_o = micro_batch_moments(x, sizes)
    mean, var, _ = _posterior(mean_o, var_o, mu_p, var_p, p, max_ratio)
    weight, bias = params_in(mean.dtype, weight, bias)
    _, scale, shift = _scale_shift(mean, var, weight, bias, eps)
    return micro_batch_affine(x, sizes, scale, shift), mean, var


class _KalmanStep(torch.autograd.Function):
    """The step with its own backward: ``(x, gamma, beta, mu_pred, var_pred) -> (y, mu, var)``, all three
    outputs differentiable (the posterior feeds the next layer's prediction).

    Forward: each micro-batch's statistics (:func:`normlab.kernels.micro_batch_stats`), the
    posterior on ``(G, C)`` tensors, and ``y = A x + B`` into a fresh output. Backward, with
    ``S = sum dL/dy x`` and ``T = sum dL/dy`` per (group, channel) (:func:`normlab.kernels.micro_batch_sums`)::

        dL/dgamma = r (S - mu T),  dL/dbeta = T,  dL/dmu += -A T,  dL/dvar += -r^2 A (S - mu T) / 2
        dL/dmu_obs  = q dL/dmu + 2 p q (mu_obs - mu_pred) dL/dvar,   dL/dvar_obs  = q dL/dvar
        dL/dmu_pred = p dL/dmu - 2 p q (mu_obs - mu_pred) dL/dvar,   dL/dvar_pred = p dL/dvar
        dL/dx = dL/dy A + dL/dmu_obs / m + dL/dvar_obs 2 (x - mu_obs) / m

    (``r = 1/sqrt(var + eps)``, ``A = gamma r``, ``q = 1 - p``), the last in two multiply-adds. The
    ``(G, C)`` algebra is written in few fused ops: on the ResNet's small maps its op count weighs as
    much as the passes over ``x``. Second derivatives recompute the step through :func:`_composite`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mu_p, var_p, settings):  # noqa: ANN001, ANN205
        sizes, p, eps, max_ratio = settings
        with torch.no_grad():
            mean_o, var_o = micro_batch_stats(x, sizes)
            mean, var, gain = _posterior(mean_o, var_o, mu_p, var_p, p, max_ratio)
            w, b = params_in(mean.dtype, weight, bias)
            r, scale, shift = _scale_shift(mean, var, w, b, eps)
            y = micro_batch_affine(x, sizes, scale, shift, out=torch.empty_like(x))
        ctx.settings, ctx.gain = settings, gain
        ctx.save_for_backward(x, w, mean_o, mean, r, scale, mu_p)
        ctx.inputs = (x, weight, bias, mu_p, var_p)
        ctx.versions = tuple(None if t is None else t._version for t in ctx.inputs)
        ctx.param_dtype = None if weight is None else weight.dtype
        ctx.set_materialize_grads(False)
        # Fresh outputs: the posterior tensors are returned as copies where they are the observation's.
        observed = isinstance(gain, float) and gain == 0.0
        return y, mean.clone() if observed else mean, var.clone() if observed else var

    @staticmethod
    def backward(ctx, grad_y, grad_mean, grad_var):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite
            return _composite_backward(ctx, grad_y, grad_mean, grad_var)
        x, w, mean_o, mean, r, scale, mu_p = ctx.saved_tensors
        sizes, gain, need = ctx.settings[0], ctx.gain, ctx.needs_input_grad
        g_mean = None if grad_mean is None else grad_mean.to(mean.dtype)
        g_var = None if grad_var is None else grad_var.to(mean.dtype)
        g_w = g_b = g = None
        if grad_y is not None:
            g = in_format_of(grad_y, x)
            s_x, s_1 = micro_batch_sums(g, x, sizes)  # sum dL/dy x, sum dL/dy
            centred = torch.addcmul(s_x, mean, s_1, value=-1)  # sum dL/dy (x - mu)
            if need[1] and w is not None:
                g_w = (r * centred).sum(0).to(ctx.param_dtype)
            if need[2]:
                g_b = s_1.sum(0).to(ctx.param_dtype)
            d_mean = scale * s_1
            d_var = r.square().mul_(scale).mul_(centred)
            g_mean = d_mean.neg_() if g_mean is None else g_mean - d_mean
            g_var = d_var.mul_(-0.5) if g_var is None else torch.sub(g_var, d_var, alpha=0.5)
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean
        g_var = torch.zeros_like(mean) if g_var is None else g_var
        g_mu_p = g_var_p = None
        if mu_p is None or (isinstance(gain, float) and gain == 0.0):
            g_mu_o, g_var_o = g_mean, g_var
        else:
            q = 1 - gain
            cross = (mean_o - mu_p.to(mean_o.dtype)).mul_(g_var).mul_(2 * gain * q)
            g_mu_o, g_var_o = cross + q * g_mean, q * g_var
            if need[3]:
                g_mu_p = _unexpand((gain * g_mean).sub_(cross), ctx.inputs[3])
            if need[4]:
                g_var_p = _unexpand(gain * g_var, ctx.inputs[4])
        g_x = None
        if need[0]:
            per_sample = x[0].numel() // x.size(1)
            if sizes[-1] == sizes[0]:
                inv_m: Tensor | float = 1.0 / (sizes[0] * per_sample)
            else:
                inv_m = micro_batch_counts(x, sizes).to(mean.dtype).reciprocal_().unsqueeze(-1)
            c1 = g_var_o * (2 * inv_m)
            c0 = torch.addcmul(g_mu_o * inv_m, c1, mean_o, value=-1)
            g_x = micro_batch_affine(x, sizes, c1, c0, out=torch.empty_like(x))
            if g is not None:
                micro_batch_accumulate_(g_x, g, sizes, scale)
        return g_x, g_w, g_b, g_mu_p, g_var_p, None


def _unexpand(grad: Tensor, like: Tensor) -> Tensor:
    """``grad`` ``(G, C)`` summed to ``like``'s shape (a ``(C,)`` prior was broadcast over the groups)."""
    return (grad if grad.dim() == like.dim() else grad.sum(0)).to(like.dtype)


def _composite_backward(ctx, grad_y, grad_mean, grad_var):  # noqa: ANN001, ANN202
    step = lambda *inputs: _composite(*inputs, ctx.settings)  # noqa: E731
    return (*recomputed_grads(ctx, "BatchKalmanNorm", step, (grad_y, grad_mean, grad_var)), None)


def _transition(e: Tensor, d: Tensor, weight: Tensor, groups: int) -> Estimate:
    """The transition's ``(L, C_out)`` mean and variance from ``(L, C_in)`` moments, in differentiable ops:
    the weights summed over the taps (and their squares) against the moments, per group."""
    w1, w2 = _tap_sums(weight)
    return _grouped(e, w1, groups), _grouped(d, w2, groups)


def _tap_sums(weight: Tensor) -> Estimate:
    """``W`` and ``W^2`` summed over the kernel taps: ``(C_out, C_in / groups)`` each (differentiable).

    One tap (a linear layer, a 1x1 conv): the weights themselves, no copy. Otherwise matrix-vector
    products with a vector of ones, 3x faster on CPU than a reduction over a last dimension of 3x3 taps.
    """
    taps = weight.reshape(weight.size(0), weight.size(1), -1)
    k = taps.size(-1)
    if k == 1:
        w1 = taps[..., 0]
        return w1, w1.square()
    ones = torch.ones(k, dtype=weight.dtype, device=weight.device)
    return (taps.reshape(-1, k) @ ones).view(taps.shape[:2]), (taps.square().reshape(-1, k) @ ones).view(taps.shape[:2])


def _grouped(x: Tensor, w: Tensor, groups: int) -> Tensor:
    """``x`` ``(L, C_in)`` times ``w`` ``(C_out, C_in / groups)`` transposed, group by group."""
    if groups == 1:
        return x @ w.t()
    c_out, c_in_g = w.shape
    out = torch.einsum("lgi,goi->lgo", x.reshape(-1, groups, c_in_g), w.reshape(groups, c_out // groups, c_in_g))
    return out.reshape(x.size(0), c_out)


class _Transition(torch.autograd.Function):
    """:func:`_transition` with its own backward: ``(E, D, W, groups) -> (mu, var)``.

    Autograd through the composite reads and writes the weights several times in its backward
    (the taps' sum expanded, both factors of the squares, their sum): on a 512x512x3x3 conv, one
    thread, 6.4 ms forward and backward, 4.6 ms this way. With ``a = dmu^T E`` and ``b = dvar^T D``
    per (output, input) pair, the weights' gradient is ``a + 2 b W`` at every tap: one pass over the
    weights. Second derivatives recompute the composite.
    """

    @staticmethod
    def forward(ctx, e, d, weight, groups):  # noqa: ANN001, ANN205
        with torch.no_grad():
            w1, w2 = _tap_sums(weight)
            mu, v = _grouped(e, w1, groups), _grouped(d, w2, groups)
        # One tap: the squared weights are weight-sized, recomputed in the backward, not kept.
        one_tap = math.prod(weight.shape[2:]) == 1  # (from the shape: no indexing op per step)
        ctx.save_for_backward(e, d, weight, w1, None if one_tap else w2)
        ctx.settings = groups
        ctx.inputs = (e, d, weight)
        ctx.versions = tuple(t._version for t in ctx.inputs)
        return mu, v

    @staticmethod
    def backward(ctx, grad_mu, grad_var):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite
            step = lambda e, d, w: _transition(e, d, w, ctx.settings)  # noqa: E731
            return (*recomputed_grads(ctx, "BatchKalmanNorm", step, (grad_mu, grad_var)), None)
        e, d, weight, w1, w2 = ctx.saved_tensors
        groups = ctx.settings
        need = ctx.needs_input_grad
        g_e = _grouped_t(grad_mu, w1, groups) if need[0] else None
        g_d = _grouped_t(grad_var, w1.square() if w2 is None else w2, groups) if need[1] else None
        g_w = None
        if need[2]:
            a = _outer(grad_mu, e, groups)
            b = _outer(grad_var, d, groups).mul_(2)
            taps = weight.reshape(weight.size(0), weight.size(1), -1)
            g_w = torch.addcmul(a.unsqueeze(-1), taps, b.unsqueeze(-1)).view_as(weight)
        return g_e, g_d, g_w, None


def _grouped_t(g: Tensor, w: Tensor, groups: int) -> Tensor:
    """``g`` ``(L, C_out)`` times ``w`` ``(C_out, C_in / groups)``, group by group: ``(L, C_in)``."""
    if groups == 1:
        return g @ w
    c_out, c_in_g = w.shape
    w = w.reshape(groups, c_out // groups, c_in_g)
    out = torch.einsum("lgo,goi->lgi", g.reshape(-1, groups, c_out // groups), w)
    return out.reshape(g.size(0), groups * c_in_g)


def _outer(g: Tensor, x: Tensor, groups: int) -> Tensor:
    """``sum_l g[l, o] x[l, i]`` for the (output, input) pairs of each group: ``(C_out, C_in / groups)``."""
    if groups == 1:
        return g.t() @ x
    c_out = g.size(1)
    c_in_g = x.size(1) // groups
    out = torch.einsum("lgo,lgi->goi", g.reshape(-1, groups, c_out // groups), x.reshape(-1, groups, c_in_g))
    return out.reshape(c_out, c_in_g)
