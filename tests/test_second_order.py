"""Second derivatives through every layer's training step: exact (float64 gradgradcheck, and equal to
torch's BatchNorm where the layer is BatchNorm) or refused with an error that names the layer.

A gradient penalty (WGAN-GP) differentiates ``dL/dx`` again; the incoming gradient of the first
backward then carries no graph, which is where a backward that is not differentiable would be
silently treated as a constant.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import normlab
from normlab.batch_renorm import batch_renorm
from normlab.cross_iteration import pooled_batch_norm
from normlab.decorrelated import decorrelated_batch_norm, whitening_matrix
from normlab.mean_only import mean_only_batch_norm

D = torch.float64


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=D).requires_grad_(True)
    w = (torch.rand(c, generator=g, dtype=D) + 0.5).requires_grad_(True)
    b = torch.randn(c, generator=g, dtype=D).requires_grad_(True)
    return x, w, b


# Training steps in F.batch_norm's shape, with momentum None so that the running statistics stay put
# between gradgradcheck's calls; the corrections and the window are in use (not their BN settings).
def _brn(x, w, b):
    # r and d saturate (sigma_B / sigma > r_max, |d| > d_max), so that the paper's stop-gradient
    # corrections are locally constant and the numerical derivatives are the analytical ones.
    c = x.size(1)
    rm, rv = torch.full((c,), -5.0, dtype=D), torch.full((c,), 0.01, dtype=D)
    return batch_renorm(x, rm, rv, w, b, True, None, r_max=1.5, d_max=0.5)


def _mobn(x, w, b):
    return mean_only_batch_norm(x, None, None, w, b, True)


def _cbn(x, w, b):
    g = torch.Generator().manual_seed(2)
    past = torch.randn(3, x.size(1), generator=g, dtype=D) * 0.2
    sq = past**2 + torch.rand(3, x.size(1), generator=g, dtype=D) + 0.5
    return pooled_batch_norm(x, None, None, w, b, True, None, past_mean=past, past_sqmean=sq)


STEPS = {"brn": _brn, "mobn": _mobn, "cbn": _cbn}


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 2, 3)])
@pytest.mark.parametrize("kind", list(STEPS))
def test_gradgradcheck_training_step(kind, shape):
    x, w, b = _inputs(shape)
    fn = STEPS[kind]
    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b))


def _penalty_gradient(norm: nn.Module) -> torch.Tensor:
    """d/dW of ((||dL/dx|| - 1)^2).mean() for x (16, 4) -> Linear(4, 8) -> norm -> <., c>."""
    torch.manual_seed(1)
    lin = nn.Linear(4, 8, dtype=D)
    x = torch.randn(16, 4, dtype=D, requires_grad=True)
    c = torch.randn(16, 8, dtype=D)
    (gx,) = torch.autograd.grad((norm(lin(x)) * c).sum(), x, create_graph=True)
    (gw,) = torch.autograd.grad(((gx.norm(dim=1) - 1) ** 2).mean(), lin.weight)
    return gw


# Configurations in which the layer's training step is batch normalization.
AS_BATCHNORM = {
    "bn": lambda: normlab.BatchNorm(8, dtype=D),
    "brn r_max=1 d_max=0": lambda: normlab.BatchRenorm(8, r_max=1.0, d_max=0.0, dtype=D),
    "cbn window=1": lambda: normlab.CrossIterationBatchNorm(8, window=1, dtype=D),
    "cbn burn-in": lambda: normlab.CrossIterationBatchNorm(8, window=4, burn_in=5, dtype=D),
    "cbn windowed, nothing stored yet": lambda: normlab.CrossIterationBatchNorm(8, window=4, dtype=D),
}


@pytest.mark.parametrize("name", list(AS_BATCHNORM))
def test_gradient_penalty_equals_torch_batchnorm(name):
    want = _penalty_gradient(nn.BatchNorm1d(8, dtype=D))
    with torch.no_grad():
        assert want.norm() > 1  # the penalty does depend on the second derivative
    torch.testing.assert_close(_penalty_gradient(AS_BATCHNORM[name]()), want)


def test_mean_only_gradient_penalty_matches_its_formula():
    class Reference(nn.Module):  # y = x - mean(x) (weight 1, bias 0), in plain autograd
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    torch.testing.assert_close(
        _penalty_gradient(normlab.MeanOnlyBatchNorm(8, dtype=D)), _penalty_gradient(Reference())
    )


def test_decorrelated_refuses_second_derivatives_by_name():
    for group_size in (4, 1):
        layer = normlab.DecorrelatedBatchNorm(8, group_size=group_size, dtype=D)
        with pytest.raises(RuntimeError, match="DecorrelatedBatchNorm: second derivatives .* layer normalization"):
            _penalty_gradient(layer)
    x, w, b = _inputs((12, 4))
    y = decorrelated_batch_norm(x, None, None, w, b, True, None, group_size=2)
    with pytest.raises(RuntimeError, match="DecorrelatedBatchNorm"):  # refused when the graph is asked for
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(y.square().sum(), x)  # first derivatives as usual
    assert torch.isfinite(gx).all()
    cov = torch.eye(3, dtype=D).add(0.1).requires_grad_(True)
    W = whitening_matrix(cov)
    with pytest.raises(RuntimeError, match="whitening_matrix"):
        torch.autograd.grad(W.sum(), cov, create_graph=True)


def test_first_derivatives_unchanged_under_create_graph():
    """The composite backward (used under create_graph) gives the fused backward's gradients."""
    for fn in STEPS.values():
        x, w, b = _inputs((5, 3, 4))
        y = fn(x, w, b)
        g = torch.randn_like(y)
        fused = torch.autograd.grad(y, (x, w, b), g, retain_graph=True)
        composite = torch.autograd.grad(y, (x, w, b), g, create_graph=True)
        for a, e in zip(composite, fused):
            torch.testing.assert_close(a, e)


def test_input_modified_in_place_after_the_step_is_refused_for_second_derivatives():
    x, w, b = _inputs((6, 3))
    h = x * 1.0
    y = _brn(h, w, b)
    with torch.no_grad():
        h.mul_(2)
    with pytest.raises(RuntimeError, match="BatchRenorm: second derivatives need"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


@pytest.mark.parametrize("dim", [0, 1, None])
def test_weight_norm_gradgradcheck(dim):
    from normlab.weight_norm import norm_except_dim, normalized_weight

    g = torch.Generator().manual_seed(4)
    v = torch.randn(3, 4, 2, generator=g, dtype=D, requires_grad=True)
    gain = (norm_except_dim(v.detach(), dim) + 0.1).requires_grad_(True)
    assert gradgradcheck(lambda v, gain: normalized_weight(v, gain, dim), (v, gain))


def test_weight_norm_second_derivative_through_the_input_matches_torch():
    """d(dL/dv)/dx, which a penalty on the weight gradient needs, as torch's own weight_norm gives it."""

    def through(wrap):
        torch.manual_seed(0)
        layer = wrap(nn.Linear(4, 3, dtype=D))
        x = torch.randn(5, 4, dtype=D, requires_grad=True)
        v = layer.parametrizations.weight.original1
        (gv,) = torch.autograd.grad(layer(x).tanh().sum(), v, create_graph=True)
        (gx,) = torch.autograd.grad(gv.square().sum(), x)
        return gx

    want = through(nn.utils.parametrizations.weight_norm)
    torch.testing.assert_close(through(normlab.weight_norm), want)
    assert want.abs().max() > 1e-3
