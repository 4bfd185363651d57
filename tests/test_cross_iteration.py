"""Tests of CrossIterationBatchNorm against references written from the paper's equations.

The reference (``RefCBN``) follows Yao et al. 2021 directly: the derivatives of mu and nu = E[x^2]
with respect to the producer's weight and bias come from ``torch.autograd.grad`` (as the paper's
code does), stored statistics are moved by the first-order Taylor step and pooled with
max(nu, mu^2), and only the current iteration's statistics carry gradient.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normlab
from _shared import resnet
from normlab import CrossIterationBatchNorm, cross_iteration
from normlab.cross_iteration import _pooled_step, compensate, pooled_batch_norm, producer_derivatives

DT = torch.float64
EPS = 1e-5


def dims_of(t: torch.Tensor) -> list[int]:
    return [0, *range(2, t.dim())]


class RefCBN:
    """Cross-iteration BN from the paper's equations, with autograd derivatives and Python lists."""

    def __init__(self, window: int, burn_in: int = 0, eps: float = EPS) -> None:
        self.window, self.burn_in, self.eps = window, burn_in, eps
        self.steps = 0
        self.past: list[tuple] = []

    def __call__(self, producer: nn.Module, out: torch.Tensor, gamma, beta) -> torch.Tensor:
        shape = (1, -1) + (1,) * (out.dim() - 2)
        self.steps += 1
        if self.steps <= self.burn_in or self.window == 1:
            return F.batch_norm(out, None, None, gamma, beta, True, 0.0, self.eps)
        dims = dims_of(out)
        mu_t = out.mean(dims)
        nu_t = (out * out).mean(dims)
        w = producer.weight.detach()
        b = None if producer.bias is None else producer.bias.detach()
        mus, nus = [mu_t], [nu_t]
        for mu, nu, dmu, dnu, dmu_b, dnu_b, w0, b0 in self.past:
            m = mu + (dmu * (w - w0)).flatten(1).sum(1)
            v = nu + (dnu * (w - w0)).flatten(1).sum(1)
            if b is not None:
                m = m + dmu_b * (b - b0)
                v = v + dnu_b * (b - b0)
            mus.append(m)
            nus.append(torch.maximum(v, m * m))
        mu_bar = torch.stack(mus).mean(0)
        var_bar = torch.stack(nus).mean(0) - mu_bar**2
        y = (out - mu_bar.view(shape)) / torch.sqrt(var_bar + self.eps).view(shape)
        if gamma is not None:
            y = y * gamma.view(shape) + beta.view(shape)
        params = [producer.weight] + ([] if producer.bias is None else [producer.bias])
        dmu = torch.autograd.grad(mu_t.sum(), params, retain_graph=True)
        dnu = torch.autograd.grad(nu_t.sum(), params, retain_graph=True)
        entry = (
            mu_t.detach(),
            nu_t.detach(),
            dmu[0],
            dnu[0],
            dmu[1] if b is not None else None,
            dnu[1] if b is not None else None,
            w.clone(),
            None if b is None else b.clone(),
        )
        self.past = [entry, *self.past][: self.window - 1]
        return y


PRODUCERS = {
    "conv2d_bias": (lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 5, 5)),
    "conv2d_groups_stride_dilation": (
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False),
        (2, 4, 7, 6),
    ),
    "conv2d_stride_dilation_reflect": (
        lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect", bias=False),
        (2, 3, 7, 8),
    ),
    "conv1d_same_reflect": (lambda: nn.Conv1d(3, 5, 3, padding="same", padding_mode="reflect"), (2, 3, 9)),
    "conv3d_even_kernel": (lambda: nn.Conv3d(2, 4, 2, padding=1), (2, 2, 3, 4, 3)),
    "linear": (lambda: nn.Linear(5, 4), (3, 5)),
}


