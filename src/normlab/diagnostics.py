"""Conditioning diagnostics: eigenvalue spectra and condition numbers of per-group covariances.

Decorrelated Batch Normalization (Huang et al., CVPR 2018, arXiv 1804.08450) motivates whitening by
the conditioning of a layer's input: the condition number ``lambda_max / lambda_min`` of the
covariance of the activations. These functions measure it over a batch, per group of consecutive
channels (the groups :class:`normlab.DecorrelatedBatchNorm` whitens), so the lab can compare a
layer's input and output spectra:

* :func:`covariance_spectrum` -- eigenvalues of the biased covariance of each channel group of ``x``;
* :func:`condition_number` -- ``(lambda_max + eps) / (lambda_min + eps)`` per group;
* :class:`SpectrumRecorder` -- a forward hook that records a layer's input and output spectra at every
  call; :func:`layer_spectra` runs one batch through a model with it.

Covariances are over the ``m = N * prod(spatial)`` samples of each channel (as the layers take their
statistics) and their eigenvalues are computed in float64.

The statistic shift (:func:`statistic_shift`): per normalization layer, how far the statistics of
its input on a source and a target domain are apart (symmetric KL divergence of per-channel
Gaussians), the quantity AdaBN (:func:`normlab.adapt`) removes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .base import stat_layers
from .batches import Forward
from .decorrelated import group_covariance
from .population import MomentPool, collect, layers_or_warn

__all__ = [
    "covariance_spectrum",
    "condition_number",
    "SpectrumRecord",
    "SpectrumRecorder",
    "layer_spectra",
    "statistic_shift",
    "symmetric_kl",
]


def _check(name: str, x: Tensor, group_size: int | None) -> int:
    if not isinstance(x, Tensor) or x.dim() < 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a floating-point tensor (N, C, *), got {shape}")
    if x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(x.shape)}")
    c = x.size(1)
    if group_size is None:
        return c
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{name}: expected group_size to be a positive int or None, got {group_size!r}")
    return group_size


@torch.no_grad()
def covariance_spectrum(x: Tensor, group_size: int | None = None) -> list[Tensor]:
    """Eigenvalues, in descending order, of the covariance of each channel group of ``x`` (N, C, *).

    Groups are consecutive channels of ``group_size`` (``None``: all channels in one group; the last
    group is smaller when ``C`` is not a multiple). Returns one float64 tensor per group.
    """
    return _spectrum("covariance_spectrum", x, group_size)


def _spectrum(name: str, x: Tensor, group_size: int | None) -> list[Tensor]:
    g = _check(name, x, group_size)
    c = x.size(1)
    _, cov, _ = group_covariance(x.double(), g)
    g = cov.size(-1)
    full = c // g
    out = list(torch.linalg.eigvalsh(cov[:full]).flip(-1).unbind(0)) if full else []
    r = c - full * g
    if r:
        out.append(torch.linalg.eigvalsh(cov[full, :r, :r]).flip(-1))
    return out


@torch.no_grad()
def condition_number(x: Tensor, group_size: int | None = None, eps: float = 0.0) -> Tensor:
    """``(lambda_max + eps) / (lambda_min + eps)`` of each group's covariance of ``x``: a float64 tensor (G,).

    ``inf`` for a singular covariance with ``eps = 0`` (eigenvalues at or below rounding are taken as 0).
    Pass the layer's ``eps`` to measure the conditioning of the matrix a layer actually inverts.
    """
    spectra = _spectrum("condition_number", x, group_size)
    return torch.stack([_condition(s, eps) for s in spectra])


def _condition(eigenvalues: Tensor, eps: float) -> Tensor:
    top = eigenvalues[0].clamp_min(0) + eps
    # Eigenvalues below the rounding of the largest are indistinguishable from zero.
    floor = eigenvalues.size(0) * torch.finfo(eigenvalues.dtype).eps * top
    low = eigenvalues[-1].clamp_min(0) + eps
    if low <= floor:
        return torch.tensor(float("inf"), dtype=eigenvalues.dtype)
    return top / low


@dataclass
class SpectrumRecord:
    """The spectra of one forward call: per-group eigenvalues of the layer's input and output."""

    input: list[Tensor]
    output: list[Tensor]
    eps: float = 0.0

    @property
    def input_condition(self) -> Tensor:
        """Condition number per group of the input covariance (float64, (G,))."""
        return torch.stack([_condition(s, self.eps) for s in self.input])

    @property
    def output_condition(self) -> Tensor:
        """Condition number per group of the output covariance (float64, (G,))."""
        return torch.stack([_condition(s, self.eps) for s in self.output])


