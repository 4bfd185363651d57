"""Population statistics: the running statistics of every normalization layer recomputed from data.

Everything here works on any layer for which :func:`normlab.base.is_stat_norm` holds (torch's
BatchNorm and every normlab layer that keeps running statistics) through the statistics interface of
:mod:`normlab.base` only: :func:`~normlab.base.batch_moments` gives each batch's ``Moments(count,
mean, var)`` of a layer's input (``var`` biased, of a layer-defined shape), and
:func:`~normlab.base.load_statistics` sets the layer's inference statistics from a population mean
and *unbiased* variance. Layers are found with ``model.named_modules()`` and their inputs are captured
with forward pre-hooks, so a new variant needs no change here.

Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", ICML 2015, Algorithm 2). With the weights fixed, the training
network (every normalization layer normalizing each batch by the batch's own statistics) is run
over minibatches ``B`` of ``m`` samples each and, per layer::

    E[x]   = E_B[mu_B]                          (average of the batch means)
    Var[x] = m / (m - 1) * E_B[sigma_B^2]       (unbiased average of the biased batch variances)

``mode="average"`` is exactly this (with unequal batch sizes, each batch's variance is unbiased with
its own ``m``). ``mode="exact"`` instead pools all samples: the count, mean and sum of squared
deviations ``M2`` of the batches are merged with Chan, Golub & LeVeque's parallel formula::

    n = n_a + n_b,   delta = mu_b - mu_a,   mu = mu_a + delta * n_b / n,
    M2 = M2_a + M2_b + delta delta^T * n_a * n_b / n,       Var[x] = M2 / (n - 1)

which is the mean and unbiased (co)variance of the whole data set, for any batch sizes.

The pass over the data (:func:`collect`) and the pooling (:class:`MomentPool`) are shared with
AdaBN (:mod:`normlab.adabn`) and the statistic-shift diagnostic (:mod:`normlab.diagnostics`).
Batch formats: :mod:`normlab.batches`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .base import Moments, batch_moments, load_statistics, stat_layers
from .batches import Forward, call_model, to_device
from .batches import progress as iterate

__all__ = [
    "recompute_statistics",
    "MomentPool",
    "collect",
    "finish",
    "load_all",
    "check_mode",
    "layers_or_warn",
    "population_statistics",
    "snapshot",
    "restore",
]


def _acc_dtype(t: Tensor) -> torch.dtype:
    # Sums over a whole data set: float64 where the device has it (not on MPS).
    return torch.float64 if t.device.type != "mps" else torch.float32


class MomentPool:
    """Accumulates a layer's per-batch :class:`~normlab.base.Moments` into population statistics.

    ``mode="average"``: Algorithm 2 of Ioffe & Szegedy (average of batch means, average of the
    batch variances each unbiased with its ``m / (m - 1)``). ``mode="exact"``: all samples pooled
    (Chan's parallel merge of count, mean and ``M2``; exact for per-group covariances too).
    """

    def __init__(self, mode: str = "exact") -> None:
        if mode not in ("average", "exact"):
            raise ValueError(f"MomentPool: expected mode 'average' or 'exact', got {mode!r}")
        self.mode = mode
        self.batches = 0
        self.count = 0
        self.mean: Tensor | None = None
        self.second: Tensor | None = None  # sum of unbiased variances ("average") or M2 ("exact")
        self.dtype: torch.dtype | None = None
        self.kind: type[Moments] = Moments  # the layout of the variances (see Moments.outer)

    def add(self, m: Moments) -> None:
        """Merge one batch's moments (``var`` biased, over ``m.count`` samples)."""
        n = int(m.count)
        if n < 2:
            raise ValueError(f"MomentPool: expected more than 1 sample per channel in a batch, got {n}")
        mean = m.mean.detach()
        acc = _acc_dtype(mean)
        mean, var = mean.to(acc), m.var.detach().to(acc)
        if self.mean is not None and (mean.shape != self.mean.shape or var.shape != self.second.shape):
            raise ValueError(
                f"MomentPool: expected every batch to give statistics of the shapes of the first, "
                f"mean {tuple(self.mean.shape)} and variance {tuple(self.second.shape)}, got "
                f"{tuple(mean.shape)} and {tuple(var.shape)}"
            )
        if self.dtype is None:
            self.dtype = m.mean.dtype
            self.kind = type(m)
        self.batches += 1
        if self.mode == "average":
            unbiased = var * (n / (n - 1))
            self.mean = mean if self.mean is None else self.mean + mean
            self.second = unbiased if self.second is None else self.second + unbiased
            self.count += n
            return
        m2 = var * n
        if self.mean is None:
            self.count, self.mean, self.second = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.second = self.second + m2 + m.outer(delta).to(acc) * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def marginal_var(self, mean: Tensor, var: Tensor) -> Tensor:
        """The per-channel variances of a ``(mean, var)`` in the layout of this pool's moments."""
        return self.kind(self.count, mean, var).marginal_var()

    def result(self) -> tuple[Tensor, Tensor]:
        """Population ``(mean, unbiased variance)`` in the dtype of the layer's moments."""
        if self.mean is None:
            raise ValueError("MomentPool: no batch was added")
        if self.mode == "average":
            mean, var = self.mean / self.batches, self.second / self.batches
        else:
            mean, var = self.mean, self.second / (self.count - 1)
        return mean.to(self.dtype), var.to(self.dtype)


def snapshot(layers: list[tuple[str, nn.Module]]) -> list[tuple[nn.Module, dict[str, Tensor]]]:
    return [(m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None}) for _, m in layers]


