"""BatchKalmanNorm against references written from Wang et al. (2018): the micro-batch observation,
the posterior update (the p : (1 - p) mixture), the closed-form transition through ReLU and a conv
or linear layer (against Monte Carlo), and its limits p = 0 (ghost BN) and one group (BN)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import normlab
from _shared import compiled_matches_eager, resnet
from normlab.kalman import batch_kalman_norm, kalman_update, predict, relu_moments

D = torch.float64


def _reference(x, prior, weight, bias, p, eps, size):
    """Each contiguous micro-batch normalized with its posterior, straight from the equations."""
    outs, means, variances = [], [], []
    chunks = x.split(size) if size is not None else (x,)
    dims = [0, *range(2, x.dim())]
    for g, chunk in enumerate(chunks):
        mu_o = chunk.mean(dims)
        var_o = ((chunk - mu_o.reshape(1, -1, *[1] * (x.dim() - 2))) ** 2).mean(dims)
        if prior is None:
            mu, var = mu_o, var_o
        else:
            mu_p, var_p = (t if t.dim() == 1 else t[g] for t in prior)
            mu = p * mu_p + (1 - p) * mu_o
            var = p * var_p + (1 - p) * var_o + p * (1 - p) * (mu_o - mu_p) ** 2
        shape = (1, -1, *[1] * (x.dim() - 2))
        outs.append(
            weight.reshape(shape) * (chunk - mu.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps)
            + bias.reshape(shape)
        )
        means.append(mu)
        variances.append(var)
    return torch.cat(outs), torch.stack(means), torch.stack(variances)


def _reference_predict(mean, var, layer):
    """The transition with the textbook rectified-Gaussian moments and explicit loops over inputs."""
    s = var.sqrt()
    a = mean / s
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    pdf = torch.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    e = mean * cdf + s * pdf
    e2 = (mean**2 + var) * cdf + mean * s * pdf
    v = e2 - e * e
    w = layer.weight.detach()
    out_mean = torch.zeros(w.size(0), dtype=mean.dtype)
    out_var = torch.zeros(w.size(0), dtype=mean.dtype)
    groups = getattr(layer, "groups", 1)
    c_in_g = w.size(1)
    for o in range(w.size(0)):
        grp = o // (w.size(0) // groups)
        for j in range(c_in_g):
            i = grp * c_in_g + j
            out_mean[o] += w[o, j].sum() * e[i]
            out_var[o] += (w[o, j] ** 2).sum() * v[i]
    if layer.bias is not None:
        out_mean += layer.bias.detach()
    return out_mean, out_var


def _layer(c, **kw):
    layer = normlab.BatchKalmanNorm(c, dtype=D, **kw)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return layer


# ----------------------------------------------------------------------------- the equations
@pytest.mark.parametrize("shape,size", [((10, 5), 4), ((8, 5, 3, 3), 4), ((9, 5, 2), None), ((6, 5, 2, 2), 2)])
@pytest.mark.parametrize("per_group", [False, True])
def test_matches_the_equations(shape, size, per_group):
    torch.manual_seed(0)
    layer = _layer(5, p=0.7, micro_batch=size, momentum=0.2)
    groups = len(range(0, shape[0], size)) if size else 1
    lead = (groups, 5) if per_group else (5,)
    prior = (torch.randn(lead, dtype=D, requires_grad=True), (torch.rand(lead, dtype=D) + 0.5).requires_grad_())
    x = (torch.randn(shape, dtype=D) * 2 + 1).requires_grad_()
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    y = layer(x, prior=prior)
    y_ref, mu, var = _reference(x, prior, layer.weight, layer.bias, 0.7, layer.eps, size)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    inputs = (x, layer.weight, layer.bias, *prior)
    for a, e in zip(torch.autograd.grad(y, inputs, g, retain_graph=True), torch.autograd.grad(y_ref, inputs, g)):
        torch.testing.assert_close(a, e)
    # one moving-average step per micro-batch from its posterior, unbiased as torch stores it
    m = x[0].numel() // 5
    for k, chunk in enumerate(x.split(size) if size else (x,)):
        count = chunk.size(0) * m
        rm = 0.8 * rm + 0.2 * mu[k].detach()
        rv = 0.8 * rv + 0.2 * var[k].detach() * count / (count - 1)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    assert int(layer.num_batches_tracked) == groups
    # inference: BN with the running statistics
    x = torch.randn(shape, dtype=D)
    want = nn.functional.batch_norm(x, rm, rv, layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(layer.eval()(x), want)


def test_posterior_is_the_mixture_moments():
    torch.manual_seed(1)
    p = 0.3
    a = torch.randn(1000, dtype=D) * 2 + 1  # the prediction's population
    b = torch.randn(3000, dtype=D) * 0.5 - 2  # the observation's
    # a p : (1 - p) mixture of the two populations, as weights on their points
    pts = torch.cat([a, b])
    w = torch.cat([torch.full_like(a, p / a.numel()), torch.full_like(b, (1 - p) / b.numel())])
    mean = (w * pts).sum()
    var = (w * (pts - mean) ** 2).sum()
    got = kalman_update((b.mean(), b.var(correction=0)), (a.mean(), a.var(correction=0)), p)
    torch.testing.assert_close(got[0], mean)
    torch.testing.assert_close(got[1], var)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_gain_zero_is_ghost_batch_norm(momentum):
    torch.manual_seed(2)
    k = _layer(4, p=0.0, micro_batch=3, momentum=momentum)
    g = normlab.GhostBatchNorm(4, momentum=momentum, virtual_batch_size=3, dtype=D)
    g.load_state_dict(k.state_dict())
    for _ in range(2):
        x = torch.randn(8, 4, 3, 3, dtype=D, requires_grad=True)
        prior = (torch.randn(4, dtype=D), torch.rand(4, dtype=D) + 1)
        y, y_ref = k(x, prior=prior), g(x)
        torch.testing.assert_close(y, y_ref)
        gy = torch.randn_like(y)
        for a, e in zip(torch.autograd.grad(y, (x, k.weight), gy), torch.autograd.grad(y_ref, (x, g.weight), gy)):
            torch.testing.assert_close(a, e)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(k, name), getattr(g, name))


def test_one_group_without_prior_is_batch_norm():
    torch.manual_seed(3)
    k = _layer(4)
    bn = nn.BatchNorm2d(4, dtype=D)
    bn.load_state_dict(k.state_dict())
    for _ in range(3):
        x = torch.randn(6, 4, 3, 3, dtype=D)
        torch.testing.assert_close(k(x), bn(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(k, name), getattr(bn, name))


def test_functional_core_matches_the_layer():
    torch.manual_seed(4)
    layer = _layer(3, p=0.6, micro_batch=2)
    x = torch.randn(5, 3, 4, dtype=D)
    prior = (torch.randn(3, 3, dtype=D), torch.rand(3, 3, dtype=D) + 0.1)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    y = batch_kalman_norm(x, rm, rv, layer.weight, layer.bias, True, 0.1, layer.eps, p=0.6, micro_batch=2, prior=prior)
    torch.testing.assert_close(y, layer(x, prior=prior))
    torch.testing.assert_close(rm, layer.running_mean)
    torch.testing.assert_close(rv, layer.running_var)


# ----------------------------------------------------------------------------- the transition
@pytest.mark.parametrize("mean", [-30.0, -3.0, -0.5, 0.0, 0.7, 4.0, 30.0])
def test_relu_moments_against_quadrature(mean):
    var = torch.tensor(1.3, dtype=D)
    h = torch.linspace(mean - 12 * 1.15, mean + 12 * 1.15, 400_001, dtype=D)
    density = torch.exp(-((h - mean) ** 2) / (2 * var)) / torch.sqrt(2 * math.pi * var)
    r = h.clamp_min(0)
    step = h[1] - h[0]
    e = torch.trapezoid(r * density, dx=step)
    v = torch.trapezoid((r - e) ** 2 * density, dx=step)
    got = relu_moments(torch.tensor(mean, dtype=D), var)
    torch.testing.assert_close(got[0], e, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(got[1], v, atol=1e-9, rtol=1e-6)


def test_relu_moments_closed_form_derivatives():
    from normlab.kalman import _relu_moments

    torch.manual_seed(4)
    # both tails, the centre, a variance near 0, and a variance of 0 at mean 0 and off it
    mean = torch.tensor([-40.0, -6.0, -1.0, 0.0, 0.3, 2.0, 7.0, 40.0] * 2 + [0.0, 1.5], dtype=D).requires_grad_()
    var = torch.tensor([1.0] * 8 + [1e-9, 0.5, 2.0, 3.0, 1e-6, 0.1, 9.0, 4.0, 0.0, 0.0], dtype=D).requires_grad_()
    got, want = relu_moments(mean, var), _relu_moments(mean, var)
    g = [torch.randn_like(want[0]), torch.randn_like(want[1])]
    for a, e in zip(torch.autograd.grad(got, (mean, var), g), torch.autograd.grad(want, (mean, var), g)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
    inner = (mean[2:7].detach().requires_grad_(), var[2:7].detach().add(0.2).requires_grad_())
    assert gradcheck(relu_moments, inner) and gradgradcheck(relu_moments, inner)


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(6, 4, 3), nn.Conv2d(6, 4, (3, 2), groups=2, bias=False), nn.Conv1d(6, 4, 1), nn.Linear(6, 4)],
    ids=["conv2d", "conv2d-groups", "conv1d-1tap", "linear"],
)
def test_transition_backward_matches_autograd_of_the_composite(layer):
    from normlab.kalman import _transition

    torch.manual_seed(8)
    layer = layer.to(D)
    e = torch.randn(3, 6, dtype=D, requires_grad=True)
    d = torch.rand(3, 6, dtype=D).add(0.1).requires_grad_()
    got = predict(e, d, layer, "identity")
    w = layer.weight
    want = _transition(e, d, w, getattr(layer, "groups", 1))
    if layer.bias is not None:
        want = (want[0] + layer.bias, want[1])
    g = [torch.randn_like(want[0]), torch.randn_like(want[1])]
    inputs = (e, d, w)
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b)

    def f(e, d, w):
        with torch.nn.utils.stateless._reparametrize_module(layer, {"weight": w}):
            return predict(e, d, layer, "identity")

    w = w.detach().clone().requires_grad_()
    assert gradcheck(f, (e, d, w)) and gradgradcheck(f, (e, d, w))


@pytest.mark.parametrize(
    "layer",
    [nn.Conv2d(6, 4, 3), nn.Conv2d(6, 4, 3, groups=2, bias=False), nn.Conv1d(6, 4, 2), nn.Linear(6, 4)],
    ids=["conv2d", "conv2d-groups", "conv1d", "linear"],
)
def test_closed_form_transition_against_monte_carlo(layer):
    torch.manual_seed(5)
    layer = layer.to(D)
    mean = torch.randn(6, dtype=D)
    var = torch.rand(6, dtype=D) + 0.2
    mu, v = predict(mean, var, layer)
    ref = _reference_predict(mean, var, layer)
    torch.testing.assert_close(mu, ref[0])
    torch.testing.assert_close(v, ref[1])
    # Monte Carlo: independent N(mean, var) inputs at every position, ReLU, the layer (no padding).
    spatial = {nn.Conv2d: (10, 10), nn.Conv1d: (40,), nn.Linear: ()}[type(layer)]
    n = 20_000
    h = torch.randn(n, 6, *spatial, dtype=D) * var.sqrt().reshape(6, *[1] * len(spatial)) + mean.reshape(
        6, *[1] * len(spatial)
    )
    with torch.no_grad():
        out = layer(torch.relu(h))
    dims = [0, *range(2, out.dim())]
    samples = out.transpose(0, 1).reshape(4, -1)
    se_mean = samples.std(1) / math.sqrt(n)  # positions of one sample are correlated: n, not numel
    torch.testing.assert_close(out.mean(dims), mu.detach(), atol=float(6 * se_mean.max()), rtol=0)
    torch.testing.assert_close(out.var(dims), v.detach(), rtol=0.05, atol=0)


# ----------------------------------------------------------------------------- the chain
def _chain(p=0.8, size=2, activation="relu", c=(3, 4), k=3):
    a = _layer(c[0], p=p, micro_batch=size)
    conv = nn.Conv2d(c[0], c[1], k, dtype=D)
    b = _layer(c[1], p=p, micro_batch=size).attach(conv, prev=a, activation=activation)
    act = nn.ReLU() if activation == "relu" else nn.Identity()
    return nn.Sequential(a, act, conv, b)


def test_chain_predicts_from_the_previous_posterior():
    torch.manual_seed(6)
    net = _chain()
    a, conv, b = net[0], net[2], net[3]
    x = torch.randn(6, 3, 5, 5, dtype=D, requires_grad=True)
    h = torch.relu(a(x))
    post = a.posterior
    assert post is not None and post[0].shape == (3, 3)
    prior = predict(*post, conv, "relu")
    z = conv(h)
    y = b(z)
    assert a.posterior is None  # taken by b
    y_ref, _, _ = _reference(z, prior, b.weight, b.bias, 0.8, b.eps, 2)
    torch.testing.assert_close(y, y_ref)
    # the prediction's gradient reaches the producer's weights and the earlier layer's input
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), g, retain_graph=True)
    unlinked = _layer(4, p=0.8, micro_batch=2)
    unlinked.load_state_dict(b.state_dict())
    gx0, gw0 = torch.autograd.grad(unlinked(z), (x, conv.weight), g)
    assert not torch.allclose(gw, gw0) and not torch.allclose(gx, gx0)


def test_gradcheck_and_gradgradcheck_through_a_two_layer_chain():
    torch.manual_seed(7)
    net = _chain(p=0.6, c=(2, 2), k=2)
    conv = net[2]
    x = torch.randn(4, 2, 3, 3, dtype=D, requires_grad=True)

    def f(x, w):
        with torch.nn.utils.stateless._reparametrize_module(conv, {"weight": w}):
            return net(x)

    w = conv.weight.detach().clone().requires_grad_()
    assert gradcheck(f, (x, w), fast_mode=True)
    assert gradgradcheck(f, (x, w), fast_mode=True)


def test_no_posterior_from_an_earlier_pass():
    torch.manual_seed(8)
    net = _chain()
    a, b = net[0], net[3]
    x = torch.randn(6, 3, 5, 5, dtype=D)
    net(x)
    z = net[2](torch.relu(a(x)))
    b(z)  # takes a's posterior
    ghost = _layer(4, p=0.0, micro_batch=2)
    ghost.load_state_dict(b.state_dict())
    torch.testing.assert_close(b(z), ghost(z))  # nothing fresh to take: the observation alone
    a.eval()(x)  # an eval forward publishes nothing
    assert a.posterior is None
    a.train()
    a(x)
    c = copy.deepcopy(net)  # a pass's estimates (with their graph) are not copied
    assert c[0].posterior is None and c[3].link[0] is c[0] and c[3].link[1] is c[2]


def test_guard_falls_back_to_the_observation():
    torch.manual_seed(9)
    layer = _layer(4, p=0.9, micro_batch=2, max_variance_ratio=100.0)
    ghost = _layer(4, p=0.0, micro_batch=2)
    ghost.load_state_dict(layer.state_dict())
    x = torch.randn(6, 4, 3, dtype=D)
    huge = (torch.zeros(4, dtype=D), torch.full((4,), 1e6, dtype=D))
    torch.testing.assert_close(layer(x, prior=huge), ghost(x))
    modest = (torch.zeros(4, dtype=D), torch.ones(4, dtype=D))
    assert not torch.allclose(layer(x, prior=modest), ghost(x))


# ----------------------------------------------------------------------------- convert and links
def test_convert_links_through_conv_and_relu_never_across_sums():
    model = resnet(widths=(8, 16), blocks=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted, rep = normlab.convert(model, "bkn", micro_batch=2, report=True)
    links = {(n, p, c, a) for p, c, a, n in rep.links}
    want = {(f"layer{i}.{j}.bn2", f"layer{i}.{j}.bn1", f"layer{i}.{j}.conv2", "relu") for i in (1, 2) for j in (0, 1)}
    # The stem's bn1 -> relu -> layer1.0.conv1 (no pooling in this ResNet; the ReLU's output also
    # feeds the shortcut, which does not change layer1.0.conv1's input).
    want.add(("layer1.0.bn1", "bn1", "layer1.0.conv1", "relu"))
    assert links == want  # bn1 -> relu -> conv2 -> bn2 in every block; nothing across a sum
    layer = converted.get_submodule("layer2.1.bn2")
    assert layer.link[0] is converted.get_submodule("layer2.1.bn1")
    assert "from layer2.1.bn1 through relu and layer2.1.conv2" in str(rep)
    x = torch.randn(8, 3, 8, 8)
    converted(x).square().mean().backward()  # trains
    state = converted.state_dict()
    assert set(state) == set(model.state_dict())  # links are not state: BN's checkpoint keys


def test_convert_links_an_mlp_through_identity():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Identity(), nn.Linear(6, 7), nn.BatchNorm1d(7))
    converted, rep = normlab.convert(model, "bkn", report=True)
    assert rep.links == [("1", "3", "identity", "4")]


def test_untraceable_model_links_nothing_and_says_so():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:  # data-dependent: not traceable
                h = torch.relu(h)
            return self.b(self.fc(h))

    with pytest.warns(UserWarning, match="no BatchKalmanNorm layer was linked"):
        converted, rep = normlab.convert(Branchy(), "bkn", report=True)
    assert rep.links == [] and converted.b.link is None


# ----------------------------------------------------------------------------- bad input, state untouched
def test_bad_prior_raises_before_any_state_changes():
    net = _chain()
    a, b = net[0], net[3]
    x = torch.randn(6, 3, 5, 5, dtype=D)
    z = net[2](torch.relu(a(x)))
    before = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match=r"BatchKalmanNorm: expected prior of shape \(4,\) or \(3, 4\)"):
        b(z, prior=(torch.zeros(5, dtype=D), torch.ones(5, dtype=D)))
    with pytest.raises(ValueError, match="BatchKalmanNorm: expected prior as a \\(mean, var\\) pair"):
        b(z, prior=torch.zeros(4, dtype=D))
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert a.posterior is not None  # not taken by the failed forward
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        b(z[:5, :, :1, :1])  # the last micro-batch holds one value per channel
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_attach_checks():
    a, b = _layer(3), _layer(4)
    with pytest.raises(ValueError, match="one of Linear, Conv1d"):
        b.attach(nn.MaxPool2d(2), prev=a)
    with pytest.raises(ValueError, match="from prev's 3 to this layer's 4 channels, got 3 -> 5"):
        b.attach(nn.Conv2d(3, 5, 1), prev=a)
    with pytest.raises(ValueError, match="activation"):
        b.attach(nn.Conv2d(3, 4, 1), prev=a, activation="gelu")
    with pytest.raises(ValueError, match="micro_batch"):
        b.attach(nn.Conv2d(3, 4, 1), prev=_layer(3, micro_batch=2))
    b.attach(nn.Conv2d(3, 4, 1), prev=a)
    with pytest.raises(ValueError, match="already feeds another"):
        _layer(4).attach(nn.Conv2d(3, 4, 1), prev=a)
    b.attach(None)
    _layer(4).attach(nn.Conv2d(3, 4, 1), prev=a)  # free again
    with pytest.raises(ValueError, match="gain p in \\[0, 1\\]"):
        normlab.BatchKalmanNorm(4, p=1.5)


@pytest.mark.slow
def test_compiled_chain_matches_eager():
    torch.manual_seed(10)
    eager = _chain().float()
    torch._dynamo.reset()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, fullgraph=True)
    for step in range(3):
        x = torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(step))
        y1, y2 = eager(x), compiled(x)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(eager[2].weight.grad, twin[2].weight.grad, rtol=1e-4, atol=1e-4)
        for i in (0, 3):
            torch.testing.assert_close(eager[i].running_var, twin[i].running_var)
    compiled_matches_eager(_layer(4, p=0.5, micro_batch=2).float(), (6, 4, 3, 3), ("running_mean", "running_var"))


# Remainders (per micro-batch), equal micro-batches stacked (2-D, small maps), equal ones over grouped
# views (a 9x9 map), and channels_last (per micro-batch).
@pytest.mark.parametrize("prior_shape", [None, (3,), (3, 3)])
@pytest.mark.parametrize(
    "shape,sizes,channels_last",
    [
        ((5, 3, 2, 2), (2, 2, 1), False),
        ((7, 3), (3, 3, 1), False),
        ((6, 3, 2, 2), (2, 2, 2), False),
        ((9, 3), (3, 3, 3), False),
        ((6, 3, 9, 9), (2, 2, 2), False),
        ((6, 3, 9, 9), (2, 2, 2), True),
    ],
)
def test_hand_written_backward_matches_the_composite(shape, sizes, channels_last, prior_shape):
    from normlab.kalman import _composite, _KalmanStep

    torch.manual_seed(13)
    x = torch.randn(shape, dtype=D)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    if prior_shape == (3, 3):
        prior_shape = (len(sizes), 3)
    w, b = torch.rand(3, dtype=D, requires_grad=True), torch.randn(3, dtype=D, requires_grad=True)
    prior = (None, None)
    if prior_shape is not None:
        prior = (
            torch.randn(prior_shape, dtype=D, requires_grad=True),
            torch.rand(prior_shape, dtype=D).add(0.5).requires_grad_(),
        )
    settings = (sizes, 0.7, 1e-5, None)
    got = _KalmanStep.apply(x, w, b, *prior, settings)
    want = _composite(x, w, b, *prior, settings)
    inputs = [t for t in (x, w, b, *prior) if t is not None]
    grads = [torch.randn_like(t) for t in want]
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    for a, e in zip(
        torch.autograd.grad(got, inputs, grads), torch.autograd.grad(want, inputs, grads, retain_graph=True)
    ):
        torch.testing.assert_close(a, e)
    # only the posterior used (the next layer's prediction), and fresh outputs for in-place ops
    y, mean, var = _KalmanStep.apply(x, w, b, *prior, settings)
    (gx,) = torch.autograd.grad(mean.sum() + var.sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(sum(t.sum() for t in want[1:]), x)[0])
    y.relu_()
    mean.add_(1)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 12),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 5), max_size=2),
    size=st.integers(1, 12),
    prior=st.sampled_from([None, "channel", "group"]),
    channels_last=st.booleans(),
)
def test_property_hand_written_step_matches_the_composite(n, c, spatial, size, prior, channels_last):
    """Any batch, micro-batch size and layout (remainders, stacked copies, grouped views, short and long
    rows): the step and its backward against the step in differentiable ops."""
    from normlab.kalman import _composite, _KalmanStep

    sizes = tuple(normlab.kernels.micro_batch_sizes(n, size))
    per_sample = math.prod(spatial)
    if min(sizes) * per_sample < 2:  # a micro-batch of one value per channel: refused by the layer
        return
    g = torch.Generator().manual_seed(n * 1000 + c * 100 + size)
    x = torch.randn(n, c, *spatial, dtype=D, generator=g) * 3 + 1
    if channels_last and len(spatial) == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(c, dtype=D, generator=g).add(0.5).requires_grad_()
    b = torch.randn(c, dtype=D, generator=g).requires_grad_()
    lead = {None: None, "channel": (c,), "group": (len(sizes), c)}[prior]
    mu_p = var_p = None
    if lead is not None:
        mu_p = torch.randn(lead, dtype=D, generator=g).requires_grad_()
        var_p = torch.rand(lead, dtype=D, generator=g).add(0.2).requires_grad_()
    settings_ = (sizes, 0.6, 1e-5, None)
    got = _KalmanStep.apply(x, w, b, mu_p, var_p, settings_)
    want = _composite(x, w, b, mu_p, var_p, settings_)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    inputs = [t for t in (x, w, b, mu_p, var_p) if t is not None]
    grads = [torch.randn(t.shape, dtype=D, generator=g) for t in want]
    for a, e in zip(torch.autograd.grad(got, inputs, grads), torch.autograd.grad(want, inputs, grads)):
        torch.testing.assert_close(a, e)


def test_sum_rule_for_independent_branches():
    torch.manual_seed(12)
    a = torch.randn(200_000, dtype=D) * 1.5 + 2
    b = torch.randn(200_000, dtype=D) * 0.5 - 1
    mean, var = normlab.sum_estimates((a.mean(), a.var()), (b.mean(), b.var()))
    torch.testing.assert_close(mean, (a + b).mean())
    torch.testing.assert_close(var, (a + b).var(), rtol=0.02, atol=0)
    with pytest.raises(ValueError, match="at least one"):
        normlab.sum_estimates()
