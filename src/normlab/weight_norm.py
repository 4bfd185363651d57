"""Weight Normalization (Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
Accelerate Training of Deep Neural Networks", NeurIPS 2016, arXiv 1602.07868).

Each output unit's weight vector is reparameterized by a direction ``v`` and a gain ``g``::

    w = g * v / ||v||                      (eq. 2; the norm over all dims but the unit's)

for ``nn.Linear``/``nn.ConvNd`` weights the unit is dimension 0, for transposed convolutions
dimension 1. :func:`weight_norm` registers this through ``torch.nn.utils.parametrize`` with the key
names of ``torch.nn.utils.parametrizations.weight_norm`` (``parametrizations.weight.original0`` is
``g`` with the same shape, ``original1`` is ``v``), so state dicts interchange both ways.

What the paper and its follow-ups use beyond torch's function:

* **Data-dependent initialization** (section 2.2), :func:`init_weight_norm`: on one batch, for every
  weight-normalized layer in forward order, ``t = v.x / ||v||`` and, per output unit over the batch
  and spatial dims, ``g <- 1 / sigma[t]`` and ``b <- -mu[t] / sigma[t]``, so the pre-activation
  ``(t - mu[t]) / sigma[t]`` has zero mean and unit variance; later layers see the initialized
  outputs of earlier ones.
* **Log-scale gain**: ``g = exp(c * s)`` with a learnable ``s`` and a constant ``c``
  (``weight_norm(..., log_gain_factor=c)``); ``original0`` then holds ``s``.
* **Norm bound** on ``v``, :func:`clip_weight_norm_`: under gradient descent ``||v||`` only grows
  (section 2.1), which lowers the effective learning rate ``lr / ||v||^2``. ``w`` does not depend on
  ``||v||``, so rescaling ``v`` into ``[min_norm, max_norm]`` after ``optimizer.step()`` changes no
  output.

Division by zero: :func:`weight_norm` raises a ``ValueError`` if a unit's weight is all zeros (its
direction is undefined). A ``v`` that becomes zero later gives ``w = 0`` (the norm is clamped at
``eps``, 1e-12 by default), never NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .batches import Forward, call_model
from .kernels import stat_dtype

__all__ = [
    "WeightNorm",
    "weight_norm",
    "remove_weight_norm",
    "is_weight_normalized",
    "init_weight_norm",
    "clip_weight_norm_",
    "normalized_weight",
    "norm_except_dim",
]


class WeightNorm(nn.Module):
    """The parametrization ``(g, v) -> g * v / ||v||`` (or ``exp(c * s) * v / ||v||``).

    Args:
        dim: the output-unit dimension of the weight (0 for Linear/Conv, 1 for ConvTranspose);
            ``None`` normalizes the whole tensor with one scalar gain.
        log_gain_factor: ``c`` of the log-scale gain ``g = exp(c * s)``; ``None`` for ``g`` itself.
        eps: lower bound of ``||v||`` (a zero ``v`` gives ``w = 0`` instead of NaN).
    """

    def __init__(self, dim: int | None = 0, log_gain_factor: float | None = None, eps: float = 1e-12) -> None:
        super().__init__()
        self.dim = dim
        self.log_gain_factor = log_gain_factor
        self.eps = eps

    def gain(self, g: Tensor) -> Tensor:
        """The gain ``g`` from the stored parameter (``exp(c * s)`` in log-scale mode)."""
        return g if self.log_gain_factor is None else torch.exp(self.log_gain_factor * g)

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return normalized_weight(v, self.gain(g), self.dim, self.eps)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, v)`` with ``v = weight`` and ``g = ||weight||`` (``s = log(||weight||) / c``)."""
        norm = norm_except_dim(weight, self.dim)
        if self.log_gain_factor is None:
            return norm, weight
        return torch.log(norm.clamp_min(self.eps)) / self.log_gain_factor, weight

    def extra_repr(self) -> str:
        return f"dim={self.dim}, log_gain_factor={self.log_gain_factor}, eps={self.eps}"


