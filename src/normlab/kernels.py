"""Per-channel statistics and normalization kernels shared by the layers (below every layer).

Statistics in float32 for half/bfloat16 inputs (:func:`stat_dtype`), torch's native batch-norm
kernels wherever the maths allows, and on CPU a two-pass chunked statistics kernel that is faster
than torch's for NCHW inputs (:func:`channel_stats`). :func:`channel_moments` is the differentiable
per-channel mean and variance, local or over a process group.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_global_count, check_input
from .comm import global_sum

__all__ = [
    "LOW_PRECISION",
    "reduce_dims",
    "buffer_dtype",
    "stat_dtype",
    "accumulation_dtype",
    "two_pass_stats",
    "channel_stats",
    "stats_and_output_buffer",
    "inference_batch_norm",
    "channel_moments",
    "constant",
    "identity",
    "memory_format_of",
    "channel_shape",
    "in_format_of",
    "channel_affine",
    "ema",
    "running_update",
    "params_in",
    "micro_batch_sizes",
    "micro_batch_norm",
    "stacked_micro_batches",
    "micro_batch_stats",
    "micro_batch_counts",
    "micro_batch_moments",
    "micro_batch_affine",
    "micro_batch_sums",
    "micro_batch_accumulate_",
    "check_micro_batches",
    "micro_batch_steps",
    "ema_steps",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)


def reduce_dims(x: Tensor) -> list[int]:
    """All dimensions of ``x`` but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def buffer_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype of statistics kept for a layer of ``dtype``: float32 for half/bfloat16."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def stat_dtype(x: Tensor) -> torch.dtype:
    """The dtype statistics are computed in: float32 for half/bfloat16 inputs."""
    return buffer_dtype(x.dtype)


def accumulation_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # Sums of x and x^2 over a global batch lose the variance to cancellation (and the count its
    # exactness above 2^24) in float32: accumulate in float64 where the device has it.
    if dtype == torch.float32 and device.type in ("cpu", "cuda"):
        return torch.float64
    return dtype


# channel_stats' two passes run over the whole input up to _WHOLE_BYTES, which stays in the last-level
# cache between them; a larger input goes in chunks of _CHUNK_BYTES, which stay in a core's own
# cache. (On a 2-core EPYC with 1 MiB of L2 per core and 32 MiB of L3, at 2 threads: 16x64x32x32
# whole 140 us against 190 us in 2 MiB chunks; 64x64x32x32 in 1 MiB chunks 1.23 ms against 1.37 ms
# whole.)
_WHOLE_BYTES = 1 << 23
_CHUNK_BYTES = 1 << 20


def two_pass_stats(x: Tensor) -> bool:
    """Whether :func:`channel_stats` computes the statistics of ``x`` in its own two passes."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() > 2
        and x.is_contiguous()
        # A spatial extent of at least 16: below it (2x2 maps) torch's kernel is faster, 0.25-0.4x
        # the two passes' time at (16, 512, 2, 2), whose sums run over rows of 4 values.
        and x.size(0) * x.size(1) > 0
        and x.numel() >= _TWO_PASS_EXTENT * x.size(0) * x.size(1)
    )


_TWO_PASS_EXTENT = 16


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
    sum; for those (:func:`two_pass_stats`), two passes (the sum, then the sum of squared deviations
    from the mean) give the same statistics faster: over the whole input up to 8 MiB, over
    cache-sized chunks of samples above (chunks combined as in Chan, Golub and LeVeque 1979).
    Elsewhere (2-D, channels_last, half, GPU) torch's kernel. ``scratch``, a contiguous buffer shaped
    like ``x`` that may be overwritten (say the output about to be written), spares the two-pass path
    its temporary (the input's size, or a chunk's).
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


def _in_one_sweep(x: Tensor) -> bool:
    """Whether the two-pass statistics of ``x`` run over all of it at once (not in chunks)."""
    return x.numel() * x.element_size() <= _WHOLE_BYTES


def _two_passes(v: Tensor, dims: tuple[int, ...], scratch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``v`` over ``dims``: the sum, then the sum of squared deviations from
    the mean (written into ``scratch``, shaped like ``v``, when given)."""
    mean = v.sum(dims, keepdim=True)
    m = v.numel() // max(1, mean.numel())
    mean.div_(m)
    var = torch.sub(v, mean, out=scratch).square_().sum(dims).div_(m)
    return mean.view(var.shape), var