def make_pair(name: str, window: int, burn_in: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    make, shape = PRODUCERS[name]
    producer = make().to(DT)
    c = producer.weight.size(0)
    layer = CrossIterationBatchNorm(c, window=window, burn_in=burn_in, dtype=DT).attach(producer)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return producer, layer, shape


@torch.no_grad()
def perturb(producer: nn.Module, scale: float = 0.05) -> None:
    for p in producer.parameters():
        p.add_(scale * torch.randn_like(p))


# ------------------------------------------------------------------------------ compensation
@pytest.mark.parametrize("name", list(PRODUCERS))
def test_compensated_mean_is_exact(name):
    """mu is linear in the producer's weights: the compensated mean equals the exact recomputation."""
    producer, layer, shape = make_pair(name, window=5)
    inputs = [torch.randn(shape, dtype=DT) for _ in range(4)]
    for x in inputs:
        layer(producer(x))
        perturb(producer, 0.1)
    mean, _ = layer.past_statistics()
    assert mean.shape == (4, layer.num_features)
    with torch.no_grad():
        for slot, x in enumerate(inputs):  # slot j holds iteration j (window not wrapped yet)
            out = producer(x)
            torch.testing.assert_close(mean[slot], out.mean(dims_of(out)), rtol=0, atol=1e-12)
            assert (layer.window_mean[slot] - mean[slot]).abs().max() > 1e-3  # the compensation did move it


@pytest.mark.parametrize("patches", [False, True], ids=["weight_gradient", "patch_products"])
@pytest.mark.parametrize("name", list(PRODUCERS))
def test_closed_form_derivatives_match_autograd(name, patches, monkeypatch):
    """Both ways of computing the sums: the producer's weight gradient, and (2-D convolutions of one
    group with few output positions and a large weight) one product over the unfolded patches."""
    if patches:
        monkeypatch.setattr(cross_iteration, "_PATCH_ROWS", 1 << 30)
        monkeypatch.setattr(cross_iteration, "_PATCH_WEIGHT", 0)
    producer, layer, shape = make_pair(name, window=2)
    x = torch.randn(shape, dtype=DT)
    out = producer(x)
    by_patches = patches and name in ("conv2d_bias", "conv2d_stride_dilation_reflect")
    assert cross_iteration._by_patches(producer, x, out) == by_patches
    dims = dims_of(out)
    m = out.numel() // out.size(1)
    dmu, dnu = producer_derivatives(producer, x, out.detach(), torch.tensor(float(m), dtype=DT))
    ref_mu = torch.autograd.grad(out.mean(dims).sum(), producer.weight, retain_graph=True)[0]
    ref_nu = torch.autograd.grad((out * out).mean(dims).sum(), producer.weight)[0]
    torch.testing.assert_close(dnu, ref_nu, rtol=1e-10, atol=1e-12)
    groups = dmu.size(0)
    torch.testing.assert_close(dmu.repeat_interleave(out.size(1) // groups, 0), ref_mu, rtol=1e-10, atol=1e-12)


def test_slot_by_slot_dots_equal_the_batched_ones(monkeypatch):
    """The window's dot products against the current weight, slot by slot (large windows) or at once."""
    d, w = torch.randn(7, 6, 40, dtype=DT), torch.randn(6, 40, dtype=DT)
    expected = (d * w).sum(-1)
    torch.testing.assert_close(cross_iteration._slot_dots(d, w), expected, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(cross_iteration, "_SLOT_BY_SLOT", 0)
    torch.testing.assert_close(cross_iteration._slot_dots(d, w), expected, rtol=1e-12, atol=1e-12)


def test_compensated_sqmean_error_is_quadratic():
    """nu is matched to first order: halving the weight change quarters the error."""
    producer, layer, shape = make_pair("conv2d_bias", window=2)
    x = torch.randn(shape, dtype=DT)
    layer(producer(x))
    w0 = [p.detach().clone() for p in producer.parameters()]
    direction = [torch.randn_like(p) for p in w0]
    errors, naive = [], []
    for h in (0.01, 0.005, 0.0025):
        with torch.no_grad():
            for p, p0, d in zip(producer.parameters(), w0, direction):
                p.copy_(p0 + h * d)
            out = producer(x)
            exact = (out * out).mean(dims_of(out))
        _, sqmean = layer.past_statistics()
        errors.append((sqmean[0] - exact).abs().max().item())
        naive.append((layer.window_sqmean[0] - exact).abs().max().item())
    assert 3.9 < errors[0] / errors[1] < 4.1 and 3.9 < errors[1] / errors[2] < 4.1
    assert 1.7 < naive[0] / naive[1] < 2.3  # uncompensated: first-order error
    assert errors[2] < 0.05 * naive[2]


@pytest.mark.parametrize("with_bias", [True, False])
def test_compensate_is_the_taylor_step(with_bias):
    """compensate() against the step per slot: mu + dmu/dW . dW (+ db), nu + dnu/dW . dW (+ 2 mu db)."""
    torch.manual_seed(0)
    n, groups, c, fan_in = 3, 2, 6, 5
    mean, sqmean = torch.randn(n, c, dtype=DT), torch.rand(n, c, dtype=DT) + 1
    dmean, dsqmean = torch.randn(n, groups, fan_in, dtype=DT), torch.randn(n, c, fan_in, dtype=DT)
    old_weight, weight = torch.randn(n, c, fan_in, dtype=DT), torch.randn(c, fan_in // 5, 5, dtype=DT)
    old_bias = torch.randn(n, c, dtype=DT) if with_bias else None
    bias = torch.randn(c, dtype=DT) if with_bias else None
    got_mean, got_sqmean = compensate(mean, sqmean, dmean, dsqmean, old_weight, weight, old_bias, bias)
    for j in range(n):
        delta = weight.reshape(c, -1) - old_weight[j]
        dmu_per_channel = dmean[j].repeat_interleave(c // groups, 0)  # channel c uses its group's d mu
        ref_mean = mean[j] + (dmu_per_channel * delta).sum(1)
        ref_sqmean = sqmean[j] + (dsqmean[j] * delta).sum(1)
        if with_bias:
            ref_mean = ref_mean + (bias - old_bias[j])
            ref_sqmean = ref_sqmean + 2 * mean[j] * (bias - old_bias[j])
        torch.testing.assert_close(got_mean[j], ref_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_sqmean[j], ref_sqmean, rtol=1e-12, atol=1e-12)


def test_window_keeps_intercepts_not_past_weights_and_old_checkpoints_load():
    """Each slot keeps its Taylor-step intercepts, not the producer's past weight and bias (one
    weight-sized tensor per slot); a checkpoint that stored the past weights loads, its intercepts
    derived from them, and compensates exactly as the layer that wrote it."""
    producer, layer, shape = make_pair("conv2d_bias", window=4, seed=2)
    weights, biases = [], []
    for _ in range(5):  # wrapped around the ring: slot j holds the iteration written last there
        weights.append(producer.weight.detach().clone())
        biases.append(producer.bias.detach().clone())
        layer(producer(torch.randn(shape, dtype=DT)))
        perturb(producer)
    state = layer.state_dict()
    assert "window_intercept" in state and "window_weight" not in state and "window_bias" not in state
    weight_sized = [k for k, v in state.items() if v.numel() >= 3 * producer.weight.numel()]
    assert weight_sized == ["window_dsqmean"]
    # The earlier format stored each slot's past weight: iteration i went to slot i % 3, the last one stays.
    slots = {i % 3: i for i in range(5)}
    legacy = {k: v for k, v in state.items() if k != "window_intercept"}
    legacy["window_weight"] = torch.stack([weights[slots[j]].reshape(6, -1) for j in range(3)])
    legacy["window_bias"] = torch.stack([biases[slots[j]] for j in range(3)])
    copy_producer, copy_layer, _ = make_pair("conv2d_bias", window=4, seed=5)
    copy_producer.load_state_dict(producer.state_dict())
    copy_layer.load_state_dict(legacy)
    torch.testing.assert_close(copy_layer.window_intercept, layer.window_intercept, rtol=1e-12, atol=1e-12)
    for a, b in zip(layer.past_statistics(), copy_layer.past_statistics()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert layer.half().window_intercept.dtype == torch.float32


# ------------------------------------------------------------------------------ forward / backward
@pytest.mark.parametrize("name", list(PRODUCERS))
@pytest.mark.parametrize("window,burn_in", [(3, 0), (4, 2)])
def test_matches_reference_outputs_and_gradients(name, window, burn_in):
    producer, layer, shape = make_pair(name, window=window, burn_in=burn_in, seed=1)
    ref = RefCBN(window, burn_in)
    for _ in range(7):  # past the burn-in and around the ring more than once
        x = torch.randn(shape, dtype=DT, requires_grad=True)
        out = producer(x)
        y = layer(out)
        y_ref = ref(producer, out, layer.weight, layer.bias)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
        g = torch.randn_like(y)
        params = [x, layer.weight, layer.bias, *producer.parameters()]
        grads = torch.autograd.grad(y, params, g, retain_graph=True)
        grads_ref = torch.autograd.grad(y_ref, params, g)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
        perturb(producer)


def test_gradcheck_current_iteration_path():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 2, dtype=DT, requires_grad=True)
    w = torch.rand(3, dtype=DT).add(0.5).requires_grad_(True)
    b = torch.randn(3, dtype=DT, requires_grad=True)
    past_mean = torch.randn(3, 3, dtype=DT)
    past_sqmean = past_mean**2 + torch.rand(3, 3, dtype=DT)
    past_sqmean[0, 0] = 0.0  # below mu^2: exercises the max
    past = {"past_mean": past_mean, "past_sqmean": past_sqmean}
    assert torch.autograd.gradcheck(
        lambda x: pooled_batch_norm(x, None, None, None, None, True, **past), (x,), eps=1e-6
    )
    assert torch.autograd.gradcheck(
        lambda x, w, b: pooled_batch_norm(x, None, None, w, b, True, **past), (x, w, b), eps=1e-6
    )
    x2 = torch.randn(4, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: pooled_batch_norm(x, None, None, None, None, True), (x2,))


def test_pooled_batch_norm_equation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=DT)
    pm = torch.randn(2, 3, dtype=DT)
    ps = torch.stack([pm[0] ** 2 + 1.0, pm[1] ** 2 - 0.5])  # the second below mu^2
    y, mean, var, count = _pooled_step(x, None, None, pm, ps, EPS, None)
    mu_t = x.mean((0, 2))
    nu_t = (x * x).mean((0, 2))
    mu_bar = (mu_t + pm.sum(0)) / 3
    nu_bar = (nu_t + ps[0] + pm[1] ** 2) / 3
    expected = (x - mu_bar.view(1, -1, 1)) / torch.sqrt(nu_bar - mu_bar**2 + EPS).view(1, -1, 1)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(mean, mu_t)
    torch.testing.assert_close(var, x.var((0, 2), correction=0))
    assert count == 8
    torch.testing.assert_close(pooled_batch_norm(x, None, None, None, None, True, past_mean=pm, past_sqmean=ps), y)


def test_functional_core_has_batch_norm_shape():
    """pooled_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, *, past...)
    moves the given running statistics as BatchNorm does, and in eval is BatchNorm's inference."""
    x = torch.randn(6, 3, 5, dtype=DT)
    w, b = torch.rand(3, dtype=DT) + 0.5, torch.randn(3, dtype=DT)
    pm = torch.randn(2, 3, dtype=DT)
    ps = pm**2 + 1.0
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    bn = nn.BatchNorm1d(3, momentum=0.2, dtype=DT)
    pooled_batch_norm(x, rm, rv, w, b, True, 0.2, past_mean=pm, past_sqmean=ps)
    bn(x)
    torch.testing.assert_close((rm, rv), (bn.running_mean, bn.running_var))
    torch.testing.assert_close(pooled_batch_norm(x, rm, rv, w, b, False), F.batch_norm(x, rm, rv, w, b, False, eps=EPS))
    with pytest.raises(ValueError, match="pooled_batch_norm.*more than 1 value"):
        pooled_batch_norm(x[:1, :, :1], rm, rv, w, b, True)


def test_deprecated_forms_warn_and_agree():
    x = torch.randn(4, 3, 5, dtype=DT)
    pm = torch.randn(2, 3, dtype=DT)
    ps = pm**2 + 1.0
    with pytest.warns(DeprecationWarning, match="pooled_batch_norm"):
        old = pooled_batch_norm(x, pm, ps, None, None)
    for a, e in zip(old, _pooled_step(x, None, None, pm, ps, EPS, None)):
        torch.testing.assert_close(a, torch.as_tensor(e, dtype=DT))
    with pytest.warns(DeprecationWarning, match="keyword-only"):
        layer = CrossIterationBatchNorm(4, 1e-5, 0.1, True, True, 5, 2)
    assert (layer.window, layer.burn_in) == (5, 2)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_window_one_equals_batchnorm(momentum):
    producer, layer, shape = make_pair("conv2d_bias", window=1)
    layer.momentum = momentum
    bn = nn.BatchNorm2d(6, momentum=momentum, dtype=DT)
    bn.load_state_dict(layer.state_dict(), strict=False)
    for _ in range(3):
        x = torch.randn(shape, dtype=DT)
        out = producer(x).detach().requires_grad_(True)
        y, y_bn = layer(out), bn(out)
        torch.testing.assert_close(y, y_bn)
        g = torch.randn_like(y)
        torch.testing.assert_close(
            torch.autograd.grad(y, [out, layer.weight, layer.bias], g),
            torch.autograd.grad(y_bn, [out, bn.weight, bn.bias], g),
        )
        perturb(producer)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(bn, name))
    layer.eval()
    bn.eval()
    out = producer(torch.randn(shape, dtype=DT))
    torch.testing.assert_close(layer(out), bn(out))


def test_burn_in_steps_equal_batchnorm():
    producer, layer, shape = make_pair("conv2d_bias", window=4, burn_in=3)
    bn = nn.BatchNorm2d(6, dtype=DT)
    bn.load_state_dict(layer.state_dict(), strict=False)
    diffs = []
    for _ in range(6):
        out = producer(torch.randn(shape, dtype=DT))
        y, y_bn = layer(out), bn(out)
        diffs.append((y - y_bn).abs().max().item())
        perturb(producer)
    # three burn-in steps, then a first windowed step with nothing stored yet: all BN
    assert max(diffs[:4]) < 1e-12
    assert min(diffs[4:]) > 1e-6
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    assert int(layer.num_steps) == 6 and int(layer.window_count) == 3


def test_repeated_batch_with_fixed_weights_equals_batchnorm():
    """With unchanged weights and the same batch, every window entry equals the current one."""
    producer, layer, shape = make_pair("conv2d_groups_stride_dilation", window=3)
    x = torch.randn(shape, dtype=DT)
    for _ in range(4):
        out = producer(x)
        y = layer(out)
    torch.testing.assert_close(y, F.batch_norm(out, None, None, layer.weight, layer.bias, True, 0.0, EPS))


# ------------------------------------------------------------------------------ state
def test_state_dict_round_trip_mid_window():
    def model():
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 6, 3, padding=1).to(DT)
        return nn.Sequential(conv, CrossIterationBatchNorm(6, window=4, dtype=DT).attach(conv), nn.ReLU())

    a = model()
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for _ in range(5):  # the window has wrapped around
        a(torch.randn(2, 3, 5, 5, dtype=DT)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    state = a.state_dict()
    for key in ("window_mean", "window_sqmean", "window_dmean", "window_dsqmean", "window_intercept"):
        assert "1." + key in state
    buf = io.BytesIO()
    torch.save(state, buf)
    b = model()
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for _ in range(3):
        x = torch.randn(2, 3, 5, 5, dtype=DT)
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)


def test_batchnorm_checkpoint_loads_and_resets_window():
    producer, layer, shape = make_pair("conv2d_bias", window=3)
    for _ in range(3):
        layer(producer(torch.randn(shape, dtype=DT)))
    bn = nn.BatchNorm2d(6, dtype=DT)
    with torch.no_grad():
        bn.running_mean.uniform_()
        bn.weight.uniform_()
    bn.num_batches_tracked.fill_(7)
    result = layer.load_state_dict(bn.state_dict())  # strict: no missing window keys reported
    assert not result.missing_keys and not result.unexpected_keys
    assert int(layer.window_count) == 0 and int(layer.num_steps) == 0
    assert layer.window_dsqmean.shape == (2, 6, 27)  # still sized for the producer
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    assert int(layer.num_batches_tracked) == 7
    layer.eval()
    bn.eval()
    out = producer(torch.randn(shape, dtype=DT))
    torch.testing.assert_close(layer(out), bn(out))


def test_statistics_interface_is_channelwise_bn():
    producer, layer, shape = make_pair("conv2d_bias", window=3)
    out = producer(torch.randn(shape, dtype=DT)).detach()
    mom = normlab.batch_moments(layer, out)
    torch.testing.assert_close(mom.mean, out.mean((0, 2, 3)))
    torch.testing.assert_close(mom.var, out.var((0, 2, 3), correction=0))
    normlab.load_statistics(layer, mom.mean, mom.var * 2)
    a, b = normlab.inference_affine(layer)
    layer.eval()
    torch.testing.assert_close(layer(out), out * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1))


def test_half_module_keeps_float32_window():
    layer = CrossIterationBatchNorm(4, window=3).attach(nn.Conv2d(2, 4, 3)).half()
    for name in ("running_mean", "window_mean", "window_intercept", "window_dsqmean"):
        assert getattr(layer, name).dtype == torch.float32
    assert layer.weight.dtype == torch.float16
    d = CrossIterationBatchNorm(4, window=3, dtype=DT)
    assert d.window_mean.dtype == DT and d.window_mean.shape == (2, 4)


def test_lazy_producer_channels_last_and_half_train():
    torch.manual_seed(0)
    conv = nn.LazyConv2d(4, 3, padding=1)
    layer = CrossIterationBatchNorm(4, window=3).attach(conv)
    assert layer.window_dsqmean.shape == (2, 4, 0)  # sized once the producer is materialized
    model = nn.Sequential(conv, layer)
    model(torch.randn(2, 3, 5, 5))
    model = model.to(memory_format=torch.channels_last)  # the flat window buffers are left alone
    for _ in range(3):
        model(torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)).sum().backward()
    assert layer.window_dsqmean.shape == (2, 4, 27) and int(layer.window_count) == 4
    model.half()
    for _ in range(2):
        y = model(torch.randn(2, 3, 5, 5).half())
        y.float().sum().backward()
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert layer.window_dsqmean.dtype == torch.float32 and layer.weight.grad.dtype == torch.float16
    assert "window=3" in repr(layer) and "producer=Conv2d" in repr(layer)


def test_convert_back_to_batchnorm_keeps_learned_state():
    producer, layer, shape = make_pair("conv2d_bias", window=3)
    for _ in range(3):
        layer(producer(torch.randn(shape, dtype=DT)))
    bn = normlab.convert(nn.Sequential(producer, layer), "bn")[1]
    assert type(bn) is normlab.BatchNorm
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(layer, name))