def is_weight_normalized(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module.<name>`` is weight-normalized (by :func:`weight_norm` or torch's)."""
    return _wn_parametrization(module, name) is not None


def weight_norm(
    module: nn.Module,
    name: str = "weight",
    dim: int | None = 0,
    log_gain_factor: float | None = None,
    eps: float = 1e-12,
) -> nn.Module:
    """Weight-normalize ``module.<name>``: ``w = g * v / ||v||`` per output unit; returns ``module``.

    Args:
        module: a layer with a weight (``nn.Linear``, ``nn.Conv2d``, ...).
        name: the weight's name.
        dim: the output-unit dimension, 0 for Linear/Conv and 1 for transposed convolutions;
            ``None`` for one gain over the whole tensor (torch's ``dim=None``).
        log_gain_factor: if given, the gain is ``g = exp(c * s)`` with ``c = log_gain_factor`` and
            the learnable ``s`` stored as ``original0`` (then the state dict holds ``s``, not ``g``,
            and does not interchange with torch's).
        eps: lower bound of ``||v||`` in the forward.

    ``g`` starts at ``||w||`` so the layer computes what it did before. The state dict keys are
    ``parametrizations.<name>.original0`` (``g``) and ``original1`` (``v``), as torch's
    ``parametrizations.weight_norm``. Raises ``ValueError`` for a missing weight, a bad ``dim`` or
    an all-zero unit (its direction is undefined).
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"weight_norm: expected {type(module).__name__} to have a tensor {name!r}, got {weight!r}")
    if is_weight_normalized(module, name):
        raise ValueError(f"weight_norm: {type(module).__name__}.{name} is already weight-normalized")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < weight.dim()):
        raise ValueError(
            f"weight_norm: expected dim to be None or an int in [0, {weight.dim()}) for a weight of shape "
            f"{tuple(weight.shape)}, got {dim!r}"
        )
    if log_gain_factor is not None and not (
        isinstance(log_gain_factor, (int, float)) and log_gain_factor > 0 and math.isfinite(log_gain_factor)
    ):
        raise ValueError(f"weight_norm: expected log_gain_factor > 0 or None, got {log_gain_factor!r}")
    with torch.no_grad():
        norm = norm_except_dim(weight, dim)
        if bool((norm == 0).any()):
            zero = int((norm == 0).sum())
            raise ValueError(
                f"weight_norm: expected every output unit of {type(module).__name__}.{name} to have a nonzero "
                f"weight (its direction v / ||v|| is undefined otherwise), got {zero} all-zero unit(s)"
            )
    parametrize.register_parametrization(module, name, WeightNorm(dim, log_gain_factor, eps), unsafe=True)
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Replace the weight-normalized ``module.<name>`` by a plain parameter holding ``g * v / ||v||``.

    Works for :func:`weight_norm` and torch's ``parametrizations.weight_norm``; the layer then is an
    ordinary one with the same outputs (e.g. for deployment or :func:`normlab.fold`). Returns
    ``module``; raises ``ValueError`` if ``module.<name>`` is not weight-normalized.
    """
    if not is_weight_normalized(module, name):
        raise ValueError(f"remove_weight_norm: {type(module).__name__}.{name} is not weight-normalized")
    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return module


# ----------------------------------------------------------------------------------- initialization
@torch.no_grad()
def init_weight_norm(model: nn.Module, batch: Any, eps: float = 1e-6, *, forward: Forward | None = None) -> list[str]:
    """Data-dependent initialization of every weight-normalized layer of ``model`` (section 2.2).

    Runs ``model`` once on ``batch`` with forward hooks, by the rule of :mod:`normlab.batches` that every
    tool follows: a tensor ``x`` is ``model(x)``, a tuple or list ``(x, y, ...)`` is ``model(x)``, a
    mapping is ``model(**batch)``; anything else (several positional inputs) with ``forward=lambda
    model, batch: ...``. For each weight-normalized ``Linear``/``ConvNd``/
    ``ConvTransposeNd`` layer, at its first call: ``t = (v / ||v||) . x`` (no bias), then per output
    unit over all other axes of ``t`` ``g <- 1 / sigma[t]`` and ``b <- -mu[t] / sigma[t]``, with
    ``sigma = sqrt(var + eps)`` (biased variance). The layer's output is replaced by the initialized
    one, ``(t - mu) / sigma``, so later layers are initialized on it. A layer without a bias gets
    ``g`` only. Log-scale gains get ``s = -log(sigma) / c``.

    The model's train/eval mode is left as it is. ``v`` is not changed. A batch that gives non-finite
    statistics at any layer raises a ``ValueError``. If anything raises, every gain and bias is
    restored. Returns the names of the initialized layers in forward order.
    """
    if forward is None and isinstance(batch, (tuple, list)) and len(batch) > 1:
        warnings.warn(
            "init_weight_norm: a tuple or list batch is (inputs, labels, ...) and the model is called on its "
            "first element, as in every normlab tool; to pass several positional inputs use "
            "forward=lambda model, batch: model(*batch)",
            DeprecationWarning,
            stacklevel=2,
        )
    layers = list(_weight_normalized(model))
    if not layers:
        raise ValueError("init_weight_norm: expected a model with weight-normalized layers, found none")
    saved = {}
    for _, module, _p in layers:
        g = module.parametrizations.weight.original0
        saved[module] = (g.clone(), None if getattr(module, "bias", None) is None else module.bias.clone())
    names = {module: qualname for qualname, module, _ in layers}
    done: list[str] = []
    handles = []

    def pre_hook(module: nn.Module, args: Any) -> None:
        if names[module] in done:
            return
        p = _wn_parametrization(module, "weight")
        g = module.parametrizations.weight.original0
        # Unit gain (s = 0 in log scale) and no bias: the layer computes t = (v / ||v||) . x.
        g.fill_(1.0 if not isinstance(p, WeightNorm) or p.log_gain_factor is None else 0.0)
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()

    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor | None:
        if names[module] in done:
            return None
        p = _wn_parametrization(module, "weight")
        axis = _unit_axis(module, p, out)
        t = out.to(stat_dtype(out))
        dims = [d for d in range(t.dim()) if d != axis]
        if not dims or t.numel() // t.size(axis) < 2:
            raise ValueError(
                f"init_weight_norm: expected more than 1 value per output unit of {names[module] or '<model>'}, "
                f"got output shape {tuple(out.shape)}"
            )
        var, mean = torch.var_mean(t, dim=dims, correction=0)
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(var).all())):
            # NaN or Inf in the batch (or values whose squares overflow): no gain or bias from it.
            raise ValueError(
                f"init_weight_norm: expected finite pre-activations at {names[module] or '<model>'}, got "
                "non-finite statistics (NaN or Inf in the batch?); every gain and bias is left as it was"
            )
        sigma = torch.sqrt(var + eps)
        g = module.parametrizations.weight.original0
        gain = 1.0 / sigma
        if isinstance(p, WeightNorm) and p.log_gain_factor is not None:
            gain = -torch.log(sigma) / p.log_gain_factor
        g.copy_(gain.reshape(g.shape).to(g.dtype))
        shape = [1] * t.dim()
        shape[axis] = -1
        if getattr(module, "bias", None) is not None:
            module.bias.copy_((-mean / sigma).to(module.bias.dtype))
            new = (t - mean.reshape(shape)) / sigma.reshape(shape)
        else:
            new = t / sigma.reshape(shape)
        done.append(names[module])
        return new.to(out.dtype)

    try:
        for _, module, _p in layers:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
        call_model(model, batch, forward, "init_weight_norm")
    except BaseException:
        for module, (g, b) in saved.items():
            module.parametrizations.weight.original0.copy_(g)
            if b is not None:
                module.bias.copy_(b)
        raise
    finally:
        for h in handles:
            h.remove()
    return done


