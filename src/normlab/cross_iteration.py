"""Cross-Iteration Batch Normalization (Yao, Cao, Zheng, Huang, Lin, "Cross-Iteration Batch
Normalization", CVPR 2021, arXiv 2002.05712), for training with tiny batches.

Let ``theta`` be the weights of the layer whose output the normalization receives (the *producer*,
a convolution or linear layer) and ``mu_t``, ``nu_t`` the per-channel mean and mean square
``E[x^2]`` of the current batch. The statistics of iteration ``t - tau`` were computed under older
weights; a first-order Taylor step moves them to the current ones::

    mu_{t-tau}(theta_t) = mu_{t-tau} + d mu_{t-tau} / d theta . (theta_t - theta_{t-tau})
    nu_{t-tau}(theta_t) = nu_{t-tau} + d nu_{t-tau} / d theta . (theta_t - theta_{t-tau})

and the window of the current and the ``k - 1`` previous iterations is pooled::

    mu_bar     = (1/k) sum_tau mu_{t-tau}(theta_t)
    nu_bar     = (1/k) sum_tau max(nu_{t-tau}(theta_t), mu_{t-tau}(theta_t)^2)
    sigma_bar2 = nu_bar - mu_bar^2
    y          = gamma * (x - mu_bar) / sqrt(sigma_bar2 + eps) + beta

Gradients flow through the current ``mu_t`` and ``nu_t`` only; the stored statistics are
constants. Only the producer's weights are compensated (the paper shows that the earlier layers'
effect is negligible). For the first ``burn_in`` training steps the layer is plain batch
normalization and stores nothing; the window then fills over the next ``k - 1`` steps (until it is
full, the pool is over the iterations stored so far). ``running_mean``/``running_var`` follow the
current batch's statistics exactly as in BatchNorm and are what inference uses.

Closed-form derivatives. For a producer ``y_c = W_c . p + b_c`` over input patches ``p`` (a
convolution, groups allowed, or a linear layer), ``mu_c`` depends on ``W_c`` alone and::

    d mu_c / d W_c = mean_i p_i                 (the mean input patch, the same for every c of a group)
    d nu_c / d W_c = (2/m) sum_i y_ic p_i       (a weight gradient with grad_output 2 y / m)
    d mu_c / d b_c = 1,   d nu_c / d b_c = 2 mu_c

Both are weight gradients of the producer (``aten.convolution_backward`` with only the weight
mask, or a matmul for a linear layer): the first for ``grad_output = 1`` on the batch-summed input
(tiny), the second for ``grad_output = y`` (the one sizeable extra cost per step, about that of the
producer's forward); no autograd graph is built or kept. A producer bias is compensated as well
(it shifts ``mu`` and ``nu``) with the bias terms above, so of it only the bias itself is stored.
``max(nu, mu^2)`` is the paper's rule (its public code instead drops window entries whose
compensated variance is negative).

Because ``mu`` is linear in ``theta`` the compensated mean is exact; the compensated mean square is
exact to first order (its error is quadratic in the weight change). The Taylor step is evaluated
as ``(mu - d mu/d theta . theta_{t-tau}) + d mu/d theta . theta_t`` (likewise for ``nu``): the
bracket is fixed once the iteration is stored, so each step costs one matmul per statistic over
the whole window.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchStats, NormBase
from .checks import UNSET, check_input, keyword_options
from .comm import global_sum
from .dispatch import FusedStep
from .kernels import (
    buffer_dtype,
    channel_affine,
    channel_moments,
    channel_shape,
    in_format_of,
    inference_batch_norm,
    params_in,
    running_update,
    stat_dtype,
    stats_and_output_buffer,
)
from .pairing import out_channels

__all__ = ["CrossIterationBatchNorm", "COMPENSATED", "pooled_batch_norm", "producer_derivatives", "compensate"]

#: The producers whose weights the window is compensated for.
COMPENSATED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# The state that BatchNorm checkpoints lack; loading one resets it (see _load_from_state_dict).
_WINDOW_FLOATS = ("window_mean", "window_sqmean", "window_dmean", "window_dsqmean", "window_intercept")
_WINDOW_STATE = ("num_steps", "window_count", *_WINDOW_FLOATS)
# What checkpoints from before the intercepts were kept stored instead: each slot's producer weight and
# bias, from which a load derives the intercepts.
_LEGACY_WINDOW = ("window_weight", "window_bias")


_LEGACY_ORDER = ("eps", "momentum", "affine", "track_running_stats", "window", "burn_in", "device", "dtype")


def _legacy_order(args: tuple[Any, ...]) -> bool:
    # Before the options were keyword-only, window (an int) came right after track_running_stats.
    return len(args) > 4 and isinstance(args[4], int) and not isinstance(args[4], bool)


class CrossIterationBatchNorm(NormBase):
    """Cross-Iteration Batch Normalization over inputs ``(N, C, *)`` (Yao et al. 2021).

    Args:
        num_features: ``C``.
        eps: added to the pooled variance.
        momentum: rate of ``running_mean``/``running_var`` (``None``: cumulative average).
        affine: learnable ``gamma``/``beta``.
        track_running_stats: keep BatchNorm's running statistics for inference (without them, eval
            mode normalizes with the batch's own statistics, as torch does).
        window: ``k``, the number of iterations pooled (the current one and ``k - 1`` stored ones);
            the paper uses 8 for ImageNet. ``window=1`` is batch normalization.
        burn_in: training steps of plain batch normalization before the window is used (the paper
            uses a burn-in while the weights still change fast); 0 starts the window at once.
        save_window: keep the window in the state dict (the default), so that a resumed run pools
            exactly as the uninterrupted one. ``False`` leaves it out (ResNet-18 widths and depth, window 8:
            about 342 MiB of state dict with it, 43 MiB without, as with BatchNorm); a loaded layer
            then starts with an empty window and refills it over ``window - 1`` steps.

    ``window``, ``burn_in`` and ``save_window`` are keyword-only (the earlier positional order, after
    ``track_running_stats``, still works with a ``DeprecationWarning``).

    Pairing. The compensation needs the producer, the convolution (``nn.Conv1d/2d/3d``, any groups,
    stride, dilation and padding mode; not transposed) or ``nn.Linear`` (2-D input) whose output goes
    straight into this layer: ``CrossIterationBatchNorm(64).attach(conv)`` by hand, or
    :func:`normlab.convert` with ``"cbn"`` for whole models. The producer is *not* a submodule (its
    parameters stay where they are, once): the layer keeps a plain reference to it and puts a forward
    hook on it that hands over the producer's input and output. ``copy.deepcopy`` of a model keeps
    every pair (the copied layer is paired with the copied producer); deep-copying a paired layer on
    its own copies its producer with it, so ``attach`` the copy to the layer you mean.
    ``nn.DataParallel`` replicas are not supported (use DistributedDataParallel with
    :func:`normlab.sync`; the window then holds the global statistics and derivatives).
    While the window is in use, each training input must be the tensor the producer has just
    returned; anything else raises a ``ValueError`` before any state changes.
    An unpaired layer (``attach(None)``, the default) pools the stored statistics *uncompensated*
    (the paper's "naive" baseline) and warns once.

    State. Besides BatchNorm's ``running_mean``, ``running_var`` and ``num_batches_tracked``, the
    window lives in buffers (saved and restored with the state dict, in the layer's float dtype;
    float32 for half/bfloat16 layers): ``num_steps`` (training steps taken, for the burn-in),
    ``window_count`` (iterations stored since the window was reset; the ring's fill count and write
    position), and per slot ``window_mean``/``window_sqmean`` ``(k-1, C)``, ``window_dmean``
    ``(k-1, groups, F)``, ``window_dsqmean`` ``(k-1, C, F)`` and ``window_intercept`` ``(2, k-1, C)``,
    with ``F`` the fan-in of one output channel (``W[c].numel()``; kept flat so that
    ``model.to(memory_format=...)`` leaves them alone). Unpaired, ``F = 0``. ``window_intercept``
    holds each slot's part of the Taylor step that does not involve the current weights,
    ``mu - dmu/dW . W_old - b_old`` and ``nu - dnu/dW . W_old - 2 mu b_old`` (see :func:`compensate`),
    computed when the iteration is stored, so that the producer's past weights are not kept: one
    weight-sized tensor per slot (``window_dsqmean``). Checkpoints that stored the past weights
    (``window_weight``, ``window_bias``) load, their intercepts derived from them. A BatchNorm
    checkpoint (which has none of these) loads with a fresh window and ``num_steps = 0``; ``attach``
    also resets the window.
    """

    @keyword_options(_LEGACY_ORDER, _legacy_order)
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
        window: int = 8,
        burn_in: int = 0,
        save_window: bool = True,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"CrossIterationBatchNorm: expected window to be an int >= 1, got {window!r}")
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"CrossIterationBatchNorm: expected burn_in to be an int >= 0, got {burn_in!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.window = window
        self.burn_in = burn_in
        self.save_window = bool(save_window)
        object.__setattr__(self, "_producer", None)
        self._captured: tuple[Tensor, Tensor] | None = None
        self._warned_unpaired = False
        sdt = buffer_dtype(dtype) or torch.get_default_dtype()
        self.register_buffer("num_steps", torch.tensor(0, dtype=torch.long, device=device))
        # Without save_window the window (and its fill count) stays out of the state dict.
        persistent = self.save_window
        self.register_buffer("window_count", torch.tensor(0, dtype=torch.long, device=device), persistent=persistent)
        for name in _WINDOW_FLOATS:
            self.register_buffer(name, torch.zeros(0, device=device, dtype=sdt), persistent=persistent)
        self.reset_window()

    # ------------------------------------------------------------------------- pairing
    @property
    def producer(self) -> nn.Module | None:
        """The layer whose weights the stored statistics are compensated for, or ``None``."""
        return self.__dict__.get("_producer")

    def attach(self, producer: nn.Module | None) -> CrossIterationBatchNorm:
        """Pair with ``producer`` (a conv or linear layer whose output feeds this layer), or unpair.

        Removes the hook from any previous producer and resets the window. Returns ``self``.
        """
        if producer is not None:
            if not _supported(producer):
                raise ValueError(
                    "CrossIterationBatchNorm: expected the producer to be nn.Conv1d/Conv2d/Conv3d or nn.Linear, "
                    f"got {type(producer).__name__}"
                )
            if out_channels(producer) != self.num_features:
                raise ValueError(
                    f"CrossIterationBatchNorm: expected a producer with {self.num_features} output channels, "
                    f"got {type(producer).__name__} with {out_channels(producer)}"
                )
        self._remove_hook()
        object.__setattr__(self, "_producer", producer)
        self._captured = None
        if producer is not None:
            producer.register_forward_hook(_ProducerHook(self))
        self.reset_window()
        return self

    def _remove_hook(self) -> None:
        old = self.producer
        if old is None:
            return
        for key, hook in list(old._forward_hooks.items()):
            if isinstance(hook, _ProducerHook) and hook.ref() is self:
                del old._forward_hooks[key]

    def __getstate__(self) -> dict[str, Any]:
        # The producer's last input/output belong to one step (and cannot be deep-copied).
        return {**self.__dict__, "_captured": None}

    # ------------------------------------------------------------------------- window
    def _slot_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one slot's ``dsqmean`` (the weight's) and ``dmean`` for the current producer."""
        p, c = self.producer, self.num_features
        w = None if p is None else p.weight
        if w is None or isinstance(w, nn.parameter.UninitializedParameter):
            return (c, 0), (1, 0)
        groups = getattr(p, "groups", 1)
        fan_in = w.numel() // w.size(0)  # (not w[0].numel(): an indexing op at every step)
        return (c, fan_in), (groups, fan_in)

    @torch.no_grad()
    def reset_window(self) -> None:
        """Empty the window (sized for the current producer); ``num_steps`` is kept."""
        cap, c = self.window - 1, self.num_features
        ref = self.window_mean
        w_shape, mu_shape = self._slot_shapes()
        new = {
            "window_mean": (cap, c),
            "window_sqmean": (cap, c),
            "window_dmean": (cap, *mu_shape),
            "window_dsqmean": (cap, *w_shape),
            "window_intercept": (2, cap, c),
        }
        for name, shape in new.items():
            buf = getattr(self, name)
            if tuple(buf.shape) == shape:
                buf.zero_()  # in place: keeps the tensors that e.g. DDP's buffer list refers to
            else:
                setattr(self, name, torch.zeros(shape, dtype=ref.dtype, device=ref.device))
        self.window_count.zero_()

    def reset_running_stats(self) -> None:
        """Reset as BatchNorm does, and the window and ``num_steps`` (the burn-in starts again)."""
        super().reset_running_stats()
        if "num_steps" in self._buffers:  # (NormBase's constructor calls this before they exist)
            self.reset_window()
            self.num_steps.zero_()

    def _window_matches(self) -> bool:
        w_shape, mu_shape = self._slot_shapes()
        return tuple(self.window_dsqmean.shape[1:]) == w_shape and tuple(self.window_dmean.shape[1:]) == mu_shape

    def _float32_buffers(self) -> tuple[str, ...]:
        return (*super()._float32_buffers(), *_WINDOW_FLOATS)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):  # noqa: ANN001 - torch's signature
        self._derive_legacy_intercepts(state_dict, prefix)
        has_window = any(prefix + name in state_dict for name in _WINDOW_STATE)
        # A BatchNorm checkpoint has running statistics and no window; a partial state dict (say weight
        # and bias alone, strict=False) has neither, and leaves the window and counters as they are.
        from_batchnorm = not has_window and prefix + "running_mean" in state_dict
        errors = len(error_msgs)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if from_batchnorm:
            for name in _WINDOW_STATE:
                if prefix + name in missing_keys:
                    missing_keys.remove(prefix + name)
        if len(error_msgs) > errors:
            return  # a failed load changes nothing more
        if from_batchnorm:
            # Its learned state is loaded; the window, measured under other weights, starts empty.
            self.reset_window()
            self.num_steps.zero_()
        elif not self.save_window and prefix + "num_steps" in state_dict:
            self.reset_window()  # not in the checkpoint: refilled over the next window - 1 steps

    @torch.no_grad()
    def _derive_legacy_intercepts(self, state_dict: dict[str, Any], prefix: str) -> None:
        """A checkpoint with the slots' past weights and biases: their intercepts in their place."""
        weight, bias = (state_dict.pop(prefix + name, None) for name in _LEGACY_WINDOW)
        keys = [prefix + k for k in ("window_mean", "window_sqmean", "window_dmean", "window_dsqmean")]
        if weight is None or prefix + "window_intercept" in state_dict or not all(k in state_dict for k in keys):
            return
        mean, sqmean, dmean, dsqmean = (state_dict[k] for k in keys)
        bias = None if bias is None or bias.size(1) == 0 else bias
        state_dict[prefix + "window_intercept"] = torch.stack(
            _slot_intercepts(mean, sqmean, dmean, dsqmean, weight, bias)
        )

    def extra_repr(self) -> str:
        name = None if self.producer is None else type(self.producer).__name__
        saved = "" if self.save_window else ", save_window=False"
        return f"{super().extra_repr()}, window={self.window}, burn_in={self.burn_in}{saved}, producer={name}"

    # ------------------------------------------------------------------------- forward
    def normalize_running(self, x: Tensor) -> Tensor:
        self._captured = None
        return super().normalize_running(x)

    # ------------------------------------------------------------------------- the paper's steps
    def normalize_batch(self, x: Tensor, group: Any | None) -> tuple[Tensor, BatchStats]:
        """Batch normalization with the window pooled in (burn-in, window 1: with the batch alone).

        The statistics of this step and, when windowed, the derivative sums to store travel to
        :meth:`record_step` in the returned :class:`BatchStats`; nothing is stored here.

        Whether the burn-in is over is a tensor (``num_steps >= burn_in``), and so is which slots of
        the window are filled, so that ``torch.compile`` needs no count on the host. In eager mode the
        host reads the first (one synchronization, as the non-finite guard's) and runs burn-in steps
        as plain batch normalization; compiled, a burn-in step is the pooled step with an empty window
        (the same values) whose window write is masked out.
        """
        burnt_in = None if not self.training or self.window == 1 else self.num_steps >= self.burn_in
        if burnt_in is None or not (torch.compiler.is_compiling() or bool(burnt_in)):
            self._captured = None
            y, mean, var, count = _batch_norm_step(x, self.weight, self.bias, self.eps, group)
            return y, BatchStats(mean, var, count)
        captured = self._checked_capture(x)  # validates before any state is touched
        if not self._window_matches():  # e.g. a lazy producer that has just been materialized
            self.reset_window()
        if self.producer is None and not self._warned_unpaired and not torch.compiler.is_compiling():
            self._warned_unpaired = True
            warnings.warn(
                "CrossIterationBatchNorm: no producer attached: the window pools uncompensated statistics "
                "(pair it with attach(conv) or normlab.convert)",
                stacklevel=5,
            )
        sums = None
        if captured is not None:
            dt = self.window_mean.dtype
            sums = _derivative_sums(self.producer, captured[0].detach().to(dt), x.detach().to(dt), group)
        # This step's derivative sums go along, so that the one reading of the weights serves the
        # window's Taylor step and this iteration's intercepts (their products with W, `new`).
        past_mean, past_sqmean, valid, new = self._window_statistics(sums)
        valid = valid & burnt_in
        y, mean, var, count = _pooled_step(x, self.weight, self.bias, past_mean, past_sqmean, self.eps, group, valid)
        return y, BatchStats(mean, var, count, (burnt_in, sums, new))

    def guarded_statistics(self, stats: BatchStats) -> tuple[Any, ...]:
        """The batch's mean and variance and, windowed, this step's derivative sums by way of their
        products with the weights (``(1, C)`` each; not finite whenever the sums are not), rather than
        the weight-sized sums themselves, which would cost a pass over them."""
        return (stats.mean, stats.var, stats.extra[2]) if stats.extra else (stats.mean, stats.var)

    def record_step(self, stats: BatchStats) -> None:
        """The running statistics, this iteration into the window (when burnt in), and the step count."""
        super().record_step(stats)
        if stats.extra:
            burnt_in, sums, new = stats.extra
            self._push(burnt_in, stats.mean, stats.var, sums, stats.count, new)
        self.num_steps.add_(1)

    @torch.no_grad()
    def _window_statistics(
        self, sums: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """Every slot's mean and mean square moved to the producer's current weights, ``(k-1, C)`` each,
        which slots are filled, ``(k-1,)`` (unpaired: the stored values as they are), and with this
        step's derivative ``sums``, their products with the current weights (see :func:`_taylor_step`)."""
        valid = torch.arange(self.window - 1, device=self.window_count.device) < self.window_count
        mean, sqmean = self.window_mean, self.window_sqmean
        p = self.producer
        if p is None:
            return mean, sqmean, valid, None
        bias = None if p.bias is None else p.bias.detach()
        weight = p.weight.detach().reshape(self.num_features, -1)
        mean_t, sqmean_t, new = _taylor_step(
            self.window_intercept[0],
            self.window_intercept[1],
            mean,
            self.window_dmean,
            self.window_dsqmean,
            weight,
            bias,
            sums,
        )
        return mean_t, sqmean_t, valid, new

    @torch.no_grad()
    def past_statistics(self) -> tuple[Tensor, Tensor]:
        """The stored means and mean squares moved to the producer's current weights: ``(n, C)`` each.

        ``n = min(window_count, window - 1)``, the filled slots; unpaired, the stored values as they are.
        """
        mean, sqmean, valid, _ = self._window_statistics()
        return mean[valid], sqmean[valid]

    def _checked_capture(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The producer's input and output of this step; raise unless ``x`` is that output."""
        captured, self._captured = self._captured, None
        p = self.producer
        if p is None:
            return None
        expected_dim = 2 if isinstance(p, nn.Linear) else p.weight.dim()
        if captured is None or captured[1] is not x:
            raise ValueError(
                f"CrossIterationBatchNorm: expected its input to be the output of its producer "
                f"{type(p).__name__} in this step (the window compensation needs the producer's input), "
                "got a tensor the producer did not just return; pair with the layer that feeds this one "
                "(attach) or unpair (attach(None))"
            )
        if not isinstance(captured[0], Tensor) or captured[0].dim() != expected_dim:
            raise ValueError(
                f"CrossIterationBatchNorm: expected the producer {type(p).__name__} to take a batched input "
                f"with {expected_dim} dimensions, got shape {tuple(captured[0].shape)}"
            )
        return captured

    @torch.no_grad()
    def _push(
        self,
        burnt_in: Tensor,
        mean: Tensor,
        var: Tensor,
        sums: tuple[Tensor, Tensor] | None,
        count: Tensor | float,
        products: tuple[Tensor, Tensor] | None,
    ) -> None:
        """Store this iteration's statistics, derivatives and Taylor-step intercepts in the oldest slot.

        ``products`` are the derivative ``sums``' products with the weights this iteration ran with
        (:func:`_taylor_step`'s ``new``).

        The slot is ``window_count`` modulo ``k - 1`` (read on the host eagerly, a tensor index traced);
        a step that is still in the burn-in (``burnt_in`` false, compiled only) writes nothing and does
        not count.
        """
        slot = (self.window_count % (self.window - 1)).reshape(1)
        if not torch.compiler.is_compiling():
            # Eagerly the host has read the burn-in flag already; with the slot on the host too, a
            # weight-sized slot is written in one pass (scaled on the way), not staged in a temporary.
            slot = int(slot)
        sqmean = torch.addcmul(var, mean, mean)
        _write_slot(self.window_mean, slot, mean, burnt_in)
        _write_slot(self.window_sqmean, slot, sqmean, burnt_in)
        p = self.producer
        if sums is not None and p is not None:
            # The derivatives are the sums over the count samples (and 2 / m for nu), scaled in the store.
            scale = 1 / count
            _write_slot(self.window_dmean, slot, sums[0], burnt_in, scale)
            _write_slot(self.window_dsqmean, slot, sums[1], burnt_in, 2 * scale)
            # The intercepts with the weights this iteration ran with (the producer's, not yet stepped).
            c, dt = self.num_features, self.window_mean.dtype
            bias = None if p.bias is None else p.bias.detach()
            d_mu, d_nu = products
            intercepts = _intercepts_of(
                mean.to(dt).reshape(1, c), sqmean.to(dt).reshape(1, c), d_mu * scale, d_nu * (2 * scale), bias
            )
            _write_slot(self.window_intercept.transpose(0, 1), slot, torch.cat(intercepts), burnt_in)
        self.window_count.add_(burnt_in.to(self.window_count.dtype))


# ----------------------------------------------------------------------------------- functional core
def pooled_batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = UNSET,
    momentum: float | Tensor | None = UNSET,
    eps: float = 1e-5,
    *,
    past_mean: Tensor | None = None,
    past_sqmean: Tensor | None = None,
    process_group: Any | None = None,
) -> Tensor:
    """Cross-iteration batch normalization of ``x`` ``(N, C, *)``, in ``F.batch_norm``'s shape.

    ``training=False``: batch normalization with the running statistics. ``training=True``: the
    batch's statistics (global over ``process_group``) pooled with ``past_mean`` and
    ``past_sqmean``, ``(n, C)`` each: the (already compensated) means and mean squares ``E[x^2]`` of
    ``n`` earlier iterations, treated as constants (none given: batch normalization). With
    ``momentum`` (default 0.1) the running statistics that are given move towards the current
    batch's, as BatchNorm moves them; ``momentum=None`` leaves them as they are.

    Deprecated: the earlier form ``pooled_batch_norm(x, past_mean, past_sqmean, weight, bias, eps,
    group)``, which always trained and returned ``(y, mean, var, m)``, is still accepted (any call
    without a bool ``training``) with a ``DeprecationWarning``.
    """
    if training is UNSET or not isinstance(training, bool):
        warnings.warn(
            "pooled_batch_norm(x, past_mean, past_sqmean, weight, bias, eps, group) is deprecated; the "
            "arguments now follow F.batch_norm: (x, running_mean, running_var, weight, bias, training, "
            "momentum, eps, *, past_mean, past_sqmean, process_group)",
            DeprecationWarning,
            stacklevel=2,
        )
        old_eps = eps if training is UNSET else training
        group = process_group if momentum is UNSET else momentum
        y, mean, var, count = _pooled_step(x, weight, bias, running_mean, running_var, old_eps, group)
        if not isinstance(count, Tensor):
            count = torch.tensor(float(count), dtype=mean.dtype, device=x.device)
        return y, mean, var, count  # type: ignore[return-value]
    momentum = 0.1 if momentum is UNSET else momentum
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    check_input("pooled_batch_norm", x, x.size(1), process_group is None)
    if past_mean is None or past_sqmean is None:
        past_mean = past_sqmean = x.new_zeros((0, x.size(1)), dtype=stat_dtype(x))
    y, mean, var, count = _pooled_step(x, weight, bias, past_mean, past_sqmean, eps, process_group)
    if momentum is not None and running_mean is not None:
        running_update(running_mean, running_var, mean, var, count, momentum)
    return y


@torch.no_grad()
def producer_derivatives(
    producer: nn.Module, inp: Tensor, out: Tensor, count: Tensor, group: Any | None = None
) -> tuple[Tensor, Tensor]:
    """Closed-form ``d mu / d W`` and ``d nu / d W`` of the producer's output channels.

    ``inp``/``out`` are the producer's input and output of this step and ``count`` the number of
    samples per channel (global over ``group``). Returns ``dmean`` of shape ``(groups, *W.shape[1:])``
    (``d mu_c / d W_c`` is the same for all output channels ``c`` of a group) and ``dsqmean`` of
    ``W.shape``. With a process ``group`` the sums travel in one all_reduce, so both are the
    derivatives of the global statistics.
    """
    dmu, dsq = _derivative_sums(producer, inp, out, group)
    return dmu / count, dsq * (2 / count)


@torch.no_grad()
def compensate(
    mean: Tensor,
    sqmean: Tensor,
    dmean: Tensor,
    dsqmean: Tensor,
    old_weight: Tensor,
    weight: Tensor,
    old_bias: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """First-order Taylor step of stored statistics ``(n, C)`` to the producer's current weights.

    With ``F`` the fan-in of one output channel (``W[c].numel()``): ``dmean`` is ``(n, groups, F)``,
    ``dsqmean`` and ``old_weight`` are ``(n, C, F)``, ``weight`` is ``W`` (any shape ``(C, ...)``);
    ``old_bias`` ``(n, C)`` and ``bias`` ``(C,)`` when the producer has one.
    Returns the compensated ``mu_{t-tau}(theta_t)`` and ``nu_{t-tau}(theta_t)``.

    Computed as ``(mu - dmu/dW . W_old) + dmu/dW . W`` (likewise for ``nu`` and the bias): the same
    step, split so that a layer computes the first part once when it stores an iteration and only
    the second, one matmul per statistic over the whole window, in every later step.
    """
    if bias is None or old_bias is None:
        bias = old_bias = None
    mean_0, sqmean_0 = _slot_intercepts(mean, sqmean, dmean, dsqmean, old_weight, old_bias)
    return _taylor_step(mean_0, sqmean_0, mean, dmean, dsqmean, weight.reshape(mean.size(1), -1), bias)[:2]


# ----------------------------------------------------------------------------------- pairing
class _ProducerHook:
    """Forward hook on the producer that hands its input and output to the paired layer.

    It holds the layer weakly, so a layer that is replaced (e.g. by ``convert``) lets its hook go
    quiet instead of being kept alive by it. Deep copies follow the layer through the copy's memo,
    so ``copy.deepcopy(model)`` leaves the copied producer hooked to the copied layer.
    """

    def __init__(self, layer: CrossIterationBatchNorm) -> None:
        self.ref = weakref.ref(layer)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        layer = self.ref()
        if layer is not None and layer.training and args and isinstance(output, Tensor):
            layer._captured = (args[0], output)

    def __deepcopy__(self, memo: dict[int, Any]) -> _ProducerHook:
        layer = self.ref()
        return _ProducerHook(copy.deepcopy(layer, memo)) if layer is not None else _DeadHook()

    def __getstate__(self) -> dict[str, Any]:
        return {"layer": self.ref()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        layer = state["layer"]
        self.ref = weakref.ref(layer) if layer is not None else (lambda: None)


class _DeadHook(_ProducerHook):
    """A hook whose layer is gone: does nothing."""

    def __init__(self) -> None:
        self.ref = lambda: None


def _supported(producer: nn.Module) -> bool:
    return isinstance(producer, COMPENSATED)


# ----------------------------------------------------------------------------------- kernels
def _batch_norm_step(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group: Any | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | int]:
    """``(y, mean, biased var, m)`` of plain batch normalization (burn-in, window 1), without a running update.

    Locally torch's own kernel (twice differentiable, as ``nn.BatchNorm2d``), which leaves the
    batch's mean and unbiased variance in the scratch "running" buffers it is given with momentum 1.
    """
    if group is None:
        scratch = x.new_zeros((2, x.size(1)), dtype=stat_dtype(x))
        weight, bias = params_in(scratch.dtype, weight, bias)
        y = F.batch_norm(x, scratch[0], scratch[1], weight, bias, True, 1.0, eps)
        m = x.numel() // x.size(1)
        return y, scratch[0], scratch[1] * ((m - 1) / m), m  # (the kernel saved the buffers: no in-place op)
    mean, var, count = channel_moments(x, group, "CrossIterationBatchNorm")
    y = channel_affine(x, mean, torch.rsqrt(var + eps), weight, bias)
    return y, mean.detach(), var.detach(), count


def _pooled_step(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    past_mean: Tensor,
    past_sqmean: Tensor,
    eps: float,
    group: Any | None,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | int]:
    """``(y, mean, biased var, m)``: ``x`` normalized with its statistics pooled with the past ones.

    ``valid`` (``(n,)`` bool, default all) says which of the ``n`` past rows are pooled. The current
    batch's statistics come back without gradient (global over ``group``). Locally the fused step
    below; over a process group composed of differentiable ops on the global statistics.
    """
    if valid is None:
        valid = torch.ones(past_mean.size(0), dtype=torch.bool, device=x.device)
    if group is None:
        sdt = stat_dtype(x)
        past = (past_mean.detach().to(sdt), past_sqmean.detach().to(sdt))
        y, mean, var = _POOLED(x, weight, bias, *past, valid, eps)[:3]
        return y, mean, var, x.numel() // x.size(1)
    # Synchronized: the global statistics and their gradients through global_sum's all_reduce.
    mean, var, count = channel_moments(x, group, "CrossIterationBatchNorm")
    mean_bar, var_bar = _pool(mean, var, past_mean, past_sqmean, valid)
    y = channel_affine(x, mean_bar, torch.rsqrt(var_bar + eps), weight, bias)
    return y, mean.detach(), var.detach(), count


# The local pooled step on torch's native batch-norm kernels: ``y = gamma (x - mu_bar) /
# sqrt(sigma_bar^2 + eps) + beta``. With ``n`` pooled iterations (a tensor: 1 + the valid past rows,
# so that no count is read on the host) and the past ones constant,
# ``d mu_bar / d mu_t = d nu_bar / d nu_t = 1/n``, and the input gradient works out to batch
# normalization's with its two batch-mean terms divided by ``n``::
#
#     dx = gamma s (g - mean(g) / n - x_hat mean(g x_hat) / n),   s = 1 / sqrt(sigma_bar^2 + eps)
#        = [native BN backward with weight gamma / n] + (1 - 1/n) gamma s g
#
# where the native kernel is given ``mu_bar`` and ``s`` as the saved statistics. ``dgamma =
# sum(g x_hat)`` and ``dbeta = sum(g)`` as in BN.
def _pooled_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    past_mean: Tensor,
    past_sqmean: Tensor,
    valid: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, mu_bar, s)``: the output, the current batch's mean and biased variance, and
    the pooled mean and inverse standard deviation the backward reads."""
    mean, var, out = stats_and_output_buffer(x)
    mean, var = mean.to(past_mean.dtype), var.to(past_mean.dtype)
    mean_bar, var_bar = _pool(mean, var, past_mean, past_sqmean, valid)
    # Parameters in the statistics dtype: the CPU kernels take half inputs with float32 parameters.
    gamma = None if weight is None else weight.to(mean.dtype)
    beta = None if bias is None else bias.to(mean.dtype)
    y = inference_batch_norm(x, gamma, beta, mean_bar, var_bar, eps, out)
    return y, mean, var, mean_bar, torch.rsqrt(var_bar + eps)


def _pooled_fake(x, weight, bias, past_mean, past_sqmean, valid, eps):  # noqa: ANN001, ANN202
    stat = past_mean.new_empty(x.size(1))
    return torch.empty_like(x), stat, stat.clone(), stat.clone(), stat.clone()


def _pooled_setup(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, rest: tuple, outputs) -> None:  # noqa: ANN001
    past_mean, past_sqmean, valid, eps = rest
    _, _, _, mean_bar, invstd = outputs
    ctx.save_for_backward(x, weight, mean_bar, invstd, valid)
    ctx.eps = eps
    # For second derivatives (small; the window slots they may view are overwritten later).
    ctx.past = (past_mean.clone(), past_sqmean.clone(), valid.clone())
    ctx.bias_dtype = None if bias is None else bias.dtype


def _pooled_backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # noqa: ANN001
    x, weight, mean_bar, invstd, valid = ctx.saved_tensors
    n = valid.sum().to(invstd.dtype) + 1
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    gamma = torch.ones_like(invstd) if weight is None else weight.to(invstd.dtype)
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
        in_format_of(grad_y, x),
        x,
        gamma / n,
        None,
        None,
        mean_bar,
        invstd,
        True,
        ctx.eps,
        [need_x, need_w, need_b],
    )
    if need_x:  # (a zero factor when nothing was pooled: no branch on the count)
        gx.addcmul_(grad_y, (gamma * invstd * ((n - 1) / n)).to(gx.dtype).reshape(channel_shape(x)))
    return (
        gx if need_x else None,
        gw.to(weight.dtype) if need_w and weight is not None else None,
        gb.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None,
    )


def _pooled_composite(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:  # noqa: ANN001
    """The pooled step in differentiable ops, with this step's past statistics (for second derivatives)."""
    mean, var, _ = channel_moments(x)
    mean_bar, var_bar = _pool(mean, var, *ctx.past)
    return channel_affine(x, mean_bar, torch.rsqrt(var_bar + ctx.eps), weight, bias)


_POOLED = FusedStep(
    "normlab::cross_iteration_train",
    _pooled_forward,
    _pooled_setup,
    _pooled_backward,
    _pooled_fake,
    layer="CrossIterationBatchNorm",
    composite=_pooled_composite,
)


def _write_slot(
    buf: Tensor, slot: int | Tensor, value: Tensor, keep: Tensor, scale: Tensor | float | None = None
) -> None:
    """``buf[slot] = value`` (times ``scale``) where ``keep`` (0-d bool) is true.

    ``slot`` is an int in eager mode, whose steps reach the window only once the host has seen the
    burn-in end (``keep`` is true): one write into the slot, without reading it back (the derivative
    slots are weight-sized). Traced, it is a one-element index tensor and the write is masked by ``keep``.
    """
    value = value.reshape(1, *buf.shape[1:])
    if isinstance(slot, int):
        dest = buf[slot : slot + 1]
        if scale is None:
            dest.copy_(value)
        else:
            torch.mul(value, scale, out=dest)
        return
    value = (value if scale is None else value * scale).to(buf.dtype)
    buf.index_copy_(0, slot, torch.where(keep, value, buf.index_select(0, slot)))


def _pool(mean: Tensor, var: Tensor, past_mean: Tensor, past_sqmean: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """``mu_bar`` and ``sigma_bar^2`` of the pooled window from the current batch's mean and biased variance.

    ``valid`` (``(n,)`` bool) marks the past rows to pool; the others count as absent.
    """
    past_mean = past_mean.detach().to(mean.dtype)
    past_sqmean = past_sqmean.detach().to(mean.dtype)
    # max(nu, mu^2): a compensated nu may fall below mu^2; the current nu_t = var + mu^2 never does.
    past_sqmean = torch.maximum(past_sqmean, past_mean.square())
    n = valid.sum().to(mean.dtype) + 1
    keep = valid.unsqueeze(-1)
    past_mean = torch.where(keep, past_mean, 0.0)
    past_sqmean = torch.where(keep, past_sqmean, 0.0)
    mean_bar = (mean + past_mean.sum(0)) / n
    sqmean_bar = (torch.addcmul(var, mean, mean) + past_sqmean.sum(0)) / n
    return mean_bar, torch.addcmul(sqmean_bar, mean_bar, mean_bar, value=-1).clamp_min(0)


def _flat_patch_args(producer: nn.Module, inp: Tensor) -> tuple[Tensor, list[int]]:
    """The producer's input with any padding it does not express as symmetric zeros applied, and the padding left."""
    padding = producer.padding
    if isinstance(padding, str) or producer.padding_mode != "zeros":
        mode = "constant" if producer.padding_mode == "zeros" else producer.padding_mode
        return F.pad(inp, producer._reversed_padding_repeated_twice, mode=mode), [0] * (inp.dim() - 2)
    return inp, list(padding)


@torch.no_grad()
def _derivative_sums(producer: nn.Module, inp: Tensor, out: Tensor, group: Any | None) -> tuple[Tensor, Tensor]:
    """``sum_i p_i`` per group and ``sum_i y_ic p_i`` per channel (see :func:`producer_derivatives`)."""
    w = producer.weight.detach()
    if isinstance(producer, nn.Linear):
        dsq = out.t().mm(inp)
        dmu = inp.sum(0, keepdim=True)
    elif _by_patches(producer, inp, out):
        dmu, dsq = _patch_sums(producer, inp, out)
    else:
        inp, padding = _flat_patch_args(producer, inp)
        groups = producer.groups
        args = (list(producer.stride), padding, list(producer.dilation), False, [0], groups, (False, True, False))
        # d nu: the weight gradient of the producer for grad_output = y (times 2/m in the store). The
        # real weight, though its values are unused: a stand-in would be copied to a dense one.
        dsq = torch.ops.aten.convolution_backward(out, inp, w.to(inp.dtype), None, *args)[1]
        # d mu: the sum of the input patches, the weight gradient for grad_output = 1 with one output
        # channel per group, on the batch-summed input.
        ones = out.new_ones(()).expand(1, groups, *out.shape[2:])
        stand_in = inp.new_empty((groups, *w.shape[1:]))
        dmu = torch.ops.aten.convolution_backward(ones, inp.sum(0, keepdim=True), stand_in, None, *args)[1]
    dmu, dsq = global_sum([dmu, dsq], group)
    return dmu, dsq


# oneDNN's weight gradient of a convolution with a large fan-in and few output positions (ResNet-18's
# last stage at 64x64 input: 512 channels of 2x2, 16 samples) took 2-3x the time of one matrix product
# over the unfolded patches (measured with torch 2.13 on CPU); elsewhere it is the faster of the two.
_PATCH_ROWS = 64  # at most this many output positions over the batch (N * H_out * W_out)
_PATCH_WEIGHT = 1 << 20  # and a weight of at least this many elements


def _by_patches(producer: nn.Module, inp: Tensor, out: Tensor) -> bool:
    """Whether :func:`_patch_sums` computes the derivative sums of this step (see the thresholds above)."""
    return (
        isinstance(producer, nn.Conv2d)
        and producer.groups == 1
        and inp.device.type == "cpu"
        and out.numel() // out.size(1) <= _PATCH_ROWS
        and producer.weight.numel() >= _PATCH_WEIGHT
    )


def _patch_sums(producer: nn.Conv2d, inp: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_derivative_sums` of a 2-D convolution (one group) as products over its unfolded input patches."""
    inp, padding = _flat_patch_args(producer, inp)
    w = producer.weight
    cols = F.unfold(inp, w.shape[2:], producer.dilation, padding, producer.stride)  # (N, F, L)
    n, c, fan_in = out.size(0), out.size(1), cols.size(1)
    patches = cols.transpose(0, 1).reshape(fan_in, -1)  # (F, N * L)
    dsq = torch.mm(out.reshape(n, c, -1).transpose(0, 1).reshape(c, -1), patches.t())
    return patches.sum(1).reshape(1, *w.shape[1:]), dsq.reshape(w.shape)


def _weight_terms(weight: Tensor, dmean: Tensor, dsqmean: Tensor) -> tuple[Tensor, Tensor]:
    """``d mu / d W . W`` and ``d nu / d W . W`` per slot and channel, ``(n, C)`` each.

    ``weight`` is ``W`` as ``(C, F)``, the same for all slots, ``dmean`` is ``(n, groups, F)`` and
    ``dsqmean`` ``(n, C, F)``. One batched matmul each, over the whole window.
    """
    weight = weight.to(dmean.dtype)
    return _mean_terms(weight, dmean), _slot_dots(dsqmean, weight)


def _mean_terms(weight: Tensor, dmean: Tensor) -> Tensor:
    """``d mu / d W . W`` per slot and channel, ``(n, C)``: one matmul (a reading of ``W``) for all ``n``."""
    n, groups, fan_in = dmean.shape
    c = weight.size(0)
    if groups == 1:
        return dmean.view(n, fan_in).mm(weight.t())
    # (groups, C/groups, F) @ (groups, F, n), back to (n, C)
    d_mu = torch.matmul(weight.view(groups, c // groups, fan_in), dmean.permute(1, 2, 0))
    return d_mu.permute(2, 0, 1).reshape(n, c)


# Above this many elements per window, _slot_dots goes slot by slot (about 1 MiB of float32).
_SLOT_BY_SLOT = 1 << 18


def _slot_dots(dsqmean: Tensor, weight: Tensor) -> Tensor:
    """``<dsqmean[j, c], W_c>`` for every slot ``j`` and channel ``c``: ``(n, C)``.

    On CPU a dot product over the last dimension is a multiply and a sum: over the whole window at
    once its product is a temporary the size of the window (``n`` weight-sized tensors, written and
    read back from memory); slot by slot it is one weight-sized temporary that the allocator reuses
    and that stays closer to the cache. Small windows go in one call (fewer dispatches). A batched
    matmul over channels (``n x F`` by ``F x 1`` each) was slower in both layouts.
    """
    n = dsqmean.size(0)
    if n <= 1 or dsqmean.numel() <= _SLOT_BY_SLOT:
        return torch.linalg.vecdot(dsqmean, weight)
    out = dsqmean.new_empty(n, dsqmean.size(1))
    for j in range(n):
        torch.linalg.vecdot(dsqmean[j], weight, out=out[j])
    return out


def _intercepts(
    mean: Tensor, sqmean: Tensor, dmean: Tensor, dsqmean: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The part of the Taylor step that does not involve the current weights.

    ``mu - d mu / d W . W_old - b_old`` and ``nu - d nu / d W . W_old - 2 mu b_old`` for stored
    statistics ``(n, C)`` whose producer had the weights ``weight`` ``(C, F)`` and ``bias`` ``(C,)``
    (the shapes as in :func:`_weight_terms`), so that :func:`_taylor_step` needs only the current ones.
    """
    return _intercepts_of(mean, sqmean, *_weight_terms(weight, dmean, dsqmean), bias)


def _intercepts_of(
    mean: Tensor, sqmean: Tensor, d_mu: Tensor, d_nu: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`_intercepts` from the products ``d mu / d W . W`` and ``d nu / d W . W``, ``(n, C)`` each."""
    mean_0, sqmean_0 = mean - d_mu, sqmean - d_nu
    if bias is not None:
        bias = bias.to(mean.dtype)
        mean_0 = mean_0 - bias
        sqmean_0 = torch.addcmul(sqmean_0, mean, bias, value=-2)
    return mean_0, sqmean_0


def _slot_intercepts(
    mean: Tensor, sqmean: Tensor, dmean: Tensor, dsqmean: Tensor, weights: Tensor, biases: Tensor | None
) -> tuple[Tensor, Tensor]:
    """:func:`_intercepts` of ``n`` slots that each had their own producer weight ``weights[j]``
    ``(C, F)`` and bias ``biases[j]``: ``(n, C)`` each."""
    parts = [
        _intercepts(
            mean[j : j + 1],
            sqmean[j : j + 1],
            dmean[j : j + 1],
            dsqmean[j : j + 1],
            weights[j],
            None if biases is None else biases[j],
        )
        for j in range(mean.size(0))
    ]
    if not parts:
        return mean, sqmean
    return torch.cat([m for m, _ in parts]), torch.cat([v for _, v in parts])


def _taylor_step(
    mean_0: Tensor,
    sqmean_0: Tensor,
    mean: Tensor,
    dmean: Tensor,
    dsqmean: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    new: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """``mu_{t-tau}(theta_t)`` and ``nu_{t-tau}(theta_t)`` from the :func:`_intercepts` and the current ``W``, ``b``.

    ``weight`` is ``W`` as ``(C, F)``; the other shapes as in :func:`_weight_terms`. ``new``, derivative
    sums of another iteration (``(groups, *W.shape[1:])`` and ``W.shape``), also gets its products with
    ``W``, ``(1, C)`` each (else ``None``): its mean term in the same matmul as the window's, so that ``W``
    is read once for both.
    """
    n = dmean.size(0)
    weight = weight.to(dmean.dtype)
    if new is not None:
        dmean = torch.cat([dmean, new[0].reshape(1, *dmean.shape[1:]).to(dmean.dtype)])
    d_mu = _mean_terms(weight, dmean)
    products = None
    if new is not None:
        products = (d_mu[n:], torch.linalg.vecdot(new[1].reshape(weight.shape).to(weight.dtype), weight).unsqueeze(0))
        d_mu = d_mu[:n]
    d_nu = _slot_dots(dsqmean, weight)
    mean_t, sqmean_t = mean_0 + d_mu, sqmean_0 + d_nu
    if bias is not None:
        bias = bias.to(mean.dtype)
        mean_t = mean_t + bias
        sqmean_t = torch.addcmul(sqmean_t, mean, bias, value=2)
    return mean_t, sqmean_t, products