# ------------------------------------------------------------------------------ pairing, errors
def test_bad_input_and_mispairing_raise_without_touching_state():
    producer, layer, shape = make_pair("conv2d_bias", window=3)
    layer(producer(torch.randn(shape, dtype=DT)))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="CrossIterationBatchNorm.*6 channels"):
        layer(torch.randn(2, 5, 4, 4, dtype=DT))
    out = producer(torch.randn(shape, dtype=DT))
    with pytest.raises(ValueError, match="CrossIterationBatchNorm: expected its input to be the output"):
        layer(out + 1)  # not what the producer returned
    with pytest.raises(ValueError, match="expected its input to be the output"):
        layer(out)  # the capture was consumed by the failed call: a second use is not the producer's output
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="output channels"):
        CrossIterationBatchNorm(5).attach(nn.Conv2d(3, 6, 1))
    with pytest.raises(ValueError, match="Conv1d/Conv2d/Conv3d or nn.Linear"):
        CrossIterationBatchNorm(6).attach(nn.ConvTranspose2d(3, 6, 1))
    with pytest.raises(ValueError, match="window"):
        CrossIterationBatchNorm(6, window=0)
    with pytest.raises(ValueError, match="burn_in"):
        CrossIterationBatchNorm(6, burn_in=-1)


