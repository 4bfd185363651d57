"""Folding normalization layers into the layers before them, for deployment.

In eval mode a statistics-keeping normalization layer is an affine map along the channels,
``y = A x + b`` (:func:`normlab.base.inference_affine`): ``A`` is ``(C,)`` for channel-wise layers
(BatchNorm, BatchRenorm, CrossIterationBatchNorm, MeanOnlyBatchNorm:
``A = gamma / sqrt(Var[x] + eps)``, ``b = beta - A E[x]``) or a dense ``(C, C)`` matrix for whitening
layers (DecorrelatedBatchNorm: the whitening matrix, block-diagonal over its groups, times
``gamma``). When a convolution or linear layer ``z = W * x + c`` produces the normalized channels,
``A (W * x + c) + b = (A W) * x + (A c + b)``: the layer's output channels are multiplied by ``A``
and the normalization disappears.

:func:`fold` returns a deep copy, in eval mode, in which

1. every weight re-parametrization is replaced by the plain tensor it computes: torch
   parametrizations (``torch.nn.utils.parametrizations.weight_norm`` and others), torch's older
   hook-based ``weight_norm``, and any module with an ``as_plain()`` method (NormProp layers, weight-
   normalized layers) is replaced by what that returns;
2. each producer -> normalization pair found by :func:`find_pairs` (from the ``torch.fx`` graph of
   the forward, or by structural naming rules) is merged into the producer;
3. every remaining statistics-keeping normalization layer becomes a :class:`ChannelAffine`.

Normalization layers without running statistics (GroupNorm, LayerNorm, BatchNorm with
``track_running_stats=False``) normalize each input with its own statistics and are left as they are.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .base import inference_affine, is_stat_norm
from .checks import check_input
from .pairing import PRODUCERS, find_pairs, is_pair, out_channels
from .surgery import replace_module

__all__ = ["fold", "find_pairs", "fold_pair", "ChannelAffine", "PRODUCERS"]

class ChannelAffine(nn.Module):
    """``y = A x + b`` along dimension 1 of an input ``(N, C, *)``: what a statistics normalization
    layer computes in eval mode.

    ``weight`` is ``A``, either ``(C,)`` (a per-channel scale) or ``(C, C)`` (a channel-mixing matrix,
    e.g. a whitening matrix); ``bias`` is ``b`` ``(C,)``. Computed in the input's dtype.
    """

    def __init__(self, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        c = bias.numel()
        if bias.dim() != 1 or weight.shape not in ((c,), (c, c)):
            raise ValueError(
                f"ChannelAffine: expected bias (C,) and weight (C,) or (C, C), got bias {tuple(bias.shape)} "
                f"and weight {tuple(weight.shape)}"
            )
        self.num_features = c
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.weight.dim() == 1 else "channel-mixing"
        return f"{self.num_features}, {kind}"

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.num_features, training=False)
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if weight.dim() == 1:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return torch.addcmul(bias.reshape(shape), x, weight.reshape(shape))
        return torch.movedim(torch.movedim(x, 1, -1) @ weight.T + bias, -1, 1)


@torch.no_grad()
def fold_pair(producer: nn.Module, norm: nn.Module) -> bool:
    """Merge the eval-mode map of ``norm`` into ``producer``'s weight and bias, in place.

    Returns ``False`` (and changes nothing) when the map cannot be expressed by the producer: a
    channel-mixing ``A`` with a grouped convolution whose groups it mixes across.
    """
    if not isinstance(producer, PRODUCERS):
        raise ValueError(
            f"fold_pair: expected a producer of type {[t.__name__ for t in PRODUCERS]}, got {type(producer).__name__}"
        )
    if not is_stat_norm(norm):
        raise ValueError(
            f"fold_pair: expected a normalization layer with running statistics, got {type(norm).__name__}"
        )
    c = out_channels(producer)
    if norm.num_features != c:
        raise ValueError(
            f"fold_pair: expected the normalization to have {c} features (the producer's output "
            f"channels), got {norm.num_features}"
        )
    a, b = inference_affine(norm)
    w = producer.weight
    # Compute in at least float32 (in float64 for float64 layers), store in the producer's dtype.
    dt = torch.promote_types(w.dtype, torch.float32)
    a, b, wd = a.to(w.device, dt), b.to(w.device, dt), w.to(dt)
    c0 = producer.bias.to(dt) if producer.bias is not None else torch.zeros(c, dtype=dt, device=w.device)
    transposed = isinstance(producer, nn.modules.conv._ConvTransposeNd)
    groups = getattr(producer, "groups", 1)
    if a.dim() == 1:
        if transposed:  # weight (in, out / groups, *k)
            g = wd.reshape(groups, wd.size(0) // groups, wd.size(1), -1)
            new_w = (g * a.reshape(groups, 1, -1, 1)).reshape(wd.shape)
        else:  # weight (out, in / groups, *k)
            new_w = wd * a.reshape(-1, *([1] * (wd.dim() - 1)))
        new_b = a * c0 + b
    else:
        if groups != 1:
            return False
        if transposed:
            new_w = torch.einsum("op,ip...->io...", a, wd)
        else:
            new_w = (a @ wd.reshape(c, -1)).reshape(wd.shape)
        new_b = a @ c0 + b
    w.copy_(new_w.to(w.dtype))
    if producer.bias is None:
        producer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)
    else:
        producer.bias.copy_(new_b.to(producer.bias.dtype))
    return True


def _remove_reparametrizations(model: nn.Module) -> nn.Module:
    from torch.nn.utils.weight_norm import WeightNorm

    for _, m in list(model.named_modules()):
        if parametrize.is_parametrized(m):
            # remove_parametrizations deletes the property from the module's class, which a deep copy
            # shares with the original: give the copy a class of its own first.
            cls = type(m)
            m.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for tensor_name in list(m.parametrizations.keys()):
                parametrize.remove_parametrizations(m, tensor_name, leave_parametrized=True)
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                torch.nn.utils.remove_weight_norm(m, hook.name)

    # as_plain(): NormProp and weight-normalized layers give their plain equivalent. Outermost
    # first; the replacement's own children are not visited again.
    def walk(module: nn.Module, name: str) -> None:
        nonlocal model
        plain = getattr(module, "as_plain", None)
        if callable(plain):
            with torch.no_grad():
                new = plain()
            if not isinstance(new, nn.Module):
                raise ValueError(
                    f"fold: expected {name or '<model>'} ({type(module).__name__}).as_plain() to return an nn.Module, "
                    f"got {type(new).__name__}"
                )
            model = replace_module(model, name, new.eval())
            return
        for child_name, child in list(module.named_children()):
            walk(child, f"{name}.{child_name}" if name else child_name)

    walk(model, "")
    return model


def _hook_weight_memo(model: nn.Module) -> dict[int, Tensor]:
    # torch's hook-based weight_norm keeps the computed weight as a non-leaf tensor attribute, which
    # deepcopy refuses: copy it detached (the hook recomputes it from g and v anyway).
    from torch.nn.utils.weight_norm import WeightNorm

    memo: dict[int, Tensor] = {}
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            w = getattr(m, hook.name, None) if isinstance(hook, WeightNorm) else None
            if isinstance(w, Tensor) and not w.is_leaf:
                memo[id(w)] = w.detach().clone()
    return memo


def fold(model: nn.Module, pairs: Iterable[tuple[str, str]] | None = None) -> nn.Module:
    """An eval-only copy of ``model`` with its normalization layers folded away (module docstring).

    Args:
        model: any module; it is not modified.
        pairs: ``(producer, norm)`` qualified names to merge; by default :func:`find_pairs` of the
            model after re-parametrizations are removed. Give them for models whose ``forward``
            the naming rule does not describe.

    Each paired normalization is merged into its producer and replaced by ``nn.Identity``; every other
    statistics-keeping normalization becomes a :class:`ChannelAffine` (a per-channel scale and shift,
    or a ``(C, C)`` matrix for whitening layers). The result computes what ``model.eval()`` computes,
    up to rounding, and runs under ``torch.jit.trace`` and ``torch.export.export``. It is meant for
    inference only: its folded weights have no meaning for training.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: expected an nn.Module, got {type(model).__name__}")
    out = copy.deepcopy(model, _hook_weight_memo(model)).eval()
    out = _remove_reparametrizations(out).eval()
    chosen = find_pairs(out) if pairs is None else list(pairs)
    modules = dict(out.named_modules())
    for producer_name, norm_name in chosen:  # validate every pair before changing anything
        for n in (producer_name, norm_name):
            if n not in modules:
                raise ValueError(f"fold: no module named {n!r} in the model")
        if not is_pair(modules[producer_name], modules[norm_name]):
            raise ValueError(
                f"fold: cannot fold {norm_name!r} ({type(modules[norm_name]).__name__}) into {producer_name!r} "
                f"({type(modules[producer_name]).__name__}): expected a conv/linear layer followed by a "
                "normalization with running statistics and as many features as the layer's output channels"
            )
    for producer_name, norm_name in chosen:
        if fold_pair(modules[producer_name], modules[norm_name]):
            out = replace_module(out, norm_name, nn.Identity())
    for name, m in list(out.named_modules()):
        if is_stat_norm(m):
            a, b = inference_affine(m)
            dtype = m.weight.dtype if getattr(m, "weight", None) is not None else m.running_mean.dtype
            out = replace_module(out, name, ChannelAffine(a.to(dtype), b.to(dtype)))
    return out.eval()