# ----------------------------------------------------------------------------------- norm bound
@torch.no_grad()
def clip_weight_norm_(model: nn.Module, max_norm: float | None = None, min_norm: float | None = None) -> int:
    """Rescale ``v`` of every weight-normalized layer so each unit's ``||v||`` lies in ``[min_norm, max_norm]``.

    Call it after ``optimizer.step()``: gradient steps are orthogonal to ``v``, so ``||v||`` only
    grows and the effective learning rate of the direction, ``lr / ||v||^2``, only falls (section
    2.1 of the paper). ``w = g v / ||v||`` does not depend on ``||v||``, so this changes no output
    (optimizer moments keep their values). All-zero units are left alone. Returns the number of
    units rescaled.
    """
    for bound, label in ((max_norm, "max_norm"), (min_norm, "min_norm")):
        if bound is not None and not (isinstance(bound, (int, float)) and bound > 0 and math.isfinite(bound)):
            raise ValueError(f"clip_weight_norm_: expected {label} > 0 or None, got {bound!r}")
    if max_norm is not None and min_norm is not None and min_norm > max_norm:
        raise ValueError(f"clip_weight_norm_: expected min_norm <= max_norm, got {min_norm} > {max_norm}")
    if max_norm is None and min_norm is None:
        raise ValueError("clip_weight_norm_: expected max_norm or min_norm (or both), got neither")
    rescaled = 0
    for _, module, p in _weight_normalized(model):
        v = module.parametrizations.weight.original1
        norm = norm_except_dim(v, _param_dim(p))
        target = norm.clamp(min=min_norm, max=max_norm)
        change = (target != norm) & (norm > 0)
        factor = torch.where(change, target / torch.where(norm > 0, norm, 1), 1)
        v.mul_(factor.to(v.dtype))
        rescaled += int(change.sum())
    return rescaled