def test_unpaired_pools_uncompensated_statistics_and_warns():
    torch.manual_seed(0)
    layer = CrossIterationBatchNorm(3, window=3, affine=False, dtype=DT)
    xs = [torch.randn(2, 3, 4, dtype=DT) for _ in range(3)]
    with pytest.warns(UserWarning, match="uncompensated"):
        for x in xs:
            y = layer(x)
    mus = [x.mean((0, 2)) for x in xs]
    nus = [(x * x).mean((0, 2)) for x in xs]
    mu_bar = sum(mus) / 3
    var_bar = sum(nus) / 3 - mu_bar**2
    torch.testing.assert_close(y, (xs[2] - mu_bar.view(1, -1, 1)) / torch.sqrt(var_bar + EPS).view(1, -1, 1))


def test_attach_moves_hook_and_replaced_layer_goes_quiet():
    conv_a, conv_b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
    layer = CrossIterationBatchNorm(4, window=2).attach(conv_a)
    assert len(conv_a._forward_hooks) == 1
    layer.attach(conv_b)
    assert len(conv_a._forward_hooks) == 0 and len(conv_b._forward_hooks) == 1
    layer.attach(None)
    assert len(conv_b._forward_hooks) == 0 and layer.producer is None
    other = CrossIterationBatchNorm(4, window=2).attach(conv_a)
    del other  # the hook holds its layer weakly
    conv_a(torch.randn(2, 3, 2, 2))  # no error, nothing kept