def _two_pass_stats(x: Tensor, scratch: Tensor | None) -> tuple[Tensor, Tensor]:
    dims = reduce_dims(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    rows = x.size(0) if _in_one_sweep(x) else max(1, _CHUNK_BYTES // (x[0].numel() * x.element_size()))
    if scratch is None or scratch.shape != x.shape or not scratch.is_contiguous():
        scratch = torch.empty_like(x[:rows], memory_format=torch.contiguous_format)
    if rows >= x.size(0):
        return _two_passes(x, dims, scratch)
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


def constant(value: float | tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A tensor holding ``value`` (0-d for a number, 1-d for a tuple), made once per (value, device,
    dtype); never modify it.

    A Python number in a tensor op costs a tensor allocation per call, as much as a small op itself;
    per-step constants (eps, fixed bounds, the step increment, moving-average weights) are made once
    instead.
    """
    if torch.compiler.is_compiling():  # traced as a graph constant
        return torch.tensor(value, device=device, dtype=dtype)
    return _cached_constant(value, device, dtype)


@functools.lru_cache(maxsize=512)
def _cached_constant(value: float | tuple[float, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.tensor(value, device=device, dtype=dtype)


def identity(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The ``n x n`` identity matrix, made once per (n, device, dtype) as :func:`constant` makes its
    tensors; never modify it."""
    if torch.compiler.is_compiling():
        return torch.eye(n, device=device, dtype=dtype)
    return _cached_identity(n, device, dtype)


@functools.lru_cache(maxsize=64)
def _cached_identity(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return torch.eye(n, device=device, dtype=dtype)


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is laid out in (channels_last for 4-D/5-D NHWC tensors)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def in_format_of(t: Tensor, x: Tensor | torch.memory_format) -> Tensor:
    """``t`` (a gradient, an output) laid out as ``x`` is (or in the memory format ``x``).

    Under vmap (``is_grads_batched``) a batched tensor cannot be asked for a memory format other than
    the contiguous one: it is left as it is (torch's kernels accept any layout).
    """
    fmt = x if isinstance(x, torch.memory_format) else memory_format_of(x)
    if fmt is torch.contiguous_format:
        return t.contiguous()
    try:
        return t.contiguous(memory_format=fmt)
    except RuntimeError:  # a batched tensor: "NYI: querying is_contiguous inside of vmap"
        return t


def channel_affine(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` along dimension 1, in ``x``'s dtype."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape)).to(x.dtype)


def channel_shape(x: Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel vector against ``x`` ``(N, C, *)``."""
    return (1, -1) + (1,) * (x.dim() - 2)


def ema(running: Tensor, value: Tensor, factor: Tensor | float) -> None:
    """In place ``running <- (1 - factor) * running + factor * value`` (in ``running``'s dtype), without
    autograd.

    The layers call it without grad mode already; only a caller in grad mode (the functional forms,
    whose ``momentum`` may be a tensor and whose buffers the user owns) enters a ``no_grad`` context,
    whose entry and exit cost as much as the update at small sizes.
    """
    if torch.is_grad_enabled():
        with torch.no_grad():
            return ema(running, value, factor)
    value = value.detach().to(running.dtype)
    if isinstance(factor, Tensor):
        factor = factor.to(running.dtype)
    running.lerp_(value, factor)


def running_update(
    running_mean: Tensor,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: Tensor | float,
    factor: Tensor | float,
) -> None:
    """BatchNorm's update: ``running_mean`` towards ``mean``, ``running_var`` towards the unbiased variance.

    ``var`` is the biased batch variance over ``count`` samples (``m``), so the unbiased one is
    ``var * m / (m - 1)``; ``running_var`` may be ``None``. Without autograd (see :func:`ema`).
    """
    if torch.is_grad_enabled():
        with torch.no_grad():
            return running_update(running_mean, running_var, mean, var, count, factor)
    ema(running_mean, mean, factor)
    if running_var is not None:
        ema(running_var, var * (count / (count - 1)), factor)


def params_in(dtype: torch.dtype, *params: Tensor | None) -> tuple[Tensor | None, ...]:
    """``params`` (``weight``, ``bias``) in ``dtype``, the statistics' dtype.

    torch's CPU kernels take a half/bfloat16 input with float32 parameters and statistics, but not
    half parameters with float32 statistics (a module after ``.half()``, whose statistics stay
    float32). Differentiable: the gradients come back in the parameters' dtype.
    """
    return tuple(p if p is None or p.dtype == dtype else p.to(dtype) for p in params)


# ----------------------------------------------------------------------------- micro-batches
def micro_batch_sizes(n: int, size: int | None) -> list[int]:
    """Sizes of the contiguous micro-batches of ``size`` samples of a batch of ``n`` (the last holds
    the remainder); ``None``: one micro-batch of all ``n``."""
    if size is None or size >= n:
        return [n] if n else []
    return [size] * (n // size) + ([n % size] if n % size else [])


def micro_batch_norm(
    x: Tensor, size: int | None, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Batch normalization of each contiguous micro-batch of ``x`` ``(N, C, *)`` with its own statistics.

    Returns ``y`` and, per micro-batch of :func:`micro_batch_sizes`, the mean and biased variance
    ``(G, C)`` (no gradient) and the value count ``(G,)``. torch's own kernel (twice differentiable,
    as BatchNorm), which leaves each micro-batch's mean and unbiased variance in scratch "running"
    buffers it is given with momentum 1. Micro-batches of one size with a small spatial extent
    (:func:`stacked_micro_batches`) take one call on a copy of ``x`` whose channels are the
    (micro-batch, channel) pairs; otherwise one call per micro-batch, the outputs joined in one copy.
    """
    sizes = micro_batch_sizes(x.size(0), size)
    sdt = stat_dtype(x)
    weight, bias = params_in(sdt, weight, bias)
    if stacked_micro_batches(x, sizes):
        groups, g, c = len(sizes), sizes[0], x.size(1)
        stacked = _stacked(x, groups)
        scratch = x.new_zeros((2, groups * c), dtype=sdt)
        weight, bias = (None if p is None else p.repeat(groups) for p in (weight, bias))
        out = torch.batch_norm(stacked, weight, bias, scratch[0], scratch[1], True, 1.0, eps, False)
        y = out.view(g, groups, c, -1).transpose(0, 1).reshape(x.shape)
        scratch = scratch.view(2, groups, c)
    else:
        scratch = x.new_zeros((2, len(sizes), x.size(1)), dtype=sdt)
        parts = [
            torch.nn.functional.batch_norm(chunk, scratch[0, k], scratch[1, k], weight, bias, True, 1.0, eps)
            for k, chunk in enumerate(x.split(sizes) if len(sizes) > 1 else (x,))
        ]
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
    count = micro_batch_counts(x, sizes)
    # (the kernel saved the scratch buffers for its backward: no in-place op on them)
    var = scratch[1] * ((count - 1) / count).unsqueeze(-1)
    return y, scratch[0].clone(), var, count


# Largest spatial extent (values per sample and channel) at which micro-batches are stacked: there one
# kernel call on a transposed copy beats a call per micro-batch (ResNet shapes, 16 samples in
# micro-batches of 4, forward and backward: 0.5-0.7x the time at 4x4 and 2x2). From 16 values up,
# micro_batch_stats sweeps equal micro-batches at once, and at 8x8 (128 channels) the step without the
# copy is then faster: 200 against 240-250 us above BatchNorm on 2 threads, 150 against 195 on one.
# Where micro_batch_stats cannot sweep them (GPU, half precision, inputs above 8 MiB), stacking pays up
# to 8x8 maps, as before that sweep.
_STACKED_EXTENT = 16
_STACKED_EXTENT_UNSWEPT = 64


def _stacked(x: Tensor, groups: int) -> Tensor:
    """``x`` ``(N, C, *)`` in ``groups`` equal micro-batches as a ``(N / groups, groups C, L)`` copy (``(N /
    groups, groups C)`` for 2-D ``x``): micro-batch ``k``'s channel ``j`` is channel ``k C + j``."""
    g, c = x.size(0) // groups, x.size(1)
    tail = (-1,) if x.dim() > 2 else ()
    return x.reshape(groups, g, c, -1).transpose(0, 1).reshape(g, groups * c, *tail)


def _equal_views(x: Tensor, sizes: list[int] | tuple[int, ...], *others: Tensor) -> bool:
    """Whether ``x`` (and ``others``, laid out as ``x``) are contiguous in micro-batches of one size, so
    that a ``(G, size, C, L)`` view reaches them all in one op."""
    return sizes[-1] == sizes[0] and x.is_contiguous() and all(t.is_contiguous() for t in others)


def _grouped_view(x: Tensor, groups: int) -> Tensor:
    return x.view(groups, x.size(0) // groups, x.size(1), -1)


def stacked_micro_batches(x: Tensor, sizes: list[int]) -> bool:
    """Whether :func:`micro_batch_norm` normalizes the micro-batches ``sizes`` of ``x`` in one call.

    Several micro-batches of one size (no remainder) of a contiguous ``x`` with at most
    ``_STACKED_EXTENT`` values per sample and channel, or at most ``_STACKED_EXTENT_UNSWEPT`` where
    :func:`micro_batch_stats` cannot sweep them at once (GPU, half precision, inputs above 8 MiB).
    """
    if len(sizes) < 2 or not _equal_views(x, sizes):
        return False
    extent = x.numel() // max(1, x.size(0) * x.size(1))
    return extent <= _STACKED_EXTENT or (extent <= _STACKED_EXTENT_UNSWEPT and not _swept(x))


def _swept(x: Tensor) -> bool:
    """Whether :func:`micro_batch_stats` sweeps equal micro-batches of ``x`` all at once."""
    return two_pass_stats(x) and _in_one_sweep(x)


@torch.no_grad()
def check_micro_batches(module: nn.Module | str, x: Tensor, size: int | None) -> None:
    """Raise unless every micro-batch of ``x`` has more than one value per channel (the smallest is the last)."""
    smallest = min(micro_batch_sizes(x.size(0), size), default=0)
    check_input(module, x[:smallest], x.size(1), training=True)


def micro_batch_steps(layer: nn.Module, mean: Tensor, var: Tensor, count: Tensor) -> None:
    """A layer's running statistics after one moving-average step per micro-batch, in order.

    ``mean``/``var`` are ``(G, C)`` (biased variances over ``count`` ``(G,)`` values each);
    ``num_batches_tracked`` counts micro-batches. ``layer`` keeps torch's running buffers and has
    ``momentum`` and ``step_factor()`` (the cumulative average's factor when ``momentum`` is None).
    """
    momentum = layer.momentum
    if momentum is None:  # a cumulative average: each step's factor depends on the count so far
        for m, v, c in zip(mean, var, count):
            running_update(layer.running_mean, layer.running_var, m, v, c, layer.step_factor())
        return
    layer.num_batches_tracked.add_(mean.size(0))
    ema_steps(layer.running_mean, layer.running_var, mean, var, count, momentum)


def ema_steps(
    running_mean: Tensor, running_var: Tensor | None, mean: Tensor, var: Tensor, count: Tensor, f: float
) -> None:
    """``G`` moving-average steps at rate ``f`` in one: ``r_G = (1 - f)^G r_0 + sum_k f (1 - f)^(G-1-k) s_k``.

    ``mean``/``var`` are ``(G, C)`` (biased variances over ``count`` values each; the running
    variance moves towards the unbiased ones). Equal to the ``G`` steps in order up to rounding, in
    one small op per statistic (``addmv_``) instead of ``2 G``.
    """
    g, f = mean.size(0), float(f)
    weights = tuple(f * (1 - f) ** (g - 1 - k) for k in range(g))
    unbiased = var * (count / (count - 1)).unsqueeze(-1)
    for running, values in ((running_mean, mean), (running_var, unbiased)):
        if running is not None:
            w = constant(weights, running.device, running.dtype)
            running.addmv_(values.to(running.dtype).reshape(g, -1).t(), w, beta=(1 - f) ** g)


def micro_batch_counts(x: Tensor, sizes: list[int] | tuple[int, ...]) -> Tensor:
    """The values per channel of each micro-batch of ``x`` ``(N, C, *)``: ``(G,)`` in the statistics' dtype."""
    per_sample = x[0].numel() // max(x.size(1), 1) if x.size(0) else 0
    return torch.tensor([s * per_sample for s in sizes], dtype=stat_dtype(x), device=x.device)


def micro_batch_stats(x: Tensor, sizes: list[int] | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Each micro-batch's ``(G, C)`` mean and biased variance (:func:`channel_stats`; no autograd).

    Equal micro-batches of an input that :func:`channel_stats` takes in two passes of its own (and that
    it would not split into chunks) take those two passes all at once, on the ``(G, size, C, L)`` view;
    others that :func:`stacked_micro_batches` accepts take one call on their stacked copy.
    """
    with torch.no_grad():
        if len(sizes) > 1 and _equal_views(x, sizes) and _swept(x):
            # 4 ops instead of 6 per micro-batch: at 16x64x16x16 in 4 micro-batches, 116 -> 46 us (2 threads).
            return _two_passes(_grouped_view(x, len(sizes)), (1, 3))
        if stacked_micro_batches(x, list(sizes)):
            mean, var = channel_stats(_stacked(x, len(sizes)))
            return mean.view(len(sizes), -1), var.view(len(sizes), -1)
        stats = [channel_stats(c) for c in (x.split(list(sizes)) if len(sizes) > 1 else (x,))]
        return torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats])


def _micro_batch_views(x: Tensor, sizes: list[int] | tuple[int, ...]) -> list[Tensor]:
    """``x`` as at most two views ``(groups, size, C, *)``: the equal micro-batches, then the remainder."""
    full = sizes[0]
    equal = sum(1 for s in sizes if s == full)
    parts = [x[: equal * full].unflatten(0, (equal, full))]
    if equal < len(sizes):
        parts.append(x[equal * full :].unsqueeze(0))
    return parts


def micro_batch_moments(x: Tensor, sizes: list[int] | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Each micro-batch's ``(G, C)`` mean and biased variance in differentiable ops (statistics' dtype)."""
    xs = x.to(stat_dtype(x))
    means, variances = [], []
    for part in _micro_batch_views(xs, sizes):
        v, m = torch.var_mean(part, dim=[1, *range(3, part.dim())], correction=0)
        means.append(m)
        variances.append(v)
    return torch.cat(means), torch.cat(variances)


def micro_batch_affine(
    x: Tensor, sizes: list[int] | tuple[int, ...], scale: Tensor, shift: Tensor, out: Tensor | None = None
) -> Tensor:
    """``x * scale[k] + shift[k]`` over each micro-batch ``k`` of ``x``, with ``(G, C)`` coefficients.

    With ``out`` (shaped and laid out as ``x``, say fresh from ``empty_like``), written there without
    autograd. For float spatial inputs: in contiguous micro-batches of one size, a multiply into
    ``out`` and an add over the ``(G, size, C, L)`` view (ResNet maps, 16 samples in 4 groups, one
    thread: 0.3-0.75x the time of the other ways at 2x2 to 16x16, 1.0x at 32x32); otherwise torch's
    batch-norm inference kernel per micro-batch (mean 0, variance 1, eps 0), 2-3x faster than one
    broadcast multiply-add into ``out``, which 2-D inputs use. Without ``out``, differentiable ops.
    """
    if out is not None and x.dim() > 2 and x.dtype in (torch.float32, torch.float64) and scale.dtype == x.dtype:
        if _equal_views(x, sizes, out):
            groups, shape = len(sizes), (len(sizes), 1, x.size(1), 1)
            ov = torch.mul(_grouped_view(x, groups), scale.reshape(shape), out=_grouped_view(out, groups))
            ov.add_(shift.reshape(shape))
            return out
        zero = torch.zeros(x.size(1), dtype=x.dtype, device=x.device)
        one = torch.ones_like(zero)
        scratch = torch.empty(0, dtype=x.dtype, device=x.device)
        for k, (xc, yc) in enumerate(zip(x.split(list(sizes)), out.split(list(sizes)))):
            torch.ops.aten.native_batch_norm.out(
                xc, scale[k], shift[k], zero, one, False, 0.0, 0.0, out=yc, save_mean=scratch, save_invstd=scratch
            )
        return out
    outs, start = [], 0
    targets = _micro_batch_views(out, sizes) if out is not None else None
    for k, part in enumerate(_micro_batch_views(x, sizes)):
        g = part.size(0)
        shape = (g, 1, part.size(2)) + (1,) * (part.dim() - 3)
        a, b = scale[start : start + g].reshape(shape), shift[start : start + g].reshape(shape)
        if targets is None:
            outs.append(torch.addcmul(b.to(part.dtype), part, a.to(part.dtype)).flatten(0, 1))
        else:
            torch.addcmul(b.to(out.dtype), part.to(out.dtype), a.to(out.dtype), out=targets[k])
        start += g
    if targets is not None:
        return out
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def micro_batch_sums(grad: Tensor, x: Tensor, sizes: list[int] | tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """``sum grad * x`` and ``sum grad`` over each micro-batch and channel: ``(G, C)`` each, no autograd.

    torch's batch-norm backward with mean 0, variance 1 and eps 0 computes exactly these two sums in
    one reading pass, per micro-batch. On rows of fewer than ``_SHORT_ROWS`` values per sample and
    channel (2-D input, 2x2 maps) it is slow, and micro-batches of one size take a product and two
    sums over the ``(G, size, C, L)`` view instead (512x1024 in 16 micro-batches: 0.8x the time on one
    thread, 0.4x on two; 16x512x2x2 in 4: 0.4x, 0.5x).
    """
    sdt = stat_dtype(x)
    with torch.no_grad():
        if _equal_views(x, sizes, grad) and x.numel() < _SHORT_ROWS * x.size(0) * x.size(1):
            groups = len(sizes)
            gv = _grouped_view(grad.to(sdt), groups)
            return torch.mul(gv, _grouped_view(x.to(sdt), groups)).sum((1, 3)), gv.sum((1, 3))
        # (the kernel reads these as dense vectors: no expanded 0-d constants)
        zeros = torch.zeros(x.size(1), dtype=sdt, device=x.device)
        args = (None, zeros, torch.ones_like(zeros), None, None, False, 0.0, [False, True, True])
        sums = [
            torch.ops.aten.native_batch_norm_backward(gc, xc, *args)
            for gc, xc in zip(grad.split(list(sizes)), x.split(list(sizes)))
        ]
        return torch.stack([t[1] for t in sums]), torch.stack([t[2] for t in sums])


_SHORT_ROWS = 16


def micro_batch_accumulate_(out: Tensor, t: Tensor, sizes: list[int] | tuple[int, ...], scale: Tensor) -> Tensor:
    """In place ``out += t * scale[k]`` over each micro-batch ``k``, with ``(G, C)`` ``scale``; no autograd.

    One op over the ``(G, size, C, L)`` views where they exist (micro-batches of one size, both
    contiguous), else one per micro-batch.
    """
    shape = (1, -1) + (1,) * (out.dim() - 2)
    with torch.no_grad():
        scale = scale.to(out.dtype)
        if _equal_views(out, sizes, t):
            groups = len(sizes)
            _grouped_view(out, groups).addcmul_(_grouped_view(t, groups), scale.reshape(groups, 1, out.size(1), 1))
            return out
        for k, (part, tpart) in enumerate(zip(out.split(list(sizes)), t.split(list(sizes)))):
            part.addcmul_(tpart, scale[k].reshape(shape))
    return out
