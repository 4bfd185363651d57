"""Pairing a normalization layer with the layer that produces its input.

One function, :func:`find_pairs`, used by folding (which merges the pair) and by Cross-Iteration
BN's conversion (which compensates its window for the producer's weights). A producer is a
convolution or linear layer (:data:`PRODUCERS`) whose output goes straight into the normalization
and nowhere else. :func:`find_chains` extends a pair backwards through an elementwise activation to
the normalization before it (Batch Kalman Normalization's links).
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .base import is_stat_norm

__all__ = ["PRODUCERS", "out_channels", "is_pair", "find_pairs", "find_chains"]

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


_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")


def _activation(node: fx.Node, model: nn.Module) -> str | None:
    """``"relu"``/``"identity"`` for a one-input elementwise ReLU or identity node, else ``None``."""
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        if isinstance(module, nn.ReLU):
            return "relu"
        if isinstance(module, nn.Identity):
            return "identity"
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return "relu"
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return "relu"
    return None


def find_chains(
    model: nn.Module, is_link: Callable[[nn.Module], bool]
) -> tuple[list[tuple[str, str, str, str]], str | None]:
    """``(prev, producer, activation, norm)`` for each norm that takes a producer's output, whose input
    is ``activation(prev(...))`` for another norm ``prev``, both satisfying ``is_link``.

    Found on the ``torch.fx`` graph of ``model.forward`` (as :func:`find_pairs`): the producer is a
    conv or linear called once whose output only the norm uses; between ``prev`` and the producer
    sits nothing, or one ReLU (module, function or method) or ``nn.Identity``, so a chain never
    crosses an addition, a pooling or a concatenation. A ``prev`` that would feed several norms
    feeds none. Returns the chains and, where the forward cannot be traced, why (no chains then).
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # any tracing failure: no chains rather than guessed ones
        return [], f"cannot trace {type(model).__name__}.forward with torch.fx ({type(err).__name__}: {err})"
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    shared = _shared(model)
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or calls[node.target] > 1:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1 or calls[src.target] > 1:
            continue
        producer, norm = model.get_submodule(src.target), model.get_submodule(node.target)
        if not (is_link(norm) and is_pair(producer, norm, shared)) or len(src.args) != 1 or src.kwargs:
            continue
        before = src.args[0]
        activation = "identity"
        if isinstance(before, fx.Node) and (found := _activation(before, model)) is not None and before.args:
            activation, before = found, before.args[0]
        if not isinstance(before, fx.Node) or before.op != "call_module" or calls[before.target] > 1:
            continue
        prev = model.get_submodule(before.target)
        if is_link(prev) and id(prev) not in shared and prev is not norm:
            chains.append((before.target, src.target, activation, node.target))
    fed = Counter(c[0] for c in chains)
    return [c for c in chains if fed[c[0]] == 1], None
