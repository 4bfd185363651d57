"""Communication for synchronized statistics: the process group a layer names, and the sum over it.

The bottom of the library (it imports nothing of normlab). :class:`GroupRef` is what
:func:`normlab.sync` stores in a layer's ``process_group``; :func:`resolve_group` turns that setting
into the torch group to reduce over (``None`` outside a running group of more than one process);
:func:`global_sum` is the one differentiable reduction every synchronized layer uses.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GroupRef", "resolve_group", "global_sum"]


class GroupRef:
    """The process group a synchronized layer reduces over, as stored in its ``process_group``.

    ``GroupRef()`` is torch's default group (``WORLD``), looked up when the layer runs, so a model
    may be synchronized before ``init_process_group``. A torch ``ProcessGroup`` neither deep-copies
    nor pickles; a ``GroupRef`` deep-copies as itself (a copy of a model synchronizes over the same
    processes) and, for the default group, pickles too. Another group lives only in this process:
    pickling a model synchronized over it raises a ``TypeError`` (save its ``state_dict``, or
    :func:`unsync` it first).
    """

    __slots__ = ("group",)

    def __init__(self, group: Any | None = None) -> None:
        if isinstance(group, GroupRef):
            group = group.group
        if group is not None and dist.is_available() and dist.is_initialized() and group is dist.group.WORLD:
            group = None  # the default group: keep it picklable
        self.group = group

    def resolve(self) -> Any:
        """The torch process group (``dist.group.WORLD`` for the default group)."""
        return dist.group.WORLD if self.group is None else self.group

    def __deepcopy__(self, memo: dict[int, Any]) -> GroupRef:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        if self.group is not None:
            raise TypeError(
                "normlab.sync: a model synchronized over a process group other than the default one "
                "cannot be pickled (process groups exist only in their process); save its state_dict, "
                "or call normlab.unsync on it first"
            )
        return (GroupRef, ())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GroupRef) and other.group is self.group

    def __hash__(self) -> int:
        return id(self.group)

    def __repr__(self) -> str:
        return "GroupRef(WORLD)" if self.group is None else f"GroupRef({self.group!r})"


def resolve_group(setting: Any | None) -> Any | None:
    """The torch process group a layer's ``process_group`` setting names, or ``None`` for local statistics.

    ``None`` unless ``setting`` is set (see :func:`normlab.sync`), torch.distributed is initialized and
    the group has more than one process: outside a process group (or with world size 1) layers
    behave exactly as unsynchronized. ``setting`` is a :class:`GroupRef` or a torch ``ProcessGroup``.
    """
    if setting is None or not dist.is_available() or not dist.is_initialized():
        return None
    group = setting.resolve() if isinstance(setting, GroupRef) else setting
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