# ----------------------------------------------------------------------------------- functional core
def normalized_weight(v: Tensor, g: Tensor, dim: int | None, eps: float = 1e-12) -> Tensor:
    """``g * v / max(||v||, eps)`` with the norm over every dimension but ``dim``.

    ``g`` has the shape of :func:`norm_except_dim` (or any shape broadcasting to it).
    """
    return _NormalizedWeight.apply(v, g, dim, eps)


def norm_except_dim(v: Tensor, dim: int | None) -> Tensor:
    """The 2-norm of ``v`` over every dimension but ``dim`` (all of them for ``None``), kept as size 1.

    Same shape as torch's ``norm_except_dim``: ``(out, 1, 1, 1)`` for a conv weight and ``dim=0``,
    a 0-d tensor for ``dim=None``.
    """
    if dim is None:
        return torch.linalg.vector_norm(v)
    dims = _reduce_dims(v.dim(), dim)
    return torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()


# ----------------------------------------------------------------------------------- kernels
class _NormalizedWeight(torch.autograd.Function):
    """``w = g * v / n`` with ``n = max(||v||, eps)``, with the backward written out.

    With ``G = dL/dw``, ``a = g / n`` and ``d = <G, v>`` per unit::

        dL/dg = d / n
        dL/dv = a * G - (a * d / n^2) * v        (the second term vanishes where ||v|| < eps)

    Three passes over the weight instead of autograd's seven (the norm's backward alone is four).
    For ``dim=0`` on the CPU it runs torch's fused weight-norm kernels instead. Under ``create_graph``
    (second derivatives) the backward is autograd's through ``g * v / max(||v||, eps)`` instead.
    """

    @staticmethod
    def forward(ctx, v, g, dim, eps):  # noqa: ANN001, ANN205
        ctx.dim, ctx.eps = dim, eps
        ctx.native = (
            dim == 0 and v.dim() > 1 and v.device.type == "cpu" and g.shape == (v.shape[0],) + (1,) * (v.dim() - 1)
        )
        if ctx.native:
            # torch's fused kernels (one pass each way), unless a norm is below eps; the check
            # is free on the CPU (on accelerators it would synchronize, so they take the general path).
            w, norm = torch._weight_norm_interface(v, g, 0)
            if not bool((norm < eps).any()):
                ctx.save_for_backward(v, g, norm)
                return w
            ctx.native = False
        norm = norm_except_dim(v, dim)
        n = norm.clamp_min(eps)
        scale = g / n
        ctx.save_for_backward(v, g, n, norm >= eps)
        return v * scale

    @staticmethod
    def backward(ctx, grad_w):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            v, g = ctx.saved_tensors[:2]
            wanted = [t for t, need in zip((v, g), ctx.needs_input_grad[:2]) if need]
            with torch.enable_grad():
                w = g * v / norm_except_dim(v, ctx.dim).clamp_min(ctx.eps)
                found = iter(torch.autograd.grad(w, wanted, grad_w, create_graph=True, allow_unused=True))
            return (*(next(found) if need else None for need in ctx.needs_input_grad[:2]), None, None)
        return _NormalizedWeight._backward(ctx, grad_w)

    @staticmethod
    def _backward(ctx, grad_w):  # noqa: ANN001, ANN205
        if ctx.native:
            v, g, norm = ctx.saved_tensors
            grad_v, grad_g = torch.ops.aten._weight_norm_interface_backward(grad_w.contiguous(), v, g, norm, 0)
            return grad_v, grad_g, None, None
        v, g, n, live = ctx.saved_tensors
        dims = _reduce_dims(v.dim(), ctx.dim)
        # Per-unit <G, v> (a 1-D weight with dim=0 has one element per unit: nothing to sum).
        dot = (grad_w * v).sum(dims, keepdim=ctx.dim is not None) if dims else grad_w * v
        a = g / n
        grad_g = grad_v = None
        if ctx.needs_input_grad[1]:
            grad_g = _sum_to(dot / n, g.shape)
        if ctx.needs_input_grad[0]:
            b = torch.where(live, -a * dot / (n * n), 0)
            grad_v = torch.addcmul(grad_w * a, v, b)
        return grad_v, grad_g, None, None


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    # g may broadcast to the norm's shape (e.g. a scalar gain); reduce the gradient back to it.
    return t.sum_to_size(shape) if t.shape != shape else t


