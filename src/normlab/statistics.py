"""Population statistics, AdaBN domain adaptation, the statistic-shift diagnostic, and freezing.

Everything here works on any layer for which :func:`normlab.base.is_stat_norm` holds (torch's
BatchNorm and every normlab layer that keeps running statistics) through the statistics interface of
:mod:`normlab.base` only: :func:`~normlab.base.batch_moments` gives each batch's ``Moments(count,
mean, var)`` of a layer's input (``var`` biased, of a layer-defined shape), and
:func:`~normlab.base.load_statistics` sets the layer's inference statistics from a population mean
and *unbiased* variance. Layers are found with ``model.named_modules()`` and their inputs are captured
with forward pre-hooks, so a new variant needs no change here.

Population statistics (Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by
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

AdaBN (Li, Wang, Shi, Liu & Hou, "Revisiting Batch Normalization For Practical Domain Adaptation",
arXiv 1603.04779, 2016, Algorithm 1): every neuron ``j`` is standardized at test time
with the mean and standard deviation of its responses over *all* target-domain images,
``y_j = gamma_j (x_j - mu_j^t) / sigma_j^t + beta_j``. :func:`adapt` computes them with exact pooling
(the paper's definition) or, optionally, the Algorithm 2 average.

Batches may be given as any iterable (a list, a ``DataLoader``, a generator) of

* a tensor ``x``: the model is called as ``model(x)``;
* a tuple or list ``(x, y, ...)``: ``model(x)``, the rest (labels) is ignored;
* a mapping: ``model(**batch)``;

or anything else with ``forward=lambda model, batch: ...``. With ``device`` given, every tensor in
a batch is moved there first.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .base import Moments, NormBase, batch_moments, is_stat_norm, load_statistics

__all__ = [
    "recompute_statistics",
    "adapt",
    "statistic_shift",
    "symmetric_kl",
    "freeze",
    "unfreeze",
    "is_frozen",
    "stat_layers",
    "MomentPool",
]

Forward = Callable[[nn.Module, Any], Any]


def stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The statistics-keeping normalization layers of ``model`` (``is_stat_norm``), by qualified name.

    A layer shared by several parents is listed once, under its first name.
    """
    return [(name, m) for name, m in model.named_modules() if is_stat_norm(m)]


# --------------------------------------------------------------------------------------- pooling
def _blocks(delta: Tensor, var: Tensor) -> Tensor | None:
    """``delta`` laid out as the rows of ``var``'s square blocks ``(..., g, g)``, or ``None``.

    The blocks cover consecutive entries of the flattened mean; the last block may be padded at its
    end (a group smaller than the others), the padding being zero.
    """
    if var.dim() < 2 or var.shape[-1] != var.shape[-2]:
        return None
    g, c = var.shape[-1], delta.numel()
    slots = var.numel() // g
    if not c <= slots < c + g:
        return None
    flat = delta.reshape(-1)
    if slots > c:
        flat = torch.cat([flat, flat.new_zeros(slots - c)])
    return flat.reshape(var.shape[:-1])


def _outer(delta: Tensor, var: Tensor) -> Tensor:
    """``delta delta^T`` in the layout of ``var``: elementwise for per-channel variances, per block
    for per-group covariances."""
    if var.shape == delta.shape:
        return delta * delta
    d = _blocks(delta, var)
    if d is None:
        raise ValueError(
            f"exact pooling: expected the variance to have the mean's shape {tuple(delta.shape)} (per-channel) or "
            f"to be square blocks (..., g, g) covering the {delta.numel()} mean entries, got shape {tuple(var.shape)}"
        )
    return d.unsqueeze(-1) * d.unsqueeze(-2)


def _marginal_var(mean: Tensor, var: Tensor) -> Tensor:
    """Per-channel variances: ``var`` itself, or the diagonals of per-group covariance blocks."""
    if var.shape == mean.shape:
        return var.reshape(-1)
    _outer(mean, var)  # validates the layout
    return torch.diagonal(var, dim1=-2, dim2=-1).reshape(-1)[: mean.numel()]


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
        self.second = self.second + m2 + _outer(delta, var) * (self.count * n / total)
        self.mean = self.mean + delta * (n / total)
        self.count = total

    def result(self) -> tuple[Tensor, Tensor]:
        """Population ``(mean, unbiased variance)`` in the dtype of the layer's moments."""
        if self.mean is None:
            raise ValueError("MomentPool: no batch was added")
        if self.mode == "average":
            mean, var = self.mean / self.batches, self.second / self.batches
        else:
            mean, var = self.mean, self.second / (self.count - 1)
        return mean.to(self.dtype), var.to(self.dtype)


