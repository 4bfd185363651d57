"""Synchronized batch statistics for data-parallel training (``torch.distributed``, DDP, ``torchrun``).

With data parallelism every process sees a slice of the global batch. :func:`sync` makes every
normlab layer in a model compute its batch statistics over the global batch of a process group:
the count, the per-channel sums of ``x`` and ``x^2`` (and of ``x x^T`` for whitening) are summed
over the processes in one ``all_reduce`` (:func:`normlab.comm.global_sum`, used by
:func:`normlab.kernels.channel_moments` and by every synchronized layer), so processes with uneven or
empty batches are weighted by their sample counts. The backward of that sum is the sum of the
gradients over the processes, so inputs and parameters get the gradients of the whole batch (the
sum of the parameter gradients over the processes, which DDP then averages). Works on any backend:
gloo on CPU, nccl on GPU.

torch's own ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` become :class:`normlab.BatchNorm` (same
arguments, state dict and kernels; it synchronizes on any device), their parameters and buffers
carried over as they are. Outside an initialized process group, or in a group of one process,
synchronized layers behave exactly as unsynchronized ones.

Under ``torchrun``::

    normlab.distributed.init_from_env()                 # gloo; no-op when not launched by torchrun
    model = normlab.sync(model)                         # before DDP wraps it
    model = nn.parallel.DistributedDataParallel(model)
    x_local = normlab.distributed.shard(x_global)       # this process's share of the global batch
    loss = loss_sum(model(x_local)) * world_size() / len(x_global)   # DDP averages gradients
"""

from __future__ import annotations

import copy
import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import ToolState, carry_settings
from .batchnorm import BatchNorm
from .comm import GroupRef
from .surgery import common_settings, replace_module

__all__ = ["GroupRef", "sync", "unsync", "is_synced", "init_from_env", "rank", "world_size", "shard"]

T = TypeVar("T")

# torch's layers that sync() turns into normlab.BatchNorm (their subclasses are not: they may
# override forward, and replacing them would silently drop that behaviour).
_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _is_normlab_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normlab layer, with a declared ``process_group`` setting."""
    return isinstance(module, ToolState)


def _copy_model(model: nn.Module) -> nn.Module:
    # Raw torch ProcessGroups (e.g. an nn.SyncBatchNorm's) cannot be deep-copied: share them.
    memo: dict[int, Any] = {}
    for module in model.modules():
        group = getattr(module, "process_group", None)
        if group is not None and not isinstance(group, GroupRef):
            memo[id(group)] = group
    return copy.deepcopy(model, memo)


def _rebuild(layer: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """``cls`` with ``layer``'s settings, momentum, mode and its very parameter and buffer objects.

    Sharing the tensors (rather than copying them) keeps an optimizer built on the model, and any
    reference to them, valid.
    """
    settings = common_settings(layer)
    new = cls(**settings, momentum=layer.momentum)
    for name in ("weight", "bias"):
        if getattr(layer, name, None) is not None:
            setattr(new, name, getattr(layer, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(layer, name, None) is not None:
            new._buffers[name] = getattr(layer, name)
    new.train(layer.training)
    return new


def _check_group(group: Any | None) -> GroupRef:
    if group is None or isinstance(group, GroupRef):
        return GroupRef(group)
    if isinstance(group, dist.ProcessGroup):
        return GroupRef(group)
    raise ValueError(
        f"normlab.sync: expected process_group to be None (the default group) or a torch ProcessGroup, "
        f"got {type(group).__name__}"
    )


def sync(model: nn.Module, process_group: Any | None = None, *, inplace: bool = False) -> nn.Module:
    """Make every normalization layer of ``model`` compute batch statistics over ``process_group``.

    Args:
        model: any module (a normalization layer itself included).
        process_group: the group to synchronize over; ``None`` is torch's default group (``WORLD``),
            looked up when the layers run (so this may be called before ``init_process_group``).
        inplace: modify ``model`` itself. By default, as in :func:`normlab.convert`, a deep copy is
            synchronized and ``model`` is left untouched: always use the returned model.

    Every normlab layer gets ``process_group``; torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``
    are replaced by :class:`normlab.BatchNorm` with the same settings and momentum, holding the
    very parameter and buffer tensors of the layer it replaces (so with ``inplace=True`` an existing
    optimizer stays valid). Subclasses of torch's BatchNorm raise a ``ValueError``: replacing them
    would silently drop what the subclass changes. Returns the synchronized model.
    """
    ref = _check_group(process_group)
    # Validate the whole model before changing anything.
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or _is_normlab_layer(module):
            continue
        if isinstance(module.weight, nn.parameter.UninitializedParameter) or isinstance(
            module.running_mean, nn.parameter.UninitializedBuffer
        ):
            raise ValueError(
                f"normlab.sync: {name or '<model>'} ({type(module).__name__}) is uninitialized; "
                "run one forward pass before synchronizing"
            )
        if type(module) not in _TORCH_BN:
            raise ValueError(
                f"normlab.sync: cannot synchronize {name or '<model>'} ({type(module).__name__}): "
                "expected torch's BatchNorm1d/2d/3d or SyncBatchNorm or a normlab layer; replacing a "
                "subclass would drop its own behaviour (convert it with normlab.convert first)"
            )
    if not inplace:
        model = _copy_model(model)
    built: dict[int, nn.Module] = {}  # a layer used at several places gets one replacement
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if _is_normlab_layer(module):
            module.configure(process_group=ref)
        elif type(module) in _TORCH_BN:
            if id(module) not in built:
                new = carry_settings(module, _rebuild(module, BatchNorm))
                built[id(module)] = new.configure(process_group=ref)
            model = replace_module(model, name, built[id(module)])
    return model


def unsync(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Undo :func:`sync`: normlab layers stop synchronizing; layers it converted return to torch's class.

    A ``normlab.BatchNorm`` made from ``BatchNorm1d/2d/3d`` or ``SyncBatchNorm`` (by :func:`sync` or
    :func:`normlab.convert`, which both record the origin) becomes that class again, with the same
    tensors (a ``SyncBatchNorm`` gets torch's default ``process_group=None``). Copies ``model``
    unless ``inplace``. Returns the model.
    """
    if not inplace:
        model = _copy_model(model)
    built: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not _is_normlab_layer(module):
            continue
        module.configure(process_group=None)
        origin = module.converted_from
        if isinstance(module, BatchNorm) and origin in _TORCH_BN:
            if id(module) not in built:
                built[id(module)] = _rebuild(module, origin)
            model = replace_module(model, name, built[id(module)])
    return model