def _reduce_dims(ndim: int, dim: int | None) -> list[int]:
    return list(range(ndim)) if dim is None else [d for d in range(ndim) if d != dim]


def _wn_parametrization(module: nn.Module, name: str) -> nn.Module | None:
    """The weight-norm parametrization of ``module.<name>`` (normlab's or torch's), or ``None``."""
    if not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    if len(plist) != 1:
        return None
    p = plist[0]
    if isinstance(p, WeightNorm) or type(p).__name__ == "_WeightNorm":
        return p
    return None


def _param_dim(p: nn.Module) -> int | None:
    # torch's _WeightNorm stores dim=None as -1.
    dim = getattr(p, "dim", 0)
    return None if dim is None or dim == -1 else dim


def _gain(p: nn.Module, g: Tensor) -> Tensor:
    return p.gain(g) if isinstance(p, WeightNorm) else g


def _weight_normalized(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    for qualname, module in model.named_modules():
        p = _wn_parametrization(module, "weight")
        if p is not None:
            yield qualname, module, p


def _unit_axis(module: nn.Module, p: nn.Module, out: Tensor) -> int:
    """The axis of ``out`` that indexes the output units of ``module``'s normalized weight."""
    dim = _param_dim(p)
    name = type(module).__name__
    if isinstance(module, nn.Linear):
        if dim == 0:
            return out.dim() - 1
    elif isinstance(module, nn.modules.conv._ConvNd):
        batched = out.dim() == module.weight.dim()
        axis = 1 if batched else 0
        if not module.transposed and dim == 0:
            return axis
        if module.transposed and dim == 1 and module.groups == 1:
            return axis
    else:
        raise ValueError(
            f"init_weight_norm: expected weight-normalized nn.Linear / nn.ConvNd / nn.ConvTransposeNd layers, "
            f"got {name}"
        )
    raise ValueError(
        f"init_weight_norm: {name} is weight-normalized with dim={dim}, expected one gain per output unit "
        "(dim=0 for Linear/Conv, dim=1 for ConvTranspose with groups=1)"
    )
