"""Pairing a normalization layer with the layer that produces its input.

One function, :func:`find_pairs`, used by folding (which merges the pair) and by Cross-Iteration
BN's conversion (which compensates its window for the producer's weights). A producer is a
convolution or linear layer (:data:`PRODUCERS`) whose output goes straight into the normalization
and nowhere else.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter

import torch.fx as fx
from torch import nn

from .base import is_stat_norm

__all__ = ["PRODUCERS", "out_channels", "is_pair", "find_pairs"]

#: Layers that produce a normalization's input: output channels in dimension 1 of their output.
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


def out_channels(module: nn.Module) -> int:
    """The number of output channels (features) of a producer."""
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _shared(model: nn.Module) -> set[int]:
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {k for k, v in counts.items() if v > 1}


def is_pair(producer: nn.Module, norm: nn.Module, shared: set[int] = frozenset()) -> bool:
    """Whether ``norm`` may take ``producer``'s output: a producer, a statistics-keeping norm of its width,
    neither of them in ``shared`` (modules registered at several places)."""
    return (
        isinstance(producer, PRODUCERS)
        and is_stat_norm(norm)
        and getattr(norm, "num_features", None) == out_channels(producer)
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
        if is_pair(producer, norm, shared):
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
                if is_pair(pa, nb, shared):
                    pairs.append((prefix + a, prefix + b))
            continue
        named = dict(children)
        found: dict[str, list[str]] = {}
        for a, pa in children:
            if not isinstance(pa, PRODUCERS):
                continue
            for b in _name_partners(a):
                if b in named and is_pair(pa, named[b], shared):
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
