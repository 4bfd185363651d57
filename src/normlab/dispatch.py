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

Second derivatives (``create_graph=True``, as in a WGAN-GP gradient penalty): a step may give a
``composite``, the same output written in differentiable torch ops from the step's inputs and the
constants its ``setup`` saved; under ``create_graph`` the backward then recomputes the output that
way and differentiates it, so second derivatives are exact. A step without one refuses: its backward
raises an error that names the layer and what to use instead (``refusal``). Never a silent wrong
value: ``once_differentiable`` alone would treat the backward as a constant whenever the incoming
gradient itself carries no graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["FusedStep", "recomputed_grads"]


class FusedStep:
    """A training step ``(x, weight, bias, *rest) -> (y, *aux)`` with its own backward (module docstring).

    Args:
        name: the custom op's qualified name, ``"normlab::..."``.
        forward: ``forward(x, weight, bias, *rest) -> (y, *aux)``.
        setup: ``setup(ctx, x, weight, bias, rest, outputs)``: save what ``backward`` needs on ``ctx``.
        backward: ``backward(ctx, grad_y) -> (grad_x, grad_weight, grad_bias)``; ``ctx.needs_input_grad``
            holds at least the flags of ``x``, ``weight`` and ``bias``.
        fake: the custom op's fake (meta) implementation; without it the step is not a custom op.
        layer: the layer's name, for error messages.
        composite: ``composite(ctx, x, weight, bias) -> y`` in differentiable ops, for second
            derivatives; it may read what ``setup`` saved on ``ctx`` (not the running buffers, which
            the training step moves after its forward).
        refusal: without a ``composite``, what to use instead, said when second derivatives are asked for.
    """

    def __init__(
        self,
        name: str,
        forward: Callable[..., tuple[Tensor, ...]],
        setup: Callable[..., None],
        backward: Callable[[Any, Tensor], tuple[Tensor | None, Tensor | None, Tensor | None]],
        fake: Callable[..., tuple[Tensor, ...]] | None = None,
        *,
        layer: str,
        composite: Callable[..., Tensor] | None = None,
        refusal: str = "",
    ) -> None:
        self.name = name
        self.forward = forward
        self.setup = setup
        self.backward = backward
        self.layer = layer
        self.composite = composite
        self.refusal = refusal
        self._function = _eager_function(self)
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

    def differentiable_backward(self, ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        """The backward under ``create_graph``: through :attr:`composite`, or a clear refusal."""
        if self.composite is None:
            raise RuntimeError(
                f"{self.layer}: second derivatives (create_graph=True through a training step) are not "
                f"supported: its backward is hand-written and not differentiable. {self.refusal}".rstrip()
            )
        grads = recomputed_grads(
            ctx, self.layer, lambda x, weight, bias: (self.composite(ctx, x, weight, bias),), (grad_y,)
        )
        return (*grads, None)


def recomputed_grads(
    ctx: Any, layer: str, composite: Callable[..., Sequence[Tensor]], grads: Sequence[Tensor | None]
) -> list[Tensor | None]:
    """The gradients of ``ctx.inputs`` under ``create_graph``, for a Function with a hand-written backward.

    ``composite(*ctx.inputs)`` recomputes the Function's outputs in differentiable ops; they are
    differentiated against ``grads`` (one per output, ``None`` for an output that receives none) with
    ``create_graph``, so second derivatives are exact. ``ctx.versions`` (the inputs' ``_version`` at
    the forward) must match: an input modified in place since raises an error naming ``layer``.
    Returns one gradient (or ``None``) per input.
    """
    inputs = ctx.inputs
    if any(t is not None and t._version != v for t, v in zip(inputs, ctx.versions)):
        raise RuntimeError(
            f"{layer}: second derivatives need the step's inputs as they were in the forward, but one "
            "of them has been modified in place since"
        )
    wanted = [(i, t) for i, t in enumerate(inputs) if ctx.needs_input_grad[i] and t is not None]
    found: Sequence[Tensor | None] = ()
    with torch.enable_grad():
        pairs = [(o, g) for o, g in zip(composite(*inputs), grads) if g is not None]
        if wanted and pairs:
            outs, gs = [o for o, _ in pairs], [g for _, g in pairs]
            found = torch.autograd.grad(outs, [t for _, t in wanted], gs, create_graph=True, allow_unused=True)
    result: list[Tensor | None] = [None] * len(inputs)
    for (i, _), g in zip(wanted, found):
        result[i] = g
    return result


def _eager_function(step: FusedStep) -> type[torch.autograd.Function]:
    forward, setup, backward = step.forward, step.setup, step.backward

    class Step(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, rest):  # noqa: ANN001, ANN205
            # The step keeps its own precision rules (statistics in float32 for half inputs): autocast
            # must not recast its products on the way (DBN's covariance in bfloat16, say).
            with _no_autocast(x):
                outputs = forward(x, weight, bias, *rest)
            setup(ctx, x, weight, bias, rest, outputs)
            ctx.mark_non_differentiable(*outputs[1:])
            # No zero gradients for the aux outputs: some (what a backward reads) are the input's size.
            ctx.set_materialize_grads(False)
            if step.composite is not None:
                # References only (a step with a composite saves x anyway); for second derivatives.
                ctx.inputs = (x, weight, bias)
                ctx.versions = tuple(None if t is None else t._version for t in ctx.inputs)
            return outputs

        @staticmethod
        def backward(ctx, grad_y, *_):  # noqa: ANN001, ANN205
            if grad_y is None:  # no gradient reaches y (gradcheck tests this): none leaves
                return None, None, None, None
            if torch.is_grad_enabled():  # create_graph=True
                return step.differentiable_backward(ctx, grad_y)
            with _no_autocast(grad_y):
                return (*backward(ctx, grad_y), None)

    Step.__name__ = Step.__qualname__ = f"{step.layer}Step"
    return Step


def _no_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``x``'s device while it is on (a no-op context otherwise)."""
    device = x.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except TypeError:  # torch < 2.4 takes no device type
        enabled = torch.is_autocast_enabled() if device == "cuda" else torch.is_autocast_cpu_enabled()
    return torch.autocast(device, enabled=False) if enabled else contextlib.nullcontext()
