"""The registry of normalization kinds and :func:`convert`, which swaps them in any model.

Each kind has a short name (``"bn"``, ``"brn"``, ``"gn"``, ...) and a builder that makes a layer of
that kind from an existing normalization layer, carrying ``weight``, ``bias`` and running statistics
over where the target has them (same name and shape). Variants register themselves with
:func:`register` when their module is imported; :func:`convert` needs no per-variant code.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import NormBase

__all__ = ["register", "kinds", "convert", "ConversionReport", "common_settings", "transfer_state", "replace_module"]

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


def common_settings(layer: nn.Module) -> dict[str, Any]:
    """The torch-convention constructor settings of a normalization layer.

    ``num_features``, ``eps``, ``affine``, ``track_running_stats``, ``device`` and ``dtype`` (the
    latter two from its parameters or buffers). ``momentum`` is not carried: each kind keeps its own
    default unless the caller passes one.
    """
    num = getattr(layer, "num_features", None) or getattr(layer, "num_channels", None)
    tensors = [t for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)) if t is not None]
    floats = [t for t in tensors if t.is_floating_point()]
    params = list(layer.parameters(recurse=False))
    ref = params[0] if params else (floats[0] if floats else None)
    return {
        "num_features": int(num),
        "eps": float(getattr(layer, "eps", 1e-5)),
        "affine": bool(getattr(layer, "affine", getattr(layer, "elementwise_affine", True))),
        "track_running_stats": bool(getattr(layer, "track_running_stats", True)),
        "device": ref.device if ref is not None else None,
        "dtype": ref.dtype if ref is not None else None,
    }


@torch.no_grad()
def transfer_state(src: nn.Module, dst: nn.Module) -> list[str]:
    """Copy every parameter/buffer that ``src`` and ``dst`` share by name and shape; return the names."""
    dst_state = dict(dst.named_parameters(recurse=False)) | {
        k: v for k, v in dst.named_buffers(recurse=False) if v is not None
    }
    copied = []
    for name, value in [*src.named_parameters(recurse=False), *src.named_buffers(recurse=False)]:
        target = dst_state.get(name)
        if value is None or target is None or target.shape != value.shape:
            continue
        target.copy_(value.to(target.dtype))
        copied.append(name)
    return copied


def build_normbase(cls: type[NormBase]) -> Builder:
    """A builder for a :class:`NormBase` subclass: same settings, shared state copied over."""

    def build(src: nn.Module, **kwargs: Any) -> nn.Module:
        settings = common_settings(src) | kwargs
        layer = cls(**settings)
        transfer_state(src, layer)
        return layer

    return build


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``converted`` as ``(name, old class, new class)``, and ``skipped``."""

    to: str
    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"convert to {self.to!r}: {len(self.converted)} converted, {len(self.skipped)} skipped"]
        lines += [f"  {n or '<model>'}: {a} -> {b}" for n, a, b in self.converted]
        lines += [f"  {n or '<model>'}: skipped ({why})" for n, why in self.skipped]
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


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the qualified ``name`` in ``model``; return the model (``new`` itself for ``""``)."""
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


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
    for name, layer in targets:
        try:
            new = kind.build(layer, **kwargs)
        except TypeError as err:  # e.g. an option this kind does not take
            raise ValueError(f"convert: cannot build {to!r} from {name or '<model>'} ({layer}): {err}") from err
        new.train(layer.training)
        # Remember the first class in a chain of conversions, so convert(..., "bn") restores it.
        new._normlab_origin = getattr(layer, "_normlab_origin", type(layer))
        for attr in ("frozen", "process_group"):
            if hasattr(layer, attr) and hasattr(new, attr):
                setattr(new, attr, getattr(layer, attr))
        model = replace_module(model, name, new)
        rep.converted.append((name, type(layer).__name__, type(new).__name__))
        log.info("normlab.convert: %s: %s -> %s", name or "<model>", type(layer).__name__, type(new).__name__)
    if not targets:
        warnings.warn(f"convert: found no normalization layer to convert to {to!r}", stacklevel=2)
    if kind.finalize is not None:
        kind.finalize(model, rep, kwargs)
    return (model, rep) if report else model