def resnet_like() -> nn.Module:
    """The shared ResNet with a BatchNorm1d fed by the classifier: seven norms, each right after its producer."""
    torch.manual_seed(0)
    return resnet(num_classes=10, head_norm="post")


def test_convert_pairs_every_conv_bn_in_resnet_like_model():
    model = resnet_like()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cbn, report = normlab.convert(model, "cbn", window=3, burn_in=1, report=True)
    layers = {n: m for n, m in cbn.named_modules() if isinstance(m, CrossIterationBatchNorm)}
    assert len(layers) == 7 and not report.skipped
    modules = dict(cbn.named_modules())
    expected = {
        "bn1": "conv1", "layer1.0.bn1": "layer1.0.conv1", "layer1.0.bn2": "layer1.0.conv2",
        "layer2.0.bn1": "layer2.0.conv1", "layer2.0.bn2": "layer2.0.conv2",
        "layer2.0.downsample.1": "layer2.0.downsample.0", "head_norm": "fc",
    }  # fmt: skip
    for norm, prod in expected.items():
        assert layers[norm].producer is modules[prod]
    assert all(m.window == 3 and m.burn_in == 1 for m in layers.values())
    assert not any(isinstance(m, CrossIterationBatchNorm) for m in model.modules())  # the original is untouched
    # every pair is right: training past the burn-in passes the producer check
    opt = torch.optim.SGD(cbn.parameters(), lr=0.05)
    for _ in range(4):
        cbn(torch.randn(2, 3, 8, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(int(m.window_count) == 3 for m in layers.values())
    # deep copies keep the pairs inside the copy
    twin = copy.deepcopy(cbn)
    twin_modules = dict(twin.named_modules())
    for norm, prod in expected.items():
        assert twin_modules[norm].producer is twin_modules[prod]
    twin(torch.randn(2, 3, 8, 8))
    assert all(int(m.window_count) == 3 for m in layers.values())  # the original's windows did not move
    # so does pickling the whole model
    buf = io.BytesIO()
    torch.save(cbn, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert loaded.layer1[0].bn1.producer is loaded.layer1[0].conv1
    loaded(torch.randn(2, 3, 8, 8))


def test_convert_reports_and_warns_about_unpaired_norms():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match="could not be paired"):
        cbn, report = normlab.convert(model, "cbn", report=True)
    reasons = dict(report.skipped)
    assert set(reasons) == {"0", "3"}
    assert all("no conv or linear layer feeds it directly" in why for why in reasons.values())
    assert cbn[0].producer is None and cbn[3].producer is None
    # A norm after a transposed conv is found but not compensated: said so.
    with pytest.warns(UserWarning, match="could not be paired"):
        _, report = normlab.convert(nn.Sequential(nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4)), "cbn", report=True)
    assert "is a ConvTranspose2d, not a Conv1d/2d/3d or Linear" in dict(report.skipped)["1"]


# ------------------------------------------------------------------------------ properties
@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(2, 5),
    batch=st.integers(1, 3),
    channels=st.integers(1, 4),
    window=st.integers(1, 4),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_shapes_and_finiteness_for_any_rank(rank, batch, channels, window, steps, seed):
    torch.manual_seed(seed)
    cin = 2
    spatial = (3,) * (rank - 2)
    if rank == 2:
        producer = nn.Linear(cin, channels).to(DT)
        batch = max(batch, 2)
    else:
        producer = [nn.Conv1d, nn.Conv2d, nn.Conv3d][rank - 3](cin, channels, 2, padding=1).to(DT)
    layer = CrossIterationBatchNorm(channels, window=window, dtype=DT).attach(producer)
    for _ in range(steps):
        x = torch.randn(batch, cin, *spatial, dtype=DT)
        out = producer(x)
        y = layer(out)
        assert y.shape == out.shape and torch.isfinite(y).all()
        y.sum().backward()
        perturb(producer, 0.2)
    assert int(layer.window_count) == (steps if window > 1 else 0)


@settings(max_examples=15, deadline=None)
@given(value=st.floats(-5, 5), window=st.integers(2, 4), steps=st.integers(1, 4))
def test_constant_input_normalizes_to_bias(value, window, steps):
    """Degenerate input: a constant channel has zero pooled variance and is mapped to beta."""
    layer = CrossIterationBatchNorm(2, window=window, dtype=DT)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.3, -0.7], dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            y = layer(torch.full((2, 2, 3), value, dtype=DT))
    torch.testing.assert_close(y, layer.bias.detach().view(1, 2, 1).expand_as(y))


