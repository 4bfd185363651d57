"""The registry of normalization kinds and :func:`convert`, which swaps them in any model.

Each kind has a short name (``"bn"``, ``"brn"``, ``"gn"``, ...) and a builder that makes a layer of
that kind from an existing normalization layer, carrying ``weight``, ``bias`` and running statistics
over where the target has them (same name and shape). The built-in kinds are the table at the end
of this module; third parties add theirs with :func:`register`. :func:`convert` needs no
per-variant code.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .base import NormBase, carry_settings
from .batch_renorm import BatchRenorm
from .batchnorm import BatchNorm
from .cross_iteration import COMPENSATED, CrossIterationBatchNorm
from .decorrelated import DecorrelatedBatchNorm
from .ghost import GhostBatchNorm
from .kalman import BatchKalmanNorm
from .mean_only import MeanOnlyBatchNorm
from .pairing import find_chains, find_pairs
from .surgery import common_settings, replace_module, transfer_state

__all__ = [
    "register",
    "kinds",
    "convert",
    "ConversionReport",
    "build_normbase",
    "common_settings",
    "transfer_state",
    "replace_module",
]

log = logging.getLogger("normlab")

Builder = Callable[..., nn.Module]
Finalizer = Callable[[nn.Module, "ConversionReport", dict[str, Any]], None]


@dataclass(frozen=True)
class Kind:
    """One registered normalization kind."""

    name: str
    build: Builder  # build(source_layer, **kwargs) -> new layer
    types: tuple[type, ...]  # the classes this kind produces (to recognise them as sources)
    description: str
    source_by_default: bool = True  # whether convert() replaces layers of this kind by default
    finalize: Finalizer | None = None  # finalize(model, report, kwargs) after all swaps


_REGISTRY: dict[str, Kind] = {}


def register(
    name: str,
    build: Builder,
    types: type | tuple[type, ...],
    description: str,
    *,
    source_by_default: bool = True,
    finalize: Finalizer | None = None,
) -> None:
    """Register a normalization kind under ``name`` (a new name or a deliberate replacement)."""
    _REGISTRY[name] = Kind(
        name,
        build,
        types if isinstance(types, tuple) else (types,),
        description,
        source_by_default,
        finalize,
    )


def kinds() -> dict[str, str]:
    """The registered kinds: ``{name: description}``."""
    return {k: v.description for k, v in sorted(_REGISTRY.items())}


def _lookup(name: str) -> Kind:
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"convert: unknown normalization kind {name!r}; known kinds: {known}")
    return _REGISTRY[name]


def build_normbase(cls: type[NormBase]) -> Builder:
    """A builder for a :class:`NormBase` subclass: same settings, shared state copied over.

    The new layer's :meth:`NormBase.adopt` then derives whatever it keeps beyond the copied tensors
    (e.g. Decorrelated BN's whitening matrix from a running variance).
    """

    def build(src: nn.Module, **kwargs: Any) -> nn.Module:
        settings = common_settings(src) | kwargs
        layer = cls(**settings)
        layer.adopt(src, transfer_state(src, layer))
        return layer

    return build


def _build_bn(src: nn.Module, momentum: float | None = 0.1, **kwargs: Any) -> nn.Module:
    origin = src.converted_from if isinstance(src, NormBase) and src.converted_from else type(src)
    cls = origin if isinstance(origin, type) and issubclass(origin, nn.modules.batchnorm._BatchNorm) else BatchNorm
    if cls is nn.SyncBatchNorm:
        kwargs.setdefault("process_group", getattr(src, "process_group", None))
    layer = cls(**(common_settings(src) | {"momentum": momentum} | kwargs))
    transfer_state(src, layer)
    return layer


def _build_gn(src: nn.Module, num_groups: int = 32, **kwargs: Any) -> nn.Module:
    s = common_settings(src) | kwargs
    c = s["num_features"]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(
            f"GroupNorm: expected num_groups to divide num_channels={c}, got num_groups={num_groups!r}"
        )
    layer = nn.GroupNorm(num_groups, c, eps=s["eps"], affine=s["affine"], device=s["device"], dtype=s["dtype"])
    transfer_state(src, layer)
    return layer


def _pair_converted(model: nn.Module, report: ConversionReport, kwargs: dict[str, Any]) -> None:
    """The ``"cbn"`` kind's finalizer: pair each new layer with its producer, report the ones it cannot.

    The pairs are :func:`normlab.pairing.find_pairs`'s (the conv or linear whose output goes straight
    into the norm and nowhere else), restricted to the producers the layer compensates
    (Conv1d/2d/3d, Linear).
    """
    producers = {norm: producer for producer, norm in find_pairs(model)}
    unpaired = []
    for name, _, new_cls in report.converted:
        layer = model.get_submodule(name) if name else model
        if new_cls != CrossIterationBatchNorm.__name__ or not isinstance(layer, CrossIterationBatchNorm):
            continue
        producer = model.get_submodule(producers[name]) if name in producers else None
        if producer is not None and not isinstance(producer, COMPENSATED):
            why = f"its producer {producers[name]!r} is a {type(producer).__name__}, not a Conv1d/2d/3d or Linear"
            producer = None
        elif producer is None:
            why = "no conv or linear layer feeds it directly (see normlab.find_pairs)"
        layer.attach(producer)
        if producer is None:
            report.skipped.append((name, f"not paired ({why}): pools uncompensated statistics"))
            unpaired.append(name or "<model>")
    if unpaired:
        warnings.warn(
            f"convert: {len(unpaired)} CrossIterationBatchNorm layer(s) could not be paired with the conv/linear "
            f"that feeds them and pool uncompensated statistics: {', '.join(unpaired)}; pair them with .attach()",
            stacklevel=3,
        )


def _link_kalman(model: nn.Module, report: ConversionReport, kwargs: dict[str, Any]) -> None:
    """The ``"bkn"`` kind's finalizer: link each new layer to the BKN layer before it, report the links.

    A link is :func:`normlab.pairing.find_chains`'s: a conv or linear feeds the layer, and its input
    is a ReLU or identity of another new layer's output (never across a sum, a pooling or a
    concatenation). Unlinked layers use their observation alone (ghost BN).
    """
    new = {name for name, _, cls in report.converted if cls == BatchKalmanNorm.__name__}
    chains, why = find_chains(model, lambda m: isinstance(m, BatchKalmanNorm))
    for prev, producer, activation, norm in chains:
        if prev in new and norm in new:
            layer = model.get_submodule(norm)
            layer.attach(model.get_submodule(producer), prev=model.get_submodule(prev), activation=activation)
            report.links.append((prev, producer, activation, norm))
    if why is not None and len(new) > 1:
        warnings.warn(f"convert: no BatchKalmanNorm layer was linked: {why}; link them with .attach()", stacklevel=3)


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` as ``(name, old class, new class)``, ``skipped``, and the
    ``links`` it made as ``(prev, producer, activation, norm)`` (Batch Kalman Normalization)."""

    to: str
    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    links: list[tuple[str, str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"convert to {self.to!r}: {len(self.converted)} converted, {len(self.skipped)} skipped"]
        lines += [f"  {n or '<model>'}: {a} -> {b}" for n, a, b in self.converted]
        lines += [f"  {n or '<model>'}: skipped ({why})" for n, why in self.skipped]
        if self.links:
            lines.append(f"  {len(self.links)} link(s): each norm predicts from the one before it")
            lines += [f"  {n}: from {p} through {a} and {c}" for p, c, a, n in self.links]
        return "\n".join(lines)


def _source_types(source: str | Sequence[str] | None) -> tuple[type, ...]:
    if source is None:
        chosen = [k for k in _REGISTRY.values() if k.source_by_default]
    else:
        chosen = [_lookup(s) for s in ([source] if isinstance(source, str) else source)]
    types: tuple[type, ...] = ()
    for k in chosen:
        types += k.types
    return types


def _named_targets(model: nn.Module, types: tuple[type, ...]) -> Iterable[tuple[str, nn.Module]]:
    # A matched layer's own children are not visited: it is replaced as a whole.
    def walk(module: nn.Module, prefix: str) -> Iterable[tuple[str, nn.Module]]:
        if isinstance(module, types):
            yield prefix, module
            return
        for name, child in module.named_children():
            yield from walk(child, f"{prefix}.{name}" if prefix else name)

    yield from walk(model, "")


def convert(
    model: nn.Module,
    to: str,
    *,
    source: str | Sequence[str] | None = None,
    inplace: bool = False,
    report: bool = False,
    **kwargs: Any,
) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace every normalization layer of the source kinds in ``model`` by a layer of kind ``to``.

    Args:
        model: any module (a normalization layer itself is converted too).
        to: a registered kind, e.g. ``"bn"`` (back to torch's BatchNorm), ``"brn"``, ``"gn"``;
            :func:`kinds` lists them. Unknown names raise a ``ValueError`` listing the known ones.
        source: the kinds to replace; by default torch's BatchNorm and every registered normlab kind
            (GroupNorm only when named here, so deliberate GroupNorms are left alone).
        inplace: modify ``model`` itself; by default a deep copy is converted and ``model`` is left
            untouched.
        report: also return a :class:`ConversionReport`.
        **kwargs: settings of the new layers (e.g. ``momentum``, ``group_size``, ``num_groups``).

    ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked`` are carried
    over wherever the new layer has them. Every replaced layer is logged to the ``normlab`` logger;
    a layer that cannot be converted raises (nothing is skipped silently), and a model with nothing
    to convert gives a warning.
    """
    kind = _lookup(to)
    types = _source_types(source)
    if not inplace:
        model = copy.deepcopy(model)
    rep = ConversionReport(to)
    targets = list(_named_targets(model, types))
    built = []  # every layer is built before any is swapped in: a failure leaves the model as it was
    for name, layer in targets:
        try:
            new = kind.build(layer, **kwargs)
        except TypeError as err:  # e.g. an option this kind does not take
            raise ValueError(f"convert: cannot build {to!r} from {name or '<model>'} ({layer}): {err}") from err
        new.train(layer.training)
        built.append(carry_settings(layer, new))
    for (name, layer), new in zip(targets, built):
        model = replace_module(model, name, new)
        rep.converted.append((name, type(layer).__name__, type(new).__name__))
        log.info("normlab.convert: %s: %s -> %s", name or "<model>", type(layer).__name__, type(new).__name__)
    if not targets:
        hint = ""
        if source is None and any(isinstance(m, nn.GroupNorm) for m in model.modules()):
            hint = " (GroupNorm layers are converted only when named: source='gn')"
        warnings.warn(f"convert: found no normalization layer to convert to {to!r}{hint}", stacklevel=2)
    if kind.finalize is not None:
        kind.finalize(model, rep, kwargs)
    return (model, rep) if report else model


# ------------------------------------------------------------------------------------ the built-in kinds
for _kind in (
    Kind(
        "bn",
        _build_bn,
        (nn.modules.batchnorm._BatchNorm,),
        "Batch Normalization (torch's layers; Ioffe & Szegedy 2015)",
    ),
    Kind(
        "gn",
        _build_gn,
        (nn.GroupNorm,),
        "Group Normalization (torch's nn.GroupNorm; Wu & He 2018), option num_groups (default 32)",
        source_by_default=False,
    ),
    Kind(
        "brn",
        build_normbase(BatchRenorm),
        (BatchRenorm,),
        "Batch Renormalization (Ioffe 2017), options r_max, d_max (numbers or paper_schedule())",
    ),
    Kind(
        "dbn",
        build_normbase(DecorrelatedBatchNorm),
        (DecorrelatedBatchNorm,),
        "Decorrelated Batch Normalization (Huang et al. 2018), options group_size, method ('zca', 'pca', "
        "'newton'), iterations",
    ),
    Kind(
        "cbn",
        build_normbase(CrossIterationBatchNorm),
        (CrossIterationBatchNorm,),
        "Cross-Iteration Batch Normalization (Yao et al. 2021), options window (k, default 8), burn_in (steps)",
        finalize=_pair_converted,
    ),
    Kind(
        "ghost",
        build_normbase(GhostBatchNorm),
        (GhostBatchNorm,),
        "Ghost batch normalization (Hoffer et al. 2017): each virtual batch of virtual_batch_size samples "
        "(default 32) normalized with its own statistics",
    ),
    Kind(
        "bkn",
        build_normbase(BatchKalmanNorm),
        (BatchKalmanNorm,),
        "Batch Kalman Normalization (Wang et al. 2018): each micro-batch's statistics combined with the "
        "previous layer's estimate, options p (gain, default 0.9), micro_batch (samples per group)",
        finalize=_link_kalman,
    ),
    Kind(
        "mobn",
        build_normbase(MeanOnlyBatchNorm),
        (MeanOnlyBatchNorm,),
        "Mean-only Batch Normalization (Salimans & Kingma 2016): subtract the batch/running mean, no division",
    ),
):
    _REGISTRY[_kind.name] = _kind
