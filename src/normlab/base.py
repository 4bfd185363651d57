"""The layer base: declared tool state, the one forward skeleton, running statistics, the statistics interface.

Conventions (every layer follows them; see also ``docs/conventions.md``):

* Input ``(N, C, *)`` of any rank >= 2 (MLP, 1-D, 2-D, 3-D); statistics are taken over every
  dimension except the channel dimension 1, i.e. over ``m = N * prod(spatial)`` samples.
* Constructor: ``num_features`` first; ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
  ``device``, ``dtype`` with torch's meaning and order; the variant's own options keyword-only.
  ``momentum=None`` is a cumulative moving average, as in :class:`torch.nn.BatchNorm2d`.
* 1-D ``weight``/``bias``; ``running_mean``, ``running_var`` (unbiased variance, as torch stores it)
  and ``num_batches_tracked`` with the meaning they have in ``nn.BatchNorm2d`` wherever the variant
  keeps them, so a torch BatchNorm checkpoint loads into the variant and back.
* Half and bfloat16 inputs compute statistics in float32; running statistics stay float32 even
  after ``module.half()`` / ``module.to(torch.bfloat16)``.
* Bad input raises a ``ValueError`` naming the layer, what was expected and what was given, before
  any state is touched.

The forward skeleton (:meth:`NormBase.forward`) is the same for every batch-statistics layer:

1. check the input (:meth:`NormBase.check_input`);
2. in eval mode, or when frozen, normalize with the running statistics (:meth:`NormBase.normalize_running`);
3. otherwise take the batch statistics, local or over the layer's process group, and normalize with
   them (:meth:`NormBase.normalize_batch`, which returns the output and a :class:`BatchStats`);
4. in training, unless the batch's statistics are not finite (:meth:`ToolState.statistics_are_finite`,
   see ``on_nonfinite``), record the step (:meth:`NormBase.record_step`): move the running
   statistics towards the batch's (:meth:`NormBase.update_running`) when tracking them, and
   whatever other state the variant keeps per step. Only this step changes state.

A variant overrides only the steps its paper changes.

Tool state. What :func:`normlab.freeze`, :func:`normlab.sync` and :func:`normlab.convert` change
is declared on :class:`ToolState` (which :class:`NormBase` and :class:`normlab.BatchNorm` share):
``frozen``, ``process_group`` and ``converted_from``, set through :meth:`ToolState.configure`;
:func:`carry_settings` carries them from a layer to its replacement. torch's own BatchNorm layers
declare nothing; they are frozen by a pair of forward hooks (:func:`set_frozen`).

The statistics interface (used by population statistics, AdaBN, folding and the diagnostics) is
three methods that each statistics-keeping layer implements:

* :meth:`NormBase.moments` -- per-batch sufficient statistics of the layer's input,
* :meth:`NormBase.load_statistics` -- set the inference statistics from population statistics,
* :meth:`NormBase.inference_affine` -- the eval-mode map ``y = A x + b`` along the channels.

:func:`batch_moments`, :func:`load_statistics` and :func:`inference_affine` dispatch to those methods
and implement them for torch's own BatchNorm layers, so tools need no per-variant code.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks, comm, kernels
from .checks import check_input, check_placement, check_settings, layer_name
from .comm import resolve_group
from .kernels import LOW_PRECISION, buffer_dtype, channel_moments, constant, params_in, running_update

__all__ = [
    "Moments",
    "BatchStats",
    "ToolState",
    "NormBase",
    "carry_settings",
    "settings_of",
    "set_frozen",
    "is_frozen",
    "step_factor",
    "update_running_stats",
    "is_stat_norm",
    "stat_layers",
    "batch_moments",
    "load_statistics",
    "write_statistics",
    "inference_affine",
]

_STAT_BUFFERS = ("running_mean", "running_var")


class Moments(NamedTuple):
    """Sufficient statistics of one batch, as a layer sees its input.

    ``count`` is the number of samples per channel (``m``), ``mean`` the batch mean and ``var`` the
    *biased* second central moment: a per-channel variance ``(C,)`` for channel-wise layers. A layer
    that whitens with something else (per-group covariances) returns a subclass whose
    :meth:`outer` and :meth:`marginal_var` know that layout; tools use only these two methods.
    """

    count: int
    mean: Tensor
    var: Tensor

    def outer(self, delta: Tensor) -> Tensor:
        """``delta delta^T`` of a mean difference in the layout of ``var`` (elementwise here)."""
        if self.var.shape != delta.shape:
            raise ValueError(
                f"exact pooling: expected a per-channel variance of the mean's shape {tuple(delta.shape)}, "
                f"got shape {tuple(self.var.shape)}"
            )
        return delta * delta

    def marginal_var(self) -> Tensor:
        """The per-channel variances ``(C,)`` (the diagonal, for layouts with covariances)."""
        return self.var.reshape(-1)


class BatchStats(NamedTuple):
    """What a training step measured, for its running-statistics update.

    ``mean`` and the *biased* ``var`` over ``count`` samples (the global batch when synchronized);
    ``extra`` holds what a variant's update needs besides (e.g. a whitening matrix).
    """

    mean: Tensor
    var: Tensor | None
    count: Tensor | float
    extra: tuple[Any, ...] = ()


# --------------------------------------------------------------------------------------- tool state
class ToolState:
    """The settings that normlab's tools change on a layer, declared with their meaning.

    * ``frozen`` (see :func:`normlab.freeze`): normalize with the running statistics in training
      too, and keep them fixed; ``weight``/``bias`` still train.
    * ``process_group`` (see :func:`normlab.sync`): ``None`` for local batch statistics, or the
      :class:`normlab.comm.GroupRef` (or torch ``ProcessGroup``) to take them over.
    * ``converted_from``: the class the layer was converted from (the first of a chain of
      conversions), so that ``convert(model, "bn")`` restores torch's own class; ``None`` if built
      directly.
    * ``on_nonfinite``: what a training batch whose statistics are not finite (NaN or Inf in the
      input, or values whose squares overflow) does. ``"skip"`` (the default): its output is what
      it is (as torch's), but nothing it measured reaches the layer's state (running statistics,
      counters, windows, whitening matrices), and the layer warns once. ``"raise"``: a
      ``ValueError``, with the state untouched.
    """

    frozen: bool = False
    process_group: Any | None = None
    converted_from: type | None = None
    on_nonfinite: str = "skip"

    def _init_tool_state(self) -> None:
        self.frozen = False
        self.process_group = None
        self.converted_from = None
        self.on_nonfinite = "skip"
        self._warned_nonfinite = False

    def configure(
        self,
        *,
        frozen: bool | None = None,
        process_group: Any | None = ...,  # type: ignore[assignment]
        converted_from: type | None = ...,  # type: ignore[assignment]
        on_nonfinite: str | None = None,
    ) -> ToolState:
        """Set any of the tool settings (unnamed ones are kept); returns the layer."""
        if frozen is not None:
            if not isinstance(frozen, bool):
                raise TypeError(f"{layer_name(self)}: expected frozen to be a bool, got {type(frozen).__name__}")
            self.frozen = frozen
        if process_group is not ...:
            self.process_group = process_group
        if converted_from is not ...:
            if converted_from is not None and not isinstance(converted_from, type):
                raise TypeError(f"{layer_name(self)}: expected converted_from to be a class or None")
            self.converted_from = converted_from
        if on_nonfinite is not None:
            if on_nonfinite not in NONFINITE:
                raise ValueError(f"{layer_name(self)}: expected on_nonfinite in {NONFINITE}, got {on_nonfinite!r}")
            self.on_nonfinite = on_nonfinite
        return self

    def statistics_are_finite(self, *tensors: Any) -> bool:
        """Whether every tensor in ``tensors`` (nested tuples allowed) is finite; else warn or raise.

        The guard of :attr:`on_nonfinite`, called before a training step changes any state. One
        host synchronization. Under ``torch.compile`` it is skipped (a data-dependent branch would
        break the graph): there a non-finite batch reaches the state, as in torch's BatchNorm.
        """
        if torch.compiler.is_compiling():
            return True
        flat = [t for t in _tensors(tensors) if t.is_floating_point()]
        if not flat:
            return True
        # One sum: NaN and Inf propagate through it (Inf - Inf is NaN), and it is cheaper than an
        # isfinite per tensor. Statistics so large that their sum overflows count as non-finite too.
        total = flat[0].sum(dtype=torch.float64 if flat[0].dtype == torch.float64 else torch.float32)
        for t in flat[1:]:
            total = total.add_(t.sum(dtype=total.dtype))
        # The test on the host (one read of the sum, the synchronization the guard needs anyway):
        # an isfinite on the tensor would add several small ops per step.
        if math.isfinite(total.item()):
            return True
        message = (
            f"{layer_name(self)}: a training batch gave non-finite statistics (NaN or Inf in the input, or "
            "values whose squares overflow); "
        )
        if self.on_nonfinite == "raise":
            raise ValueError(message + "nothing was updated (on_nonfinite='raise')")
        if not self.__dict__.get("_warned_nonfinite", False):
            self._warned_nonfinite = True
            warnings.warn(
                message + "its output is returned as is, but it did not reach the running statistics or any "
                "other state of the layer (warned once per layer; configure(on_nonfinite='raise') to raise)",
                RuntimeWarning,
                stacklevel=5,
            )
        return False

    def sync_group(self) -> Any | None:
        """The torch process group to synchronize batch statistics over now, or ``None``."""
        return resolve_group(self.process_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Models pickled before the settings were declared stored the origin under another name.
        if "_normlab_origin" in state:
            state.setdefault("converted_from", state.pop("_normlab_origin"))
        state.setdefault("frozen", False)
        state.setdefault("process_group", None)
        state.setdefault("converted_from", None)
        state.setdefault("on_nonfinite", "skip")
        super().__setstate__(state)  # type: ignore[misc]


NONFINITE = ("skip", "raise")


def _tensors(items: Any) -> list[Tensor]:
    if isinstance(items, Tensor):
        return [items]
    if isinstance(items, (tuple, list)):
        return [t for item in items for t in _tensors(item)]
    return []


class _FrozenHooks:
    """Runs a torch BatchNorm in eval mode while its model trains (the state :func:`set_frozen` sets).

    Registered as the layer's forward pre-hook and as its always-called forward hook, which sets the
    training flag back (also when the forward raises). It keeps its own hook handles, which deep copies
    and pickles carry along with the layer, so :func:`set_frozen` removes it from a copy as well.
    """

    def __init__(self) -> None:
        self.handles: tuple[Any, ...] = ()
        self.switched = False

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.switched = module.training
        module.training = False

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.switched:
            module.training = True
            self.switched = False


def _frozen_hooks(module: nn.Module) -> _FrozenHooks | None:
    for hook in module._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, _FrozenHooks):
            return owner
    return None


def set_frozen(module: nn.Module, frozen: bool) -> None:
    """Freeze or unfreeze one statistics-keeping layer (normlab's by its setting, torch's by hooks)."""
    if isinstance(module, ToolState):
        module.configure(frozen=frozen)
        return
    hooks = _frozen_hooks(module)
    if frozen and hooks is None:
        hooks = _FrozenHooks()
        hooks.handles = (
            module.register_forward_pre_hook(hooks.pre),
            module.register_forward_hook(hooks.post, always_call=True),
        )
    elif not frozen and hooks is not None:
        for handle in hooks.handles:
            handle.remove()


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is a statistics-keeping layer that is frozen (see :func:`normlab.freeze`)."""
    if not is_stat_norm(module):
        return False
    if isinstance(module, ToolState):
        return bool(module.frozen)
    return _frozen_hooks(module) is not None


def settings_of(module: nn.Module) -> dict[str, Any]:
    """The tool settings of any normalization layer, as :meth:`ToolState.configure` takes them."""
    if isinstance(module, ToolState):
        return {
            "frozen": module.frozen,
            "process_group": module.process_group,
            "converted_from": module.converted_from or type(module),
            "on_nonfinite": module.on_nonfinite,
        }
    return {"frozen": is_frozen(module), "process_group": None, "converted_from": type(module)}


def carry_settings(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` (the replacement of ``src``) the tool settings of ``src``; returns ``dst``.

    The one helper that convert and sync use: ``frozen``, ``process_group`` and the original class
    are carried onto a normlab layer; onto a torch BatchNorm only ``frozen`` (it declares nothing,
    and its own ``process_group``, if any, is its constructor's).
    """
    settings = settings_of(src)
    if isinstance(dst, ToolState):
        dst.configure(**settings)
    elif settings["frozen"] and is_stat_norm(dst):
        set_frozen(dst, True)
    return dst


# --------------------------------------------------------------------------------------- the layer base
class NormBase(ToolState, nn.Module):
    """Base class of normlab's statistics-keeping layers: parameters, buffers, the forward skeleton.

    A subclass supplies what its paper changes: :meth:`normalize_batch` (the training-mode
    normalization with batch statistics), and where they differ from batch normalization
    :meth:`normalize_running`, :meth:`update_running` and, for the tools, :meth:`moments`,
    :meth:`load_statistics` and :meth:`inference_affine`.
    """

    _version = 2  # same state-dict version as torch's BatchNorm (num_batches_tracked present)
    #: Whether the layer keeps a ``running_var`` (a variant that never uses a variance sets it False).
    _keeps_running_var = True
    #: Why ``eps`` must be positive (``None``: it may be 0, as for a layer that never divides).
    _positive_eps_because: str | None = "it is added to a batch variance that may be 0"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_settings(type(self).__name__, num_features, eps, momentum)
        if self._positive_eps_because is not None and not eps > 0:
            # torch raises only when training starts; a layer that cannot train with it refuses it here.
            raise ValueError(f"{type(self).__name__}: expected eps > 0 ({self._positive_eps_because}), got {eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self._init_tool_state()
        if affine:
            # bias=False (torch >= 2.13's keyword): a learnable scale without a shift.
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            sdt = buffer_dtype(dtype)
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=sdt))
            running_var = torch.ones(num_features, device=device, dtype=sdt) if self._keeps_running_var else None
            self.register_buffer("running_var", running_var)
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # ----------------------------------------------------------------------------- the forward skeleton
    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` ``(N, C, *)``: the steps of the module docstring, in that order."""
        batch = self.use_batch_stats()
        group = self.sync_group() if batch else None
        # Synchronized, the sample-count check is on the global batch (a process may hold one
        # sample or none), in the reduction itself.
        self.check_input(x, batch and group is None)
        if not batch:
            return self.normalize_running(x)
        y, stats = self.normalize_batch(x, group)
        if self.training and self.statistics_are_finite(*self.guarded_statistics(stats)):
            with torch.no_grad():
                self.record_step(stats)
        return y

    def normalize_running(self, x: Tensor) -> Tensor:
        """Eval mode (or frozen): batch normalization with the running statistics."""
        weight, bias = params_in(self.running_mean.dtype, self.weight, self.bias)
        return F.batch_norm(x, self.running_mean, self.running_var, weight, bias, False, 0.0, self.eps)

    def normalize_batch(self, x: Tensor, group: Any | None) -> tuple[Tensor, BatchStats]:
        """Training mode: normalize with the batch statistics (global over ``group`` when given)."""
        raise NotImplementedError(f"{type(self).__name__} does not define normalize_batch")

    def guarded_statistics(self, stats: BatchStats) -> tuple[Any, ...]:
        """The statistics whose finiteness :meth:`statistics_are_finite` tests before a step's state
        changes: all of them (a variant where fewer tell as much returns those, one small op each less)."""
        return stats.mean, stats.var, stats.extra

    def record_step(self, stats: BatchStats) -> None:
        """Every state change of a training step, after its output is computed (without grad mode).

        By default the running statistics (:meth:`update_running`, when tracked); a variant with more
        state per step (a window of past statistics, a step count) extends it. Nothing before this
        call changes the layer's state.
        """
        if self.updates_running_stats():
            self.update_running(stats)

    def update_running(self, stats: BatchStats) -> None:
        """Move the running statistics towards this batch's (called without grad mode)."""
        update_running_stats(self, stats.mean, stats.var, stats.count)

    # ----------------------------------------------------------------------------- state
    def reset_running_stats(self) -> None:
        """Zero the running mean, set the running variance (if kept) to one and the step counter to zero."""
        if self.track_running_stats:
            self.running_mean.zero_()
            if self.running_var is not None:
                self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics, and ``weight`` to ones and ``bias`` to zeros."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - torch's signature
        # Keep statistics buffers float32 when the module is cast to half/bfloat16.
        out = super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype in LOW_PRECISION and name in self._float32_buffers():
                self._buffers[name] = buf.float()
        return out

    def _float32_buffers(self) -> tuple[str, ...]:
        """Names of the floating buffers that must stay float32 (override to add more)."""
        return _STAT_BUFFERS

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: ANN001 - torch's signature
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # A state dict without the step counter (an old torch checkpoint, a partial dict) keeps the
            # current count, as torch does: a schedule (BatchRenorm's r_max/d_max) does not restart.
            steps = self.num_batches_tracked
            state_dict[key] = steps if steps.device.type != "meta" else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def adopt(self, source: nn.Module, copied: list[str]) -> None:
        """Finish a conversion from ``source``, whose tensors ``copied`` were carried over (override to derive more)."""

    # ----------------------------------------------------------------------------- helpers
    def check_input(self, x: Tensor, training: bool | None = None) -> None:
        """Validate ``x`` for this layer (shape, channels, dtype and, if ``training``, the batch size).

        ``training`` defaults to whether this forward takes local batch statistics.
        """
        if training is None:
            training = self.use_batch_stats() and self.sync_group() is None
        check_input(self, x, self.num_features, training)
        check_placement(self, x, self.weight if self.weight is not None else self.running_mean)

    def use_batch_stats(self) -> bool:
        """Whether this forward normalizes with batch statistics (as opposed to running ones)."""
        if self.frozen and self.track_running_stats:
            return False
        return self.training or not self.track_running_stats

    def updates_running_stats(self) -> bool:
        """Whether this forward moves the running statistics."""
        return self.training and self.track_running_stats and not self.frozen

    def step_factor(self) -> Tensor | float:
        """Increment ``num_batches_tracked`` and return this step's averaging factor (:func:`step_factor`)."""
        return step_factor(self)

    def update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor | float) -> None:
        """Move the running mean and (unbiased) variance towards the batch's (:func:`update_running_stats`)."""
        update_running_stats(self, mean, var, count)

    # ----------------------------------------------------------------------------- statistics interface
    @torch.no_grad()
    def moments(self, x: Tensor) -> Moments:
        """Per-batch statistics of ``x`` as this layer normalizes with them (no gradient)."""
        mean, var, count = channel_moments(x)
        return Moments(int(count.item()), mean, var)

    @torch.no_grad()
    def load_statistics(self, mean: Tensor, var: Tensor) -> None:
        """Set the inference statistics from a population mean and *unbiased* variance.

        Both are checked (shape ``(C,)``, finite, the variance >= 0) before either is written.
        """
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__}: has no running statistics (track_running_stats=False)")
        write_statistics(self, mean, var)

    @torch.no_grad()
    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """``(A, b)`` such that eval-mode output is ``A * x + b`` per channel (``A`` is ``(C,)``)."""
        return _bn_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)