@torch.no_grad()
def restore(snapshot: list[tuple[nn.Module, dict[str, Tensor]]]) -> None:
    for m, saved in snapshot:
        for k, value in saved.items():
            current = m._buffers.get(k)
            if current is not None and current.shape == value.shape and current.dtype == value.dtype:
                current.copy_(value)  # in place: keeps references held elsewhere (e.g. by DDP) valid
            else:
                m._buffers[k] = value


@contextmanager
def _eval_pass(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> Iterator[None]:
    """Every module in eval mode (dropout off, normalization by the loaded statistics); training
    flags and the buffers of ``layers`` restored on exit."""
    flags = [(m, m.training) for m in model.modules()]
    saved = snapshot(layers)
    try:
        model.eval()
        yield
    finally:
        restore(saved)
        for m, flag in flags:
            m.training = flag


class _Stop(Exception):
    """Ends a forward pass early once the wanted layer's input has been captured."""


@torch.no_grad()
def collect(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    batches: Iterable[Any],
    *,
    pooling: str,
    batch_stats: bool,
    forward: Forward | None,
    device: torch.device | str | None,
    progress: bool,
    who: str,
    stop_after: nn.Module | None = None,
) -> tuple[dict[str, MomentPool], list[str], dict[str, int]]:
    """One pass over ``batches``: the pooled input moments of every layer in ``layers``.

    The model runs in eval mode. With ``batch_stats`` each layer normalizes each input with that
    input's own statistics (mean and *biased* variance loaded before the layer runs: exactly the
    training-mode normalization of batch normalization), otherwise with its loaded statistics.
    The layers' buffers are restored afterwards either way. Also returns the layers in the order
    they are first called and how often each is called in the first forward. With ``stop_after``,
    each forward ends after that layer's input is captured.
    """
    pools = {name: MomentPool(pooling) for name, _ in layers}
    order: list[str] = []
    calls: dict[str, int] = {}
    state = {"first": True}

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if x is None:
                raise ValueError(f"{who}: layer {name or '<model>'} ({type(module).__name__}) was called without input")
            if state["first"]:
                calls[name] = calls.get(name, 0) + 1
            if name not in order:
                order.append(name)
            moments = batch_moments(module, x)
            pools[name].add(moments)
            if batch_stats:
                load_statistics(module, moments.mean, moments.var)
            if module is stop_after:
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name), with_kwargs=True) for name, m in layers]
    seen = 0
    try:
        with _eval_pass(model, layers):
            for batch in iterate(batches, progress, who):
                try:
                    call_model(model, to_device(batch, device), forward, who)
                except _Stop:
                    pass
                seen += 1
                state["first"] = False
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError(f"{who}: expected at least one batch, got an empty iterable")
    return pools, order, calls