# --------------------------------------------------------------------------------------- passes
def _to_device(batch: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _call(model: nn.Module, batch: Any, forward: Forward | None, who: str) -> None:
    if forward is not None:
        forward(model, batch)
    elif isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)) and batch:
        model(batch[0])
    elif isinstance(batch, Mapping):
        model(**batch)
    else:
        raise TypeError(
            f"{who}: expected each batch to be a tensor, a non-empty (x, y, ...) tuple/list or a mapping of "
            f"keyword arguments (or pass forward=), got {type(batch).__name__}"
        )


def _progress(batches: Iterable[Any], enabled: bool, desc: str) -> Iterator[Any]:
    if not enabled:
        yield from batches
        return
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency: fall back to a line per batch
        for i, batch in enumerate(batches, 1):
            print(f"{desc}: batch {i}" + (f"/{total}" if total else ""), file=sys.stderr, flush=True)
            yield batch
        return
    yield from tqdm(batches, total=total, desc=desc)


def _snapshot(layers: list[tuple[str, nn.Module]]) -> list[tuple[nn.Module, dict[str, Tensor]]]:
    return [(m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None}) for _, m in layers]


@torch.no_grad()
def _restore(snapshot: list[tuple[nn.Module, dict[str, Tensor]]]) -> None:
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
    snapshot = _snapshot(layers)
    try:
        model.eval()
        yield
    finally:
        _restore(snapshot)
        for m, flag in flags:
            m.training = flag


class _Stop(Exception):
    """Ends a forward pass early once the wanted layer's input has been captured."""


@torch.no_grad()
def _collect(
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
            for batch in _progress(batches, progress, who):
                try:
                    _call(model, _to_device(batch, device), forward, who)
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


def _finish(pools: dict[str, MomentPool], layers: list[tuple[str, nn.Module]], who: str) -> dict[str, tuple]:
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


def _load_all(stats: dict[str, tuple], layers: list[tuple[str, nn.Module]]) -> None:
    """Load every layer's statistics, or none: a failure restores those already loaded."""
    modules = dict(layers)
    snapshot = _snapshot([(n, modules[n]) for n in stats])
    try:
        for name, (mean, var) in stats.items():
            load_statistics(modules[name], mean, var)
    except Exception:
        _restore(snapshot)
        raise


def _check_mode(who: str, value: str, allowed: tuple[str, ...], what: str = "mode") -> None:
    if value not in allowed:
        raise ValueError(f"{who}: expected {what} one of {', '.join(map(repr, allowed))}, got {value!r}")


def _layers_or_warn(model: nn.Module, who: str) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(model).__name__}")
    layers = stat_layers(model)
    if not layers:
        warnings.warn(f"{who}: the model has no normalization layer with running statistics", stacklevel=3)
    return layers