# --------------------------------------------------------------------------------------- running statistics
def step_factor(module: nn.Module) -> Tensor | float:
    """Increment ``module.num_batches_tracked`` and return this step's averaging factor.

    ``momentum`` or, for ``momentum=None``, ``1 / num_batches_tracked`` (cumulative average), as in
    torch's BatchNorm. Kept as a tensor so that ``torch.compile`` traces it without a graph break.
    """
    steps = module.num_batches_tracked
    steps.add_(constant(1, steps.device, steps.dtype))
    if module.momentum is None:
        # In float64, rounded once to the buffers' dtype by the update (torch's factor is a Python float).
        return 1.0 / module.num_batches_tracked.to(torch.float64)
    return module.momentum


@torch.no_grad()
def update_running_stats(module: nn.Module, mean: Tensor, var: Tensor, count: Tensor | float) -> None:
    """Move ``running_mean`` towards ``mean`` and ``running_var`` towards the unbiased ``var``.

    ``var`` is the biased batch variance over ``count`` samples; the running variance stores the
    unbiased ``var * m / (m - 1)``, as torch does. For any layer with BatchNorm's buffers and
    ``momentum`` (normlab's and torch's).
    """
    running_update(module.running_mean, module.running_var, mean, var, count, step_factor(module))


def _bn_affine(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    # In the statistics' dtype (float32 at least), so a float64 model folds exactly.
    dtype = torch.promote_types(var.dtype, torch.float32)
    scale = torch.rsqrt(var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


# --------------------------------------------------------------------------------------- statistics interface
def _is_torch_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def is_stat_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer that keeps running statistics."""
    if _is_torch_bn(module) or isinstance(module, NormBase):
        return bool(getattr(module, "track_running_stats", False)) and module.running_mean is not None
    return False


def stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The statistics-keeping normalization layers of ``model`` (:func:`is_stat_norm`), by qualified name.

    A layer shared by several parents is listed once, under its first name.
    """
    return [(name, m) for name, m in model.named_modules() if is_stat_norm(m)]


def _require_stat_norm(module: nn.Module) -> None:
    if not is_stat_norm(module):
        raise ValueError(
            f"{type(module).__name__}: expected a normalization layer with running statistics "
            "(torch BatchNorm or a normlab layer with track_running_stats=True)"
        )


@torch.no_grad()
def batch_moments(module: nn.Module, x: Tensor) -> Moments:
    """:meth:`NormBase.moments` for any statistics-keeping layer, torch's BatchNorm included."""
    _require_stat_norm(module)
    if isinstance(module, NormBase):
        return module.moments(x)
    check_input(module, x, module.num_features, training=False)
    mean, var, count = channel_moments(x)
    return Moments(int(count.item()), mean, var)


@torch.no_grad()
def load_statistics(module: nn.Module, mean: Tensor, var: Tensor) -> None:
    """:meth:`NormBase.load_statistics` for any statistics-keeping layer."""
    _require_stat_norm(module)
    if isinstance(module, NormBase):
        module.load_statistics(mean, var)
    else:
        write_statistics(module, mean, var)


def write_statistics(module: nn.Module, mean: Tensor, var: Tensor | None) -> None:
    """Check a per-channel mean and (unbiased) variance, then write them; nothing is written unless both pass.

    ``var=None`` (a layer that keeps no variance) writes the mean alone.
    """
    name, c = type(module).__name__, module.num_features
    for what, t in (("mean", mean), ("variance", var)):
        if t is None and what == "variance" and module.running_var is None:
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != (c,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a {what} of shape ({c},), got {shape}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: expected a finite {what}, got non-finite values")
    if var is not None and bool((var < 0).any()):
        raise ValueError(f"{name}: expected a variance >= 0, got {float(var.min())}")
    module.running_mean.copy_(mean)
    if var is not None and module.running_var is not None:
        module.running_var.copy_(var)


@torch.no_grad()
def inference_affine(module: nn.Module) -> tuple[Tensor, Tensor]:
    """:meth:`NormBase.inference_affine` for any statistics-keeping layer."""
    _require_stat_norm(module)
    if isinstance(module, NormBase):
        return module.inference_affine()
    return _bn_affine(module.running_mean, module.running_var, module.weight, module.bias, module.eps)


# --------------------------------------------------------------------------------------- moved names
# Helpers that lived here before the kernels, checks and communication got their own modules.
_MOVED = {
    **{name: kernels for name in kernels.__all__},
    "check_input": checks,
    "check_global_count": checks,
    "global_sum": comm,
}


def sync_group(module: nn.Module) -> Any | None:
    """Deprecated: ``module.sync_group()`` (or :func:`normlab.comm.resolve_group` of its setting)."""
    warnings.warn(
        "normlab.base.sync_group is deprecated; use layer.sync_group() or "
        "normlab.comm.resolve_group(layer.process_group)",
        DeprecationWarning,
        stacklevel=2,
    )
    return resolve_group(getattr(module, "process_group", None))


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"normlab.base.{name} is deprecated; import it from {module.__name__}", DeprecationWarning, stacklevel=2
    )
    return getattr(module, name)
