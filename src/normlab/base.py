"""Shared mechanics of every normlab normalization layer.

Conventions (every layer follows them; see also ``docs/conventions.md``):

* Input ``(N, C, *)`` of any rank >= 2 (MLP, 1-D, 2-D, 3-D); statistics are taken over every
  dimension except the channel dimension 1, i.e. over ``m = N * prod(spatial)`` samples.
* Constructor: ``num_features`` first; keywords ``eps``, ``momentum``, ``affine``,
  ``track_running_stats``, ``device``, ``dtype`` with torch's meaning. ``momentum=None`` is a
  cumulative moving average, as in :class:`torch.nn.BatchNorm2d`.
* 1-D ``weight``/``bias``; ``running_mean``, ``running_var`` (unbiased variance, as torch stores it)
  and ``num_batches_tracked`` with the meaning they have in ``nn.BatchNorm2d`` wherever the variant
  keeps them, so a torch BatchNorm checkpoint loads into the variant and back.
* Half and bfloat16 inputs compute statistics in float32; running statistics stay float32 even
  after ``module.half()`` / ``module.to(torch.bfloat16)``.
* Bad input raises a ``ValueError`` naming the layer, what was expected and what was given, before
  any state is touched.

The statistics interface (used by :mod:`normlab.statistics`, :mod:`normlab.fold`, AdaBN and the
distributed reductions) is three methods that each statistics-keeping layer implements:

* :meth:`NormBase.moments` -- per-batch sufficient statistics of the layer's input,
* :meth:`NormBase.load_statistics` -- set the inference statistics from population statistics,
* :meth:`NormBase.inference_affine` -- the eval-mode map ``y = A x + b`` along the channels.

:func:`batch_moments`, :func:`load_statistics` and :func:`inference_affine` dispatch to those methods
and implement them for torch's own BatchNorm layers, so tools need no per-variant code.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "NormBase",
    "Moments",
    "check_input",
    "channel_moments",
    "channel_affine",
    "global_sum",
    "sync_group",
    "is_stat_norm",
    "batch_moments",
    "load_statistics",
    "inference_affine",
    "LOW_PRECISION",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)
_STAT_BUFFERS = ("running_mean", "running_var")


class Moments(NamedTuple):
    """Sufficient statistics of one batch, as a layer sees its input.

    ``count`` is the number of samples per channel (``m``), ``mean`` the batch mean and ``var`` the
    *biased* second central moment: a per-channel variance ``(C,)`` for channel-wise layers, or
    whatever the layer whitens with (e.g. per-group covariances) for decorrelating ones. Tools only
    average ``mean``/``var`` over batches and rescale ``var``; its shape is the layer's business.
    """

    count: int
    mean: Tensor
    var: Tensor


def _layer_name(module: nn.Module | str) -> str:
    return module if isinstance(module, str) else type(module).__name__


def check_input(module: nn.Module | str, x: Tensor, num_features: int, training: bool) -> None:
    """Raise a clear ``ValueError`` unless ``x`` is ``(N, num_features, *)`` and usable.

    In training with batch statistics, at least two values per channel are required (the batch
    variance of a single value is zero and its normalization meaningless).
    """
    name = _layer_name(module)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"{name}: expected input of shape (N, {num_features}, *) with at least 2 dimensions, "
            f"got shape {tuple(x.shape)}"
        )
    if x.size(1) != num_features:
        raise ValueError(
            f"{name}: expected {num_features} channels in dimension 1 (input (N, {num_features}, *)), "
            f"got shape {tuple(x.shape)} with {x.size(1)} channels"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point input, got dtype {x.dtype}")
    if training and x.numel() // max(num_features, 1) <= 1:
        raise ValueError(
            f"{name}: expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)}"
        )


def reduce_dims(x: Tensor) -> list[int]:
    """All dimensions of ``x`` but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def buffer_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype of statistics kept for a layer of ``dtype``: float32 for half/bfloat16."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype statistics are computed in: float32 for half/bfloat16 inputs."""
    return buffer_dtype(x.dtype)


def sync_group(module: nn.Module) -> Any | None:
    """The process group ``module`` synchronizes its batch statistics over, or ``None``.

    ``None`` unless the module has a ``process_group`` set (see :func:`normlab.sync`), torch.distributed
    is initialized and the group has more than one process: outside a process group (or with world
    size 1) layers behave exactly as unsynchronized. ``process_group`` is a torch ``ProcessGroup`` or
    a :class:`normlab.distributed.GroupRef` (what :func:`normlab.sync` sets: it deep-copies and
    pickles, and the default group is looked up when used, so a model may be synchronized before
    ``init_process_group``).
    """
    group = getattr(module, "process_group", None)
    if group is None or not dist.is_available() or not dist.is_initialized():
        return None
    from .distributed import GroupRef  # lazy: distributed.py imports this module

    if isinstance(group, GroupRef):
        group = group.resolve()
    return group if dist.get_world_size(group) > 1 else None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes of a group; the backward sums the gradients over the processes.

    With ``y = sum_p x_p`` on every process and the total loss ``sum_p L_p``, the gradient to
    ``x_q`` is ``sum_p dL_p/dy``: the all_reduce of the incoming gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:  # noqa: ANN001
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        return _AllReduceSum.apply(grad, ctx.group), None


