"""One dispatch mechanism for training steps with a hand-written backward, eager and compiled alike.

A layer whose step is faster with its own backward (Batch Renorm's folded native kernels, the
whitening of Decorrelated BN, ...) describes the step once as a :class:`FusedStep`: a ``forward``
of ``(x, weight, bias, *rest)`` returning ``(y, *aux)``, a ``setup`` that saves what the backward
reads, and a ``backward`` that returns the gradients of ``x``, ``weight`` and ``bias``. Only ``y``
is differentiable; ``aux`` (batch statistics and the like) never is, and ``rest`` takes no
gradient.

* Eager mode runs it as a ``torch.autograd.Function``, tuned for dispatch overhead (which at small
  shapes costs as much as the kernels): ``forward(ctx, ...)`` with no separate ``setup_context``,
  and the inputs that take no gradient packed in one tuple argument, since ``apply()`` inspects
  every argument.
* Under ``torch.compile`` the same functions become a ``torch.library`` custom op with the same
  backward, opaque to the compiler (so a compiled backward reads what the forward saved and never
  recomputes it from buffers that the step updates in place). This needs ``forward`` to be fully
  annotated and a ``fake`` (shape) function; a step without them is traced as the eager Function.

Second derivatives: the backward is differentiable only once. Under ``create_graph=True`` it runs
as ``once_differentiable``, and differentiating its result raises torch's error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["FusedStep"]


class FusedStep:
    """A training step ``(x, weight, bias, *rest) -> (y, *aux)`` with its own backward (module docstring).

    Args:
        name: the custom op's qualified name, ``"normlab::..."``.
        forward: ``forward(x, weight, bias, *rest) -> (y, *aux)``.
        setup: ``setup(ctx, x, weight, bias, rest, outputs)``: save what ``backward`` needs on ``ctx``.
        backward: ``backward(ctx, grad_y) -> (grad_x, grad_weight, grad_bias)``; ``ctx.needs_input_grad``
            holds at least the flags of ``x``, ``weight`` and ``bias``.
        fake: the custom op's fake (meta) implementation; without it the step is not a custom op.
    """

    def __init__(
        self,
        name: str,
        forward: Callable[..., tuple[Tensor, ...]],
        setup: Callable[..., None],
        backward: Callable[[Any, Tensor], tuple[Tensor | None, Tensor | None, Tensor | None]],
        fake: Callable[..., tuple[Tensor, ...]] | None = None,
    ) -> None:
        self.name = name
        self.forward = forward
        self.setup = setup
        self.backward = backward
        self._function = _eager_function(forward, setup, backward)
        self._op = None
        if fake is not None:
            self._op = torch.library.custom_op(name, forward, mutates_args=())
            self._op.register_fake(fake)

            def op_setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
                x, weight, bias, *rest = inputs
                setup(ctx, x, weight, bias, tuple(rest), output)
                ctx.mark_non_differentiable(*output[1:])

            def op_backward(ctx: Any, grad_y: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
                rest = len(ctx.needs_input_grad) - 3
                return (*backward(ctx, grad_y), *([None] * rest))

            self._op.register_autograd(op_backward, setup_context=op_setup)

    def __call__(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, *rest: Any) -> tuple[Tensor, ...]:
        if self._op is not None and torch.compiler.is_compiling():
            return self._op(x, weight, bias, *rest)
        return self._function.apply(x, weight, bias, rest)


def _eager_function(
    forward: Callable[..., tuple[Tensor, ...]],
    setup: Callable[..., None],
    backward: Callable[[Any, Tensor], tuple[Tensor | None, ...]],
) -> type[torch.autograd.Function]:
    @torch.autograd.function.once_differentiable
    def backward_once(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        return (*backward(ctx, grad_y), None)

    class Step(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, rest):  # noqa: ANN001, ANN205
            outputs = forward(x, weight, bias, *rest)
            setup(ctx, x, weight, bias, rest, outputs)
            ctx.mark_non_differentiable(*outputs[1:])
            # No zero gradients for the aux outputs: some (what a backward reads) are the input's size.
            ctx.set_materialize_grads(False)
            return outputs

        @staticmethod
        def backward(ctx, grad_y, *_):  # noqa: ANN001, ANN205
            if grad_y is None:  # no gradient reaches y (gradcheck tests this): none leaves
                return None, None, None, None
            if torch.is_grad_enabled():  # create_graph=True: this backward has no derivative of its own
                return backward_once(ctx, grad_y)
            return (*backward(ctx, grad_y), None)

    return Step
