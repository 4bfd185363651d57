"""BatchRenorm against the equations of Ioffe (2017), torch's BatchNorm and torch's tooling."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck

import normlab
from _shared import compiled_matches_eager
from normlab.batch_renorm import batch_renorm

D = torch.float64


# ----------------------------------------------------------------------------- independent reference
class PaperBatchRenorm:
    """Algorithm 1 of the paper, written out with plain tensor ops (r, d via stop-gradient)."""

    def __init__(self, c: int, r_max: float, d_max: float, alpha: float, eps: float = 1e-5) -> None:
        self.mu = torch.zeros(c, dtype=D)
        self.sigma = torch.ones(c, dtype=D) * (1 + eps) ** 0.5  # running_var = 1 <=> sigma^2 = 1 + eps
        self.r_max, self.d_max, self.alpha, self.eps = r_max, d_max, alpha, eps

    def _shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (x.dim() - 2)

    def train_step(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        sh = self._shape(x)
        mu_b = x.mean(dims)
        sigma_b = torch.sqrt(((x - mu_b.view(sh)) ** 2).mean(dims) + self.eps)
        r = torch.clamp(sigma_b.detach() / self.sigma, 1 / self.r_max, self.r_max)
        d = torch.clamp((mu_b.detach() - self.mu) / self.sigma, -self.d_max, self.d_max)
        x_hat = (x - mu_b.view(sh)) / sigma_b.view(sh) * r.view(sh) + d.view(sh)
        y = gamma.view(sh) * x_hat + beta.view(sh)
        self.mu = self.mu + self.alpha * (mu_b.detach() - self.mu)
        self.sigma = self.sigma + self.alpha * (sigma_b.detach() - self.sigma)
        return y

    def infer(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        sh = self._shape(x)
        return gamma.view(sh) * (x - self.mu.view(sh)) / self.sigma.view(sh) + beta.view(sh)


def _batch(step: int, shape: tuple[int, ...]) -> torch.Tensor:
    # Changing, non-stationary inputs: the batch mean and scale drift over the steps.
    g = torch.Generator().manual_seed(step)
    c = shape[1]
    scale = 0.5 + torch.rand(c, generator=g, dtype=D) * 2
    shift = torch.randn(c, generator=g, dtype=D) * (1 + step / 10)
    sh = (1, -1) + (1,) * (len(shape) - 2)
    return torch.randn(shape, generator=g, dtype=D) * scale.view(sh) + shift.view(sh)


@pytest.mark.parametrize("shape", [(16, 5), (6, 4, 7), (4, 3, 5, 5), (2, 3, 3, 4, 2)])
@pytest.mark.parametrize("r_max,d_max", [(3.0, 5.0), (1.5, 0.5), (1.0, 0.0)])
def test_matches_paper_over_many_steps(shape, r_max, d_max):
    c = shape[1]
    layer = normlab.BatchRenorm(c, r_max=r_max, d_max=d_max, momentum=0.1, dtype=D)
    ref = PaperBatchRenorm(c, r_max, d_max, alpha=0.1)
    gamma = (torch.rand(c, dtype=D) + 0.5).requires_grad_()
    beta = torch.randn(c, dtype=D).requires_grad_()
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
    for step in range(22):
        x = _batch(step, shape).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y = layer(x)
        y_ref = ref.train_step(x_ref, gamma, beta)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(y)
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, beta.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.running_mean, ref.mu, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, ref.sigma**2 - ref.eps, rtol=1e-10, atol=1e-12)
        # The same SGD step on both parameter sets keeps them equal as training goes on.
        with torch.no_grad():
            for p, q in ((layer.weight, gamma), (layer.bias, beta)):
                p -= 0.05 * p.grad
                q -= 0.05 * q.grad
                p.grad = None
                q.grad = None
    assert int(layer.num_batches_tracked) == 22
    layer.eval()
    x = _batch(99, shape)
    torch.testing.assert_close(layer(x), ref.infer(x, gamma.detach(), beta.detach()), rtol=1e-10, atol=1e-10)


def test_corrections_are_active_in_the_reference_test():
    # Guard against a vacuous comparison: with drifting inputs r and d do leave 1 and 0.
    c = 4
    layer = normlab.BatchRenorm(c, momentum=0.1, dtype=D)
    for step in range(5):
        layer(_batch(step, (8, c, 3, 3)))
    x = _batch(5, (8, c, 3, 3))
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    sigma = (layer.running_var + layer.eps).sqrt()
    r = (var + layer.eps).sqrt() / sigma
    d = (mean - layer.running_mean) / sigma
    assert (r - 1).abs().max() > 0.05 and d.abs().max() > 0.05


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 5)])
def test_equals_batchnorm_when_rmax_1_dmax_0(shape):
    c = shape[1]
    brn = normlab.BatchRenorm(c, r_max=1.0, d_max=0.0, momentum=0.1, dtype=D)
    bn = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(c, dtype=D)
    with torch.no_grad():
        brn.weight.copy_(torch.linspace(0.5, 1.5, c, dtype=D))
        brn.bias.copy_(torch.linspace(-1, 1, c, dtype=D))
        bn.weight.copy_(brn.weight)
        bn.bias.copy_(brn.bias)
        brn.running_mean.fill_(3.0)  # r and d would be far from 1 and 0 without the limits
        brn.running_var.fill_(9.0)
    for step in range(3):
        x = _batch(step, shape).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = brn(x), bn(x2)
        torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y)
        y.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(brn.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(brn.bias.grad, bn.bias.grad, rtol=1e-10, atol=1e-12)
        brn.zero_grad()
        bn.zero_grad()


# ----------------------------------------------------------------------------- gradcheck
def _stats(c: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.linspace(-0.3, 0.4, c, dtype=D), torch.linspace(0.5, 2.0, c, dtype=D)


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 4, 3)])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_train_with_saturated_corrections(shape, affine):
    # r and d are constants (stop-gradient); where they are clipped they are locally constant
    # functions of x too, so finite differences see exactly the analytic gradient.
    c = shape[1]
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=D) * 4 + 2).requires_grad_()  # sigma_B/sigma > r_max, |d| > d_max
    rm, rv = torch.zeros(c, dtype=D), torch.full((c,), 0.25, dtype=D)
    w = torch.randn(c, dtype=D, requires_grad=True) if affine else None
    b = torch.randn(c, dtype=D, requires_grad=True) if affine else None
    inputs = (x, w, b) if affine else (x,)

    def f(x, w=None, b=None):
        return batch_renorm(x, rm, rv, w, b, True, None, r_max=1.5, d_max=0.5)

    assert gradcheck(f, inputs)


def test_gradcheck_train_gradient_with_free_corrections_matches_stop_gradient_reference():
    # Unclipped r, d: the gradient is the stop-gradient one of the paper, not d/dx of the
    # forward value; check it against the reference's autograd, and gradcheck w.r.t. the
    # parameters (on which r, d do not depend).
    c = 3
    rm, rv = _stats(c)
    torch.manual_seed(1)
    x = torch.randn(5, c, 4, dtype=D)
    w = torch.randn(c, dtype=D, requires_grad=True)
    b = torch.randn(c, dtype=D, requires_grad=True)
    assert gradcheck(lambda w, b: batch_renorm(x, rm, rv, w, b, True, None, r_max=10.0, d_max=10.0), (w, b))


def test_gradcheck_eval():
    layer = normlab.BatchRenorm(3, dtype=D).eval()
    rm, rv = _stats(3)
    layer.running_mean.copy_(rm)
    layer.running_var.copy_(rv)
    x = torch.randn(4, 3, 2, dtype=D, requires_grad=True)
    assert gradcheck(layer, (x,))
    assert gradcheck(lambda w, b: nn.functional.batch_norm(x, rm, rv, w, b, False, 0, 1e-5), (layer.weight, layer.bias))


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_and_batchnorm_interchange():
    torch.manual_seed(0)
    brn = normlab.BatchRenorm(4)
    for _ in range(3):
        brn(torch.randn(8, 4, 3, 3))
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(brn.state_dict())
    assert set(bn.state_dict()) == set(brn.state_dict())
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(bn.eval()(x), brn.eval()(x))
    brn2 = normlab.BatchRenorm(4)
    brn2.load_state_dict(bn.state_dict())
    for k, v in brn.state_dict().items():
        torch.testing.assert_close(brn2.state_dict()[k], v)
    # An old checkpoint without num_batches_tracked still loads, as in torch.
    sd = bn.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    normlab.BatchRenorm(4).load_state_dict(sd)


def test_momentum_none_is_a_cumulative_average():
    layer = normlab.BatchRenorm(3, momentum=None, dtype=D)
    means = []
    for step in range(4):
        x = _batch(step, (10, 3))
        means.append(x.mean(0))
        layer(x)
    torch.testing.assert_close(layer.running_mean, torch.stack(means).mean(0))


def test_paper_schedule():
    s = normlab.paper_schedule()
    t = torch.tensor
    assert float(s["r_max"](t(0))) == 1 and float(s["d_max"](t(4999))) == 0
    assert float(s["r_max"](t(40000))) == pytest.approx(3) and float(s["d_max"](t(25000))) == pytest.approx(5)
    assert float(s["r_max"](t(22500))) == pytest.approx(2) and float(s["d_max"](t(15000))) == pytest.approx(2.5)
    assert float(normlab.paper_schedule(0.01)["r_max"](t(400))) == pytest.approx(3)
    with pytest.raises(ValueError, match="scale"):
        normlab.paper_schedule(0)


def test_schedule_makes_warm_up_plain_batchnorm():
    sched = normlab.paper_schedule(scale=0.001)  # 5 warm-up steps, r_max 3 at step 40
    brn = normlab.BatchRenorm(3, momentum=0.1, dtype=D, **sched)
    brn.running_mean.fill_(2.0)
    bn = nn.BatchNorm1d(3, dtype=D)
    for step in range(5):
        x = _batch(step, (6, 3))
        torch.testing.assert_close(brn(x), bn(x))
    for step in range(5, 45):
        brn(_batch(step, (6, 3)))
    assert float(brn.limits()[0]) == pytest.approx(3.0) and float(brn.limits()[1]) == pytest.approx(5.0)
    x = _batch(50, (6, 3))
    assert not torch.allclose(brn(x), bn(x))


# ----------------------------------------------------------------------------- torch tooling
@pytest.mark.slow  # compiling takes tens of seconds
def test_torch_compile_fullgraph_matches_eager():
    eager = normlab.BatchRenorm(6, momentum=0.1, r_max=1.5, d_max=0.5)
    eager.running_var.fill_(0.6)
    eager.running_mean.fill_(0.2)
    compiled_layer = compiled_matches_eager(eager, (4, 6, 5, 5), ("running_var", "running_mean"))
    assert int(compiled_layer.num_batches_tracked) == 3


def test_channels_last_is_kept():
    layer = normlab.BatchRenorm(8)
    x = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(torch.randn_like(y))
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    ref = normlab.BatchRenorm(8)
    x2 = x.detach().contiguous().requires_grad_()
    torch.testing.assert_close(ref(x2), y)


def test_bfloat16_under_autocast_keeps_float32_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), normlab.BatchRenorm(8, momentum=0.1))
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert model[1].running_mean.dtype == torch.float32 and model[1].running_var.dtype == torch.float32
    y_ref = ref(x)
    torch.testing.assert_close(y.float(), y_ref, rtol=0.05, atol=0.05)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=0.02, atol=0.01)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var, rtol=0.02, atol=0.01)


def test_half_module_keeps_float32_running_statistics():
    layer = normlab.BatchRenorm(4).to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.running_mean.dtype == torch.float32 and layer.running_var.dtype == torch.float32
    y = layer(torch.randn(6, 4, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert normlab.BatchRenorm(4, dtype=torch.float16).running_var.dtype == torch.float32


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_and_leaves_state_untouched():
    layer = normlab.BatchRenorm(4)
    layer(torch.randn(8, 4))
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"BatchRenorm: expected 4 channels.*got shape \(8, 3\)"):
        layer(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"BatchRenorm: expected input of shape \(N, 4, \*\)"):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 4, dtype=torch.long))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    layer.eval()(torch.randn(1, 4))  # one sample is fine in eval


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"r_max": 0.5}, "r_max >= 1"),
        ({"d_max": -1.0}, "d_max >= 0"),
        ({"track_running_stats": False}, "track_running_stats=True"),
        ({"momentum": 2.0}, "momentum"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        normlab.BatchRenorm(4, **kwargs)
    with pytest.raises(ValueError, match="num_features"):
        normlab.BatchRenorm(0)


def test_repr():
    assert "r_max=3.0" in repr(normlab.BatchRenorm(3)) and "momentum=0.01" in repr(normlab.BatchRenorm(3))


# ----------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(2, 5),
    n=st.integers(1, 4),
    c=st.integers(1, 5),
    spatial=st.integers(1, 3),
    scale=st.floats(1e-3, 1e3),
    constant=st.booleans(),
)
def test_property_shapes_and_degenerate_inputs(rank, n, c, spatial, scale, constant):
    shape = (n, c) + (spatial,) * (rank - 2)
    if n * spatial ** (rank - 2) < 2:
        n = 2
        shape = (n, c) + (spatial,) * (rank - 2)
    g = torch.Generator().manual_seed(rank * 100 + n * 10 + c)
    x = torch.full(shape, 3.0, dtype=D) if constant else torch.randn(shape, generator=g, dtype=D) * scale
    layer = normlab.BatchRenorm(c, momentum=0.3, dtype=D)
    ref = PaperBatchRenorm(c, 3.0, 5.0, alpha=0.3)
    xr = x.clone().requires_grad_()
    y = layer(xr)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(xr.grad).all()
    y_ref = ref.train_step(x, torch.ones(c, dtype=D), torch.zeros(c, dtype=D))
    torch.testing.assert_close(y, y_ref, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(layer.running_var, ref.sigma**2 - ref.eps, rtol=1e-8, atol=1e-10)