def is_synced(model: nn.Module) -> bool:
    """Whether any layer of ``model`` has a ``process_group`` (synchronizes when a group is running)."""
    return any(_is_normlab_layer(m) and m.process_group is not None for m in model.modules())


# ----------------------------------------------------------------------------------- torchrun helpers
def init_from_env(backend: str = "gloo", timeout: timedelta | None = None) -> bool:
    """Join the process group of a ``torchrun`` launch; return whether one is running.

    Reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). A
    no-op returning ``False`` outside torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``); a group
    that is already initialized is kept. With ``backend="nccl"`` each process takes the GPU
    ``LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("normlab.distributed.init_from_env: this torch build has no torch.distributed")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", **kwargs)
    return True


def rank(group: Any | None = None) -> int:
    """This process's rank in ``group`` (default group); 0 outside a process group."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


_process_rank = rank  # for shard(), whose argument is named rank


def world_size(group: Any | None = None) -> int:
    """The number of processes in ``group`` (default group); 1 outside a process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def shard(batch: T, rank: int | None = None, world: int | None = None) -> T:
    """This process's contiguous share of a global batch (a tensor, or a tuple/list of tensors).

    Splits dimension 0 into ``world`` parts whose sizes differ by at most one (the first
    ``len % world`` parts get one more); with fewer samples than processes some parts are empty,
    which synchronized layers handle. ``rank``/``world`` default to this process's; outside a
    process group the whole batch is returned.
    """
    rank = _process_rank() if rank is None else rank
    world = world_size() if world is None else world
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"normlab.distributed.shard: expected 0 <= rank < world, got rank={rank}, world={world}")
    if isinstance(batch, Tensor):
        return batch.tensor_split(world)[rank]
    if isinstance(batch, (tuple, list)) and all(isinstance(t, Tensor) for t in batch):
        sizes = {t.size(0) for t in batch}
        if len(sizes) > 1:
            raise ValueError(
                f"normlab.distributed.shard: expected tensors of one batch size, got sizes {sorted(sizes)}"
            )
        return type(batch)(t.tensor_split(world)[rank] for t in batch)
    raise ValueError(
        f"normlab.distributed.shard: expected a tensor or a tuple/list of tensors, got {type(batch).__name__}"
    )