def global_sum(tensors: list[Tensor], group: Any | None) -> list[Tensor]:
    """Sum each tensor over the processes of ``group`` (identity when ``group`` is ``None``).

    The one reduction of normlab's synchronized statistics (sums of ``x``, ``x^2``, ``x x^T`` and the
    sample count). Differentiable: the backward of a sum over processes is the sum over processes
    of the gradients, which is what makes synchronized statistics give the gradients of the whole
    batch. All tensors travel in one ``all_reduce``, in their promoted dtype, and come back in their
    own dtypes and shapes.
    """
    if group is None:
        return tensors
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    flat = _AllReduceSum.apply(torch.cat([t.reshape(-1).to(dtype) for t in tensors]), group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return out


def check_global_count(count: Tensor, module: nn.Module | str, x: Tensor) -> None:
    """Raise (on every process alike) unless the group's batch has more than one value per channel."""
    if not bool(count > 1):
        raise ValueError(
            f"{_layer_name(module)}: expected more than 1 value per channel over the process group when "
            f"training, got {int(count)} in all (this process: input of shape {tuple(x.shape)})"
        )


def accumulation_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # Sums of x and x^2 over a global batch lose the variance to cancellation (and the count its
    # exactness above 2^24) in float32: accumulate in float64 where the device has it.
    if dtype == torch.float32 and device.type in ("cpu", "cuda"):
        return torch.float64
    return dtype


# Bytes per chunk of channel_stats' two-pass path: a chunk stays in cache between its two passes.
_CHUNK_BYTES = 1 << 21


def two_pass_stats(x: Tensor) -> bool:
    """Whether :func:`channel_stats` computes the statistics of ``x`` in its own two passes."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() > 2
        and x.is_contiguous()
        and x.numel() > x.size(0) * x.size(1)  # samples, and a spatial extent
    )


def _native_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.dtype in (torch.float32, torch.float64):
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    # Given float32 running buffers, torch's kernel returns float32 statistics (without, they would be
    # rounded to x's dtype); momentum 0 leaves these scratch buffers as they were.
    scratch = torch.empty(2, x.size(1), device=x.device)
    return torch.batch_norm_update_stats(x, scratch[0], scratch[1], 0.0)


def channel_stats(x: Tensor, scratch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` ``(N, C, *)``, without autograd.

    The statistics of torch's batch norm (float32 for half inputs). On CPU, torch's batch-norm
    statistics kernel walks NCHW-contiguous inputs with a spatial extent at 2-3x the time of a plain
    sum; for those (:func:`two_pass_stats`), two passes over cache-sized chunks of samples (the sum,
    then the sum of squared deviations from the chunk's mean; chunks combined as in Chan, Golub and
    LeVeque 1979) give the same statistics faster. Elsewhere (2-D, channels_last, half, GPU) torch's
    kernel. ``scratch``, a contiguous buffer shaped like ``x`` that may be overwritten (say the output
    about to be written), spares the two-pass path its temporary (at most a chunk).
    """
    return _two_pass_stats(x, scratch) if two_pass_stats(x) else _native_stats(x)


def stats_and_output_buffer(x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`channel_stats` of ``x``, and the buffer that served as its scratch, for the output.

    The buffer (``None`` where torch's kernel computed the statistics) is what a caller passes as
    ``out`` to :func:`inference_batch_norm`, so the two-pass statistics cost no extra memory.
    """
    if not two_pass_stats(x):
        return (*_native_stats(x), None)
    out = torch.empty_like(x)
    return (*_two_pass_stats(x, out), out)


def inference_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    var: Tensor,
    eps: float,
    out: Tensor | None = None,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` on torch's inference kernel, into ``out`` if given."""
    if out is None:
        return torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]
    unused = mean.new_empty(0)  # the kernel's saved statistics, empty in inference
    return torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps, out=(out, unused, unused.clone()))[0]


def _two_pass_stats(x: Tensor, scratch: Tensor | None) -> tuple[Tensor, Tensor]:
    dims = reduce_dims(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    rows = max(1, _CHUNK_BYTES // (x[0].numel() * x.element_size()))
    if scratch is None or scratch.shape != x.shape or not scratch.is_contiguous():
        scratch = torch.empty_like(x[:rows], memory_format=torch.contiguous_format)
    if rows >= x.size(0):
        m = x.numel() // x.size(1)
        mean = x.sum(dims).div_(m)
        return mean, torch.sub(x, mean.view(shape), out=scratch).square_().sum(dims).div_(m)
    sums, m2s, counts = [], [], []
    for start, chunk in zip(range(0, x.size(0), rows), x.split(rows)):
        buffer = scratch[start : start + rows] if scratch.size(0) == x.size(0) else scratch[: chunk.size(0)]
        m = chunk.numel() // chunk.size(1)
        s = chunk.sum(dims)
        m2s.append(torch.sub(chunk, (s / m).view(shape), out=buffer).square_().sum(dims))
        sums.append(s)
        counts.append(m)
    sums, m2s = torch.stack(sums), torch.stack(m2s)
    count = torch.tensor(counts, dtype=x.dtype).unsqueeze(1)
    total = x.numel() // x.size(1)
    mean = sums.sum(0).div_(total)
    spread = torch.sub(sums / count, mean).square_().mul_(count).sum(0)
    return mean, m2s.sum(0).add_(spread).div_(total)


class _LocalMoments(torch.autograd.Function):
    """Per-channel mean and biased variance of ``x`` ``(N, C, *)`` by :func:`channel_stats`, differentiable.

    ``torch.var_mean`` over the non-channel dimensions is 3-25x slower on CPU than
    :func:`channel_stats`, which has no autograd formula; the backward is
    ``dx = (g_mean + 2 g_var (x - mean)) / m``. Twice differentiable: under ``create_graph`` the
    backward recomputes the mean from ``x`` so that its dependency on ``x`` is in the graph.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        mean, var = channel_stats(x)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, g_mean: Tensor, g_var: Tensor) -> Tensor:  # noqa: ANN001
        x, mean = ctx.saved_tensors
        if torch.is_grad_enabled():
            mean = x.mean(reduce_dims(x))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        m = x.numel() // x.size(1)
        return torch.addcmul((g_mean / m).reshape(shape), x - mean.reshape(shape), (g_var * (2 / m)).reshape(shape))


def channel_moments(
    x: Tensor, group: Any | None = None, module: nn.Module | str = "channel_moments"
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel batch mean, biased variance and sample count of ``x`` (differentiable).

    Computed in float32 for half/bfloat16 inputs. With a process ``group`` the statistics are
    those of the global batch: the count, sum and sum of squares (in float64 for float32
    statistics) travel in one all_reduce, so processes with uneven or empty batches are weighted by
    their counts. The sample-count check is then on the global batch: a ``ValueError``
    (raised on every process alike, naming ``module``) unless there is more than one value per
    channel in all.
    """
    sdt = stat_dtype(x)
    dims = reduce_dims(x)
    local = float(x.numel() // max(x.size(1), 1))
    if group is None:
        if local > 0:
            mean, var = _LocalMoments.apply(x.to(sdt))
        else:  # no samples: NaN statistics, as var_mean gives (callers check the count first)
            var, mean = torch.var_mean(x.to(sdt), dim=dims, correction=0)
        return mean, var, torch.tensor(local, dtype=sdt, device=x.device)
    acc = accumulation_dtype(sdt, x.device)
    if local > 0:
        # The local sums of x and x^2 from the local mean and variance (torch's stable kernel): raw
        # float32 squares of values far from zero would already have lost the variance.
        mean, var = _LocalMoments.apply(x.to(sdt))
        mean, var = mean.to(acc), var.to(acc)
        s, ss = mean * local, (var + mean * mean) * local
    else:
        # Zeros that still depend on x, so that this process joins the all_reduce of the backward.
        s = ss = x.to(sdt).sum(dims, dtype=acc)
    count = torch.full((1,), local, dtype=acc, device=x.device)
    s, ss, count = global_sum([s, ss, count], group)
    count = count.reshape(())
    check_global_count(count, module, x)
    mean = s / count
    var = (ss / count - mean * mean).clamp_min(0)
    return mean.to(sdt), var.to(sdt), count.to(sdt)


def constant(value: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A 0-d tensor holding ``value``, made once per (value, device, dtype); never modify it.

    A Python number in a tensor op costs a tensor allocation per call, as much as a small op itself;
    per-step constants (eps, fixed bounds, the step increment) are made once instead.
    """
    if torch.compiler.is_compiling():  # traced as a graph constant
        return torch.tensor(value, device=device, dtype=dtype)
    return _cached_constant(value, device, dtype)


@functools.lru_cache(maxsize=512)
def _cached_constant(value: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(value, device=device, dtype=dtype)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is laid out in (channels_last for 4-D/5-D NHWC tensors)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def channel_affine(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` along dimension 1, in ``x``'s dtype."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape)).to(x.dtype)


class NormBase(nn.Module):
    """Base class of normlab's statistics-keeping layers: parameters, buffers, checks and updates.

    Subclasses implement ``forward`` with the helpers here and, for the tools, :meth:`moments`,
    :meth:`load_statistics` and :meth:`inference_affine` where the channel-wise defaults do not fit.
    """

    _version = 2  # same state-dict version as torch's BatchNorm (num_batches_tracked present)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"{name}: expected num_features to be a positive int, got {num_features!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
            raise ValueError(f"{name}: expected eps to be a finite number >= 0, got {eps!r}")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"{name}: expected momentum in [0, 1] or None, got {momentum!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.frozen = False  # see normlab.freeze: use running statistics in training, keep them fixed
        self.process_group: Any | None = None  # see normlab.sync
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            sdt = buffer_dtype(dtype)
            self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=sdt))
            self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=sdt))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    # ----------------------------------------------------------------------------- state
    def reset_running_stats(self) -> None:
        """Zero the running mean, set the running variance to one and the step counter to zero."""
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics, and ``weight`` to ones and ``bias`` to zeros."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
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
            # Old torch checkpoints have no step counter: start it at 0, as torch does.
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ----------------------------------------------------------------------------- helpers
    def check_input(self, x: Tensor) -> None:
        """Validate ``x`` for this layer (shape, channels, dtype, batch size in training)."""
        # Under synchronization the sample-count check is done on the global batch (a process may
        # hold one sample or none), in channel_moments.
        training = self.use_batch_stats() and self.sync_group() is None
        check_input(self, x, self.num_features, training)

    def use_batch_stats(self) -> bool:
        """Whether this forward normalizes with batch statistics (as opposed to running ones)."""
        if self.frozen and self.track_running_stats:
            return False
        return self.training or not self.track_running_stats

    def updates_running_stats(self) -> bool:
        """Whether this forward moves the running statistics."""
        return self.training and self.track_running_stats and not self.frozen

    def sync_group(self) -> Any | None:
        """The process group to synchronize batch statistics over, or ``None``."""
        return sync_group(self)

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
        """Set the inference statistics from a population mean and *unbiased* variance."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__}: has no running statistics (track_running_stats=False)")
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)

    @torch.no_grad()
    def inference_affine(self) -> tuple[Tensor, Tensor]:
        """``(A, b)`` such that eval-mode output is ``A * x + b`` per channel (``A`` is ``(C,)``)."""
        return _bn_affine(self.running_mean, self.running_var, self.weight, self.bias, self.eps)


def step_factor(module: nn.Module) -> Tensor | float:
    """Increment ``module.num_batches_tracked`` and return this step's averaging factor.

    ``momentum`` or, for ``momentum=None``, ``1 / num_batches_tracked`` (cumulative average), as in
    torch's BatchNorm. Kept as a tensor so that ``torch.compile`` traces it without a graph break.
    """
    steps = module.num_batches_tracked
    steps.add_(constant(1, steps.device, steps.dtype))
    if module.momentum is None:
        return 1.0 / module.num_batches_tracked.to(torch.float32)
    return module.momentum


@torch.no_grad()
def update_running_stats(module: nn.Module, mean: Tensor, var: Tensor, count: Tensor | float) -> None:
    """Move ``running_mean`` towards ``mean`` and ``running_var`` towards the unbiased ``var``.

    ``var`` is the biased batch variance over ``count`` samples; the running variance stores the
    unbiased ``var * m / (m - 1)``, as torch does. For any layer with BatchNorm's buffers and
    ``momentum`` (normlab's and torch's).
    """
    factor = step_factor(module)
    ema(module.running_mean, mean, factor)
    ema(module.running_var, var * (count / (count - 1)), factor)


@torch.no_grad()
def ema(running: Tensor, value: Tensor, factor: Tensor | float) -> None:
    """In place ``running <- (1 - factor) * running + factor * value`` (in ``running``'s dtype)."""
    value = value.detach().to(running.dtype)
    if isinstance(factor, Tensor):
        factor = factor.to(running.dtype)
    running.lerp_(value, factor)


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


# --------------------------------------------------------------------------------- dispatch
def _is_torch_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def is_stat_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer that keeps running statistics."""
    if _is_torch_bn(module) or isinstance(module, NormBase):
        return bool(getattr(module, "track_running_stats", False)) and module.running_mean is not None
    return False


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
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)


@torch.no_grad()
def inference_affine(module: nn.Module) -> tuple[Tensor, Tensor]:
    """:meth:`NormBase.inference_affine` for any statistics-keeping layer."""
    _require_stat_norm(module)
    if isinstance(module, NormBase):
        return module.inference_affine()
    return _bn_affine(module.running_mean, module.running_var, module.weight, module.bias, module.eps)