@dataclass
class SpectrumRecorder:
    """Record the input and output covariance spectra of ``layer`` at each forward call.

    A forward hook (removed by :meth:`remove` or on leaving a ``with`` block) appends one
    :class:`SpectrumRecord` to :attr:`records` per call. ``group_size`` defaults to the layer's own
    ``group_size`` when it has one (a :class:`normlab.DecorrelatedBatchNorm`), else all channels.
    The recording adds an eigendecomposition per group and call; it does not change the forward.
    """

    layer: nn.Module
    group_size: int | None = None
    eps: float = 0.0
    records: list[SpectrumRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.group_size is None:
            self.group_size = getattr(self.layer, "group_size", None)
        self._handle = self.layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0]
        with torch.no_grad():
            self.records.append(
                SpectrumRecord(
                    covariance_spectrum(x.detach(), self.group_size),
                    covariance_spectrum(output.detach(), self.group_size),
                    self.eps,
                )
            )

    def remove(self) -> None:
        """Remove the hook (recorded spectra are kept)."""
        self._handle.remove()

    def __enter__(self) -> SpectrumRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def layer_spectra(
    model: nn.Module, layer: nn.Module, batch: Tensor, group_size: int | None = None, eps: float = 0.0
) -> SpectrumRecord:
    """Run ``model(batch)`` without gradients and return the spectra of ``layer``'s input and output.

    The model runs in its current mode: in training mode the layers use (and move) batch statistics
    as in any training forward; call ``model.eval()`` first for the inference map.
    """
    with SpectrumRecorder(layer, group_size, eps) as rec, torch.no_grad():
        model(batch)
    if not rec.records:
        raise ValueError(f"layer_spectra: the layer {type(layer).__name__} was not called by the model's forward")
    return rec.records[-1]


# --------------------------------------------------------------------------------------- statistic shift
def symmetric_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """``KL(N1 || N2) + KL(N2 || N1)`` of univariate Gaussians, elementwise.

    Equals ``(var1/var2 + var2/var1)/2 - 1 + (mean1 - mean2)^2 (1/var1 + 1/var2)/2``.
    """
    d2 = (mean1 - mean2).square()
    return 0.5 * (var1 / var2 + var2 / var1) - 1 + 0.5 * d2 * (1 / var1 + 1 / var2)


def _stored_statistics(name: str, module: nn.Module) -> tuple[Tensor, Tensor]:
    mean = getattr(module, "running_mean", None)
    var = getattr(module, "running_var", None)
    if not isinstance(mean, Tensor):
        raise ValueError(
            f"statistic_shift: layer {name} ({type(module).__name__}) has no running_mean to compare with; "
            "pass source_batches"
        )
    return mean, var


def statistic_shift(
    model: nn.Module,
    source_batches: Iterable[Any] | None,
    target_batches: Iterable[Any],
    *,
    source_model: nn.Module | None = None,
    forward: Forward | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Per layer, how far the source and target statistics of its input are apart.

    For every normalization layer, the mean over channels of the symmetric KL divergence (see
    :func:`symmetric_kl`) between the per-channel Gaussians ``N(mean, var + eps)`` of the source and
    the target statistics (``eps`` the layer's own, which also keeps constant channels finite).
    For layers with per-group covariances the per-channel marginals (their diagonals) are used.

    * Target statistics: the exact mean and variance of the layer's input when ``target_batches``
      run through ``model`` in eval mode.
    * Source statistics: the same for ``source_batches`` through ``source_model`` (default
      ``model``); with ``source_batches=None``, the statistics stored in ``source_model``'s layers
      (``running_mean``/``running_var``), i.e. what the layer normalizes with; a layer that keeps no
      variance (mean-only) is then compared by its means alone.

    Typical use: ``statistic_shift(model, None, target)`` before and after :func:`adapt`: large where
    the domain shift reaches a layer, and zero after a layer-wise exact adaptation, since every layer
    then normalizes with its target statistics. ``statistic_shift(adapted, source, target,
    source_model=model)`` compares what each layer sees on the source domain with the source model
    and on the target domain with the adapted one. Returns ``{layer name: divergence}`` in call order.
    """
    who = "statistic_shift"
    src_model = model if source_model is None else source_model
    layers = layers_or_warn(model, who)
    src_layers = dict(stat_layers(src_model))
    missing = [n for n, _ in layers if n not in src_layers]
    if missing:
        raise ValueError(f"statistic_shift: expected source_model to have the layers {missing} of model")
    kw = {"pooling": "exact", "batch_stats": False, "forward": forward, "device": device, "progress": False, "who": who}
    target, order, _ = collect(model, layers, target_batches, **kw)
    source_pools: dict[str, MomentPool] = {}
    if source_batches is None:
        source = {n: _stored_statistics(n, src_layers[n]) for n, _ in layers}
    else:
        source_pools, _, _ = collect(src_model, [(n, src_layers[n]) for n, _ in layers], source_batches, **kw)
        source = {n: source_pools[n].result() for n, _ in layers if source_pools[n].batches}
    out = {}
    for name in order:
        if name not in source:
            continue
        module = dict(layers)[name]
        eps = float(getattr(module, "eps", 1e-5))
        mt, vt = target[name].result()
        ms, vs = source[name]
        vt = target[name].marginal_var(mt, vt).double() + eps
        # A layer that keeps no variance (mean-only) is compared by its means alone.
        if vs is not None:
            pool = source_pools.get(name)
            vs = (pool.marginal_var(ms, vs) if pool is not None else vs.reshape(-1)).double() + eps
        else:
            vs = vt
        out[name] = float(symmetric_kl(ms.reshape(-1).double(), vs, mt.reshape(-1).double(), vt).mean())
    return out