def finish(pools: dict[str, MomentPool], layers: list[tuple[str, nn.Module]], who: str) -> dict[str, tuple]:
    """Population statistics of every layer that saw input, all checked finite before any is loaded."""
    out = {}
    for name, m in layers:
        pool = pools[name]
        if pool.batches == 0:
            warnings.warn(f"{who}: layer {name} ({type(m).__name__}) received no input; left unchanged", stacklevel=3)
            continue
        mean, var = pool.result()
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise ValueError(
                f"{who}: layer {name} ({type(m).__name__}) got non-finite statistics (NaN or Inf in the batches "
                "or an overflow in the model); no statistics were changed"
            )
        out[name] = (mean, var)
    return out


def load_all(stats: dict[str, tuple], layers: list[tuple[str, nn.Module]]) -> None:
    """Load every layer's statistics, or none: a failure restores those already loaded."""
    modules = dict(layers)
    saved = snapshot([(n, modules[n]) for n in stats])
    try:
        for name, (mean, var) in stats.items():
            load_statistics(modules[name], mean, var)
    except Exception:
        restore(saved)
        raise


def check_mode(who: str, value: str, allowed: tuple[str, ...], what: str = "mode") -> None:
    if value not in allowed:
        raise ValueError(f"{who}: expected {what} one of {', '.join(map(repr, allowed))}, got {value!r}")


def layers_or_warn(model: nn.Module, who: str) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(model).__name__}")
    layers = stat_layers(model)
    if not layers:
        warnings.warn(f"{who}: the model has no normalization layer with running statistics", stacklevel=4)
    return layers


def recompute_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    mode: str = "average",
    progress: bool = False,
    forward: Forward | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace the running statistics of every normalization layer by population statistics.

    Algorithm 2 of Ioffe & Szegedy: with the weights fixed and without gradients, the model is run
    over ``batches`` in eval mode (dropout off, as at inference) with every normalization layer
    normalizing each batch by that batch's own statistics, which is what batch normalization does in
    training: before each layer runs, the batch mean and biased variance (covariance for whitening
    layers) of its input are loaded as its statistics through the statistics interface. This keeps
    the pass independent of the moving averages being replaced and of each variant's training-only
    machinery (Batch Renorm's ``r``, ``d``, which then are 1 and 0; Cross-Iteration BN's window).
    Each layer's input moments are captured by a forward pre-hook and pooled:

    * ``mode="average"``: mean of the batch means and ``m/(m-1)`` times the mean of the biased batch
      variances (Algorithm 2);
    * ``mode="exact"``: the mean and unbiased (co)variance of all samples seen, pooled exactly.

    Nothing is loaded until the whole pass succeeded and every statistic is finite: a bad batch
    raises and leaves every layer as it was. Training flags are restored; momentum, ``frozen`` and
    every buffer but the loaded statistics (``num_batches_tracked``, which schedules such as Batch
    Renorm's read; windows) are left as they were. A layer called twice per forward pools both
    calls; a layer never called is left unchanged, with a warning. See the module docstring for the
    accepted batch formats.

    Returns ``model`` (modified in place).
    """
    return population_statistics(model, batches, mode, progress, forward, device, "recompute_statistics")


def population_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    mode: str,
    progress: bool,
    forward: Forward | None,
    device: torch.device | str | None,
    who: str,
) -> nn.Module:
    """:func:`recompute_statistics` for a tool named ``who`` (in its messages)."""
    check_mode(who, mode, ("average", "exact"))
    layers = layers_or_warn(model, who)
    if not layers:
        return model
    pools, _, _ = collect(
        model,
        layers,
        batches,
        pooling=mode,
        batch_stats=True,
        forward=forward,
        device=device,
        progress=progress,
        who=who,
    )
    load_all(finish(pools, layers, who), layers)
    return model