# --------------------------------------------------------------------------------------- public
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
    who = "recompute_statistics"
    _check_mode(who, mode, ("average", "exact"))
    layers = _layers_or_warn(model, who)
    if not layers:
        return model
    pools, _, _ = _collect(
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
    _load_all(_finish(pools, layers, who), layers)
    return model


def adapt(
    model: nn.Module,
    target_batches: Iterable[Any],
    *,
    mode: str = "one-pass",
    pooling: str = "exact",
    progress: bool = False,
    forward: Forward | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """AdaBN: set every normalization layer's statistics from unlabeled target-domain data.

    Afterwards, in eval mode, every channel is standardized with its target-domain mean and
    variance (Li et al., Algorithm 1); the weights are not touched.

    * ``mode="one-pass"`` (fast): one pass over ``target_batches`` with the normalization layers
      normalizing each batch by its own statistics, as :func:`recompute_statistics` does; each
      layer's input is then that of the network whose earlier layers use the target *batch*
      statistics, close to the adapted ones for large batches.
    * ``mode="layerwise"``: one pass per layer, in the order the layers are called, with the model
      in eval mode: layer ``k``'s statistics are computed on inputs that layers ``1..k-1`` have
      already normalized with their adapted target statistics, which is what the paper's
      per-neuron definition implies for a deep network. Needs a re-iterable ``target_batches``
      (a list or a ``DataLoader``, not a generator); each pass stops at the layer it adapts when
      no layer is called twice per forward.

    ``pooling="exact"`` (default) uses the mean and variance over all target samples, the paper's
    definition; ``pooling="average"`` the Algorithm 2 average of batch statistics. On any error
    every layer keeps its original statistics. Returns ``model`` (modified in place; deep-copy it
    first to keep the source-domain model).
    """
    who = "adapt"
    _check_mode(who, mode, ("one-pass", "layerwise"))
    _check_mode(who, pooling, ("average", "exact"), "pooling")
    if mode == "one-pass":
        return recompute_statistics(
            model, target_batches, mode=pooling, progress=progress, forward=forward, device=device
        )
    if iter(target_batches) is target_batches:
        raise ValueError(
            "adapt: mode='layerwise' passes over the batches once per layer; expected a re-iterable "
            f"(a list, a DataLoader), got a one-shot iterator ({type(target_batches).__name__})"
        )
    layers = _layers_or_warn(model, who)
    if not layers:
        return model
    modules = dict(layers)
    original = _snapshot(layers)
    common = {"pooling": pooling, "batch_stats": False, "forward": forward, "device": device, "who": who}
    try:
        # First pass: the call order, and the first layer's statistics (its input does not depend on
        # any other normalization layer).
        pools, order, calls = _collect(model, layers, target_batches, progress=progress, **common)
        if not order:
            warnings.warn("adapt: no normalization layer received input; nothing changed", stacklevel=2)
            return model
        early_stop = all(c == 1 for c in calls.values())
        _load_all(_finish({order[0]: pools[order[0]]}, [(order[0], modules[order[0]])], who), layers)
        for name in order[1:]:
            one = [(name, modules[name])]
            pools, _, _ = _collect(
                model,
                one,
                target_batches,
                progress=progress,
                stop_after=modules[name] if early_stop else None,
                **common,
            )
            _load_all(_finish(pools, one, who), one)
    except BaseException:
        _restore(original)
        raise
    unseen = [n for n, _ in layers if n not in order]
    if unseen:
        warnings.warn(f"adapt: layers {unseen} received no input; left unchanged", stacklevel=2)
    return model


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
    layers = _layers_or_warn(model, who)
    src_layers = dict(stat_layers(src_model))
    missing = [n for n, _ in layers if n not in src_layers]
    if missing:
        raise ValueError(f"statistic_shift: expected source_model to have the layers {missing} of model")
    kw = {"pooling": "exact", "batch_stats": False, "forward": forward, "device": device, "progress": False, "who": who}
    target, order, _ = _collect(model, layers, target_batches, **kw)
    if source_batches is None:
        source = {n: _stored_statistics(n, src_layers[n]) for n, _ in layers}
    else:
        pools, _, _ = _collect(src_model, [(n, src_layers[n]) for n, _ in layers], source_batches, **kw)
        source = {n: pools[n].result() for n, _ in layers if pools[n].batches}
    out = {}
    for name in order:
        if name not in source:
            continue
        module = dict(layers)[name]
        eps = float(getattr(module, "eps", 1e-5))
        mt, vt = target[name].result()
        ms, vs = source[name]
        vt = _marginal_var(mt, vt).double() + eps
        # A layer that keeps no variance (mean-only) is compared by its means alone.
        vs = vt if vs is None else _marginal_var(ms, vs).double() + eps
        out[name] = float(symmetric_kl(ms.reshape(-1).double(), vs, mt.reshape(-1).double(), vt).mean())
    return out


# --------------------------------------------------------------------------------------- freezing
def _frozen_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    # torch's BatchNorm has no switch for "running statistics in training": run it in eval mode.
    if getattr(module, "frozen", False) and module.training:
        module.training = False
        module._normlab_frozen_in_train = True


def _frozen_post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    if module.__dict__.pop("_normlab_frozen_in_train", False):
        module.training = True


def _has_hook(hooks: Mapping[int, Any], fn: Callable[..., Any]) -> bool:
    return any(h is fn for h in hooks.values())


def freeze(model: nn.Module) -> nn.Module:
    """Normalize with the running statistics also in training mode, and stop updating them.

    The usual fine-tuning setting: ``gamma`` and ``beta`` still get gradients and train; ``x`` gets
    the gradient of the fixed affine map. normlab layers have a ``frozen`` attribute that their
    forward honours; torch's BatchNorm layers keep their class and get ``frozen = True`` plus a
    forward pre-hook and an always-called forward hook that run them in eval mode while the model
    trains (the module's ``training`` flag is set back after each call). Layers without running
    statistics are left alone. Idempotent; undone by :func:`unfreeze`. Returns ``model``.
    """
    for _, m in _layers_or_warn(model, "freeze"):
        m.frozen = True
        if not isinstance(m, NormBase):
            if not _has_hook(m._forward_pre_hooks, _frozen_pre_hook):
                m.register_forward_pre_hook(_frozen_pre_hook)
            if not _has_hook(m._forward_hooks, _frozen_post_hook):
                m.register_forward_hook(_frozen_post_hook, always_call=True)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: batch statistics and running-statistics updates in training again."""
    for _, m in stat_layers(model):
        if isinstance(m, NormBase):
            m.frozen = False
            continue
        if hasattr(m, "frozen"):
            del m.frozen
        # Hooks are found by identity rather than through stored handles, so that unfreeze also
        # works on deep copies and unpickled models.
        for key in [k for k, h in m._forward_pre_hooks.items() if h is _frozen_pre_hook]:
            del m._forward_pre_hooks[key]
        for key in [k for k, h in m._forward_hooks.items() if h is _frozen_post_hook]:
            del m._forward_hooks[key]
            m._forward_hooks_always_called.pop(key, None)
    return model


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer frozen by :func:`freeze`."""
    return is_stat_norm(module) and bool(getattr(module, "frozen", False))
