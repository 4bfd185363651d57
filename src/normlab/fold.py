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
import re
import warnings
from collections import Counter
from collections.abc import Iterable

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .base import check_input, inference_affine, is_stat_norm
from .registry import replace_module

__all__ = ["fold", "find_pairs", "fold_pair", "ChannelAffine", "PRODUCERS"]

#: Layers a normalization can be folded into: output channels in dimension 1 of their output.
PRODUCERS: tuple[type, ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

# ResNet-style attribute names: a producer ``<a>conv<b>`` / ``<a>linear<b>`` / ``<a>fc<b>`` pairs with a
# sibling ``<a>bn<b>`` or ``<a>norm<b>`` (conv1 -> bn1, conv_a -> bn_a, fc1 -> bn1, linear -> norm).
_PRODUCER_TOKENS = ("conv", "linear", "fc")
_NORM_TOKENS = ("bn", "norm")


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


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _shared(model: nn.Module) -> set[int]:
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {k for k, v in counts.items() if v > 1}


def _foldable(producer: nn.Module, norm: nn.Module, shared: set[int]) -> bool:
    return (
        isinstance(producer, PRODUCERS)
        and is_stat_norm(norm)
        and getattr(norm, "num_features", None) == _out_channels(producer)
        and id(producer) not in shared
        and id(norm) not in shared
    )


def _name_partners(name: str) -> list[str]:
    out = []
    for token in _PRODUCER_TOKENS:
        for match in re.finditer(token, name):
            for repl in _NORM_TOKENS:
                out.append(name[: match.start()] + repl + name[match.end() :])
    return out


class _Tracer(fx.Tracer):
    """Symbolic tracer that keeps normalization layers, producers and ``as_plain`` layers whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            is_stat_norm(m)
            or isinstance(m, PRODUCERS)
            or callable(getattr(m, "as_plain", None))
            or super().is_leaf_module(m, module_qualified_name)
        )


def _graph_pairs(model: nn.Module) -> list[tuple[str, str]]:
    graph = _Tracer().trace(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    shared = _shared(model)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue  # not fed by a module, or the producer's output is also used elsewhere
        if calls[node.target] > 1 or calls[src.target] > 1:
            continue
        producer, norm = model.get_submodule(src.target), model.get_submodule(node.target)
        if _foldable(producer, norm, shared):
            pairs.append((src.target, node.target))
    return pairs


def _rule_pairs(model: nn.Module) -> list[tuple[str, str]]:
    shared = _shared(model)
    pairs: list[tuple[str, str]] = []
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        if isinstance(parent, nn.Sequential):
            for (a, pa), (b, nb) in zip(children, children[1:]):
                if _foldable(pa, nb, shared):
                    pairs.append((prefix + a, prefix + b))
            continue
        named = dict(children)
        found: dict[str, list[str]] = {}
        for a, pa in children:
            if not isinstance(pa, PRODUCERS):
                continue
            for b in _name_partners(a):
                if b in named and _foldable(pa, named[b], shared):
                    found.setdefault(b, []).append(a)
                    break
        for b, producers in found.items():
            if len(producers) == 1:
                pairs.append((prefix + producers[0], prefix + b))
    return pairs


def find_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(producer, norm)`` qualified names of the statistics-keeping normalization layers applied
    directly to the output of a convolution or linear layer (:data:`PRODUCERS`).

    The model's ``forward`` is traced symbolically with ``torch.fx`` (normalization layers and
    producers kept whole): a pair is a normalization whose only input is a producer's output that
    nothing else uses, each module being called once. This finds the pairs of any traceable model
    whatever its module names, and never pairs a normalization that comes *before* the layer (as
    in pre-activation ResNets).

    Where the forward cannot be traced (data-dependent control flow), a warning is given and two
    structural rules are used instead:

    * in an ``nn.Sequential``, a producer immediately followed by a normalization layer;
    * elsewhere, ResNet-style naming: a producer child ``<a>conv<b>`` (or ``linear``, ``fc``) and a
      normalization child ``<a>bn<b>`` (or ``norm``) of the same parent, e.g. ``conv1`` and ``bn1``,
      trusting that ``forward`` computes ``bn1(conv1(x))`` and uses ``conv1``'s output nowhere else
      (pass explicit pairs to :func:`fold` where it does not).

    Either way the normalization's ``num_features`` must equal the producer's output channels, and
    a module registered at more than one place is never paired. Linear producers assume
    ``(N, features)`` inputs, where their features are dimension 1 as the normalization expects.
    """
    try:
        return _graph_pairs(model)
    except Exception as err:  # any tracing failure: fall back to the rules
        warnings.warn(
            f"find_pairs: cannot trace {type(model).__name__}.forward with torch.fx ({type(err).__name__}: {err}); "
            "pairing by the nn.Sequential and conv<N>/bn<N> naming rules",
            stacklevel=2,
        )
        return _rule_pairs(model)


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
    c = _out_channels(producer)
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
        if not _foldable(modules[producer_name], modules[norm_name], set()):
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