# ------------------------------------------------------------------------------ synchronized path
def test_synchronized_path_matches_local_on_one_process(tmp_path):
    """The process-group branch (global sums through all_reduce) gives the local results on one process."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        local_pair = make_pair("conv2d_groups_stride_dilation", window=3, seed=3)
        synced_pair = make_pair("conv2d_groups_stride_dilation", window=3, seed=3)
        synced_pair[1].sync_group = lambda: group
        shape = local_pair[2]
        for _ in range(4):
            x = torch.randn(shape, dtype=DT)
            ys, grads = [], []
            for producer, layer, _ in (local_pair, synced_pair):
                y = layer(producer(x))
                g = torch.autograd.grad(y, [layer.weight, *producer.parameters()], torch.ones_like(y) + y.detach())
                ys.append(y)
                grads.append(g)
            torch.testing.assert_close(ys[0], ys[1])
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b)
            for producer, _, _ in (local_pair, synced_pair):
                torch.manual_seed(7)
                perturb(producer)
        for a, b in zip(local_pair[1].state_dict().values(), synced_pair[1].state_dict().values()):
            torch.testing.assert_close(a, b)
    finally:
        if owns:
            dist.destroy_process_group()


@pytest.mark.parametrize("burn_in", [0, 2])
def test_torch_compile_fullgraph_matches_eager(burn_in):
    """Compiled, the burn-in and the window's fill are decided in tensors (no count on the host): the
    same outputs, gradients, window and counters as eager, through the burn-in and the window's fill."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    model = nn.Sequential(conv, CrossIterationBatchNorm(8, window=3, burn_in=burn_in).attach(conv))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for step in range(6):
        x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(step))
        y, y_ref = compiled(x), eager(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        y.square().mean().backward()
        y_ref.square().mean().backward()
        with torch.no_grad():
            for p, q in zip(model.parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5)
                p.sub_(0.01 * p.grad)
                q.sub_(0.01 * q.grad)
                p.grad = q.grad = None
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    assert int(model[1].num_steps) == 6 and int(model[1].window_count) == 6 - burn_in


def test_save_window_false_leaves_the_window_out_of_checkpoints():
    producer, layer, shape = make_pair("conv2d_bias", window=4)
    lean_producer, lean, _ = make_pair("conv2d_bias", window=4)
    lean = CrossIterationBatchNorm(6, window=4, burn_in=0, save_window=False, dtype=DT).attach(lean_producer)
    for _ in range(5):
        x = torch.randn(shape, dtype=DT)
        layer(producer(x))
        lean(lean_producer(x))
    full_keys, lean_keys = set(layer.state_dict()), set(lean.state_dict())
    assert full_keys - lean_keys == {"window_count", *(k for k in full_keys if k.startswith("window_"))}
    assert "num_steps" in lean_keys and "save_window=False" in repr(lean)
    size = lambda m: sum(v.numel() for v in m.state_dict().values())  # noqa: E731
    assert size(lean) < size(layer) / 3
    # A loaded layer keeps its burn-in count and refills the window.
    fresh_producer, fresh, _ = make_pair("conv2d_bias", window=4)
    fresh = CrossIterationBatchNorm(6, window=4, save_window=False, dtype=DT).attach(fresh_producer)
    fresh.load_state_dict(lean.state_dict())
    assert int(fresh.num_steps) == 5 and int(fresh.window_count) == 0
    lean.load_state_dict(lean.state_dict())
    assert int(lean.window_count) == 0  # a load empties a window the checkpoint does not describe


def test_overflowing_derivative_sums_leave_the_window_alone():
    # Finite statistics (the producer's output is 1 everywhere) from inputs whose sums against that
    # output overflow float32: this step's derivatives are not finite, so the guard stores nothing.
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1e-36)
    layer = normlab.CrossIterationBatchNorm(1, window=3).attach(conv)
    x = torch.full((8, 1, 8, 8), 1e36)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="CrossIterationBatchNorm: a training batch gave non-finite"):
        y = layer(conv(x))
    assert torch.isfinite(y).all()
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    layer(conv(torch.randn(8, 1, 8, 8)))  # and it trains on
    assert int(layer.window_count) == 1 and torch.isfinite(layer.window_dsqmean).all()
