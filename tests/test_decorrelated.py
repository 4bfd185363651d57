"""DecorrelatedBatchNorm against references written from the equations of Huang et al. (CVPR 2018)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normlab
from _shared import compiled_matches_eager
from normlab.decorrelated import METHODS, decorrelated_batch_norm, whitening_matrix

D64 = torch.float64


# ------------------------------------------------------------------------------------ references
def ref_whitening(sigma: torch.Tensor, method: str, iterations: int = 5) -> torch.Tensor:
    """W for one regularized covariance, straight from the paper (and IterNorm for newton)."""
    if method == "newton":
        tr = torch.trace(sigma)
        sn = sigma / tr
        P = torch.eye(sigma.size(0), dtype=sigma.dtype)
        for _ in range(iterations):
            P = 1.5 * P - 0.5 * P @ P @ P @ sn
        return P / torch.sqrt(tr)
    lam, D = torch.linalg.eigh(sigma)
    if method == "zca":
        return D @ torch.diag(lam**-0.5) @ D.T
    return torch.diag(lam**-0.5) @ D.T


def ref_dbn(x, weight, bias, group_size, method, eps, iterations=5):
    """Per group, a Python loop: mu, Sigma = Xc Xc^T / m + eps I, x_hat = W Xc, y = gamma x_hat + beta."""
    n, c = x.shape[:2]
    X = x.transpose(0, 1).reshape(c, -1)  # (C, m)
    m = X.size(1)
    rows, mats = [], []
    for start in range(0, c, group_size):
        Xg = X[start : start + group_size]
        Xc = Xg - Xg.mean(1, keepdim=True)
        sigma = Xc @ Xc.T / m + eps * torch.eye(Xg.size(0), dtype=x.dtype)
        W = ref_whitening(sigma, method, iterations)
        rows.append(W @ Xc)
        mats.append(W)
    Y = torch.cat(rows)
    if weight is not None:
        Y = Y * weight[:, None] + bias[:, None]
    return Y.reshape(c, n, *x.shape[2:]).transpose(0, 1), mats


def dbn_step(x, weight, bias, group_size, method, eps, iterations=5):
    """The layer's training step: ``(y, mean, cov, W, m)`` (no running statistics)."""
    from normlab.decorrelated import _batch_step, group_layout

    G, g = group_layout(x.size(1), group_size)
    return _batch_step(x, weight, bias, G, g, eps, method, iterations, None)


def group_cov(y, group_size):
    c = y.size(1)
    Y = y.transpose(0, 1).reshape(c, -1)
    Yc = Y - Y.mean(1, keepdim=True)
    return [Yc[s : s + group_size] @ Yc[s : s + group_size].T / Y.size(1) for s in range(0, c, group_size)]


def inputs(shape, seed=0, dtype=D64, mixing=0.3):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    # Correlated channels with unequal scales: a well-conditioned but non-trivial covariance.
    mix = torch.eye(c, dtype=dtype) + mixing * torch.randn(c, c, generator=g, dtype=dtype)
    z = torch.randn(shape, generator=g, dtype=dtype)
    x = torch.einsum("dc,nc...->nd...", mix, z) + torch.randn(c, generator=g, dtype=dtype).view(
        1, c, *[1] * (len(shape) - 2)
    )
    w = (torch.rand(c, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    b = torch.randn(c, generator=g, dtype=dtype).requires_grad_(True)
    return x.requires_grad_(True), w, b


# ------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape,group_size",
    [((64, 8), 4), ((64, 10), 4), ((16, 6, 3, 3), 3), ((16, 7, 3, 2), 16), ((40, 5, 4), 2), ((64, 8), 1)],
)
def test_matches_paper_reference(method, shape, group_size):
    if method == "pca" and shape[1] % group_size and group_size < shape[1]:
        pytest.skip("pca's eigenvector signs are LAPACK's choice; compared on unpadded groups")
    x, w, b = inputs(shape)
    layer = normlab.DecorrelatedBatchNorm(shape[1], group_size=group_size, method=method, eps=1e-3, dtype=D64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    y = layer(x)
    y_ref, _ = ref_dbn(x, w, b, group_size, method, 1e-3)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), gy)
    want = torch.autograd.grad(y_ref, (x, w, b), gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("method", ["zca", "newton"])
# 2-D input; maps of at most 16 values (the step's group-major layout: 15 and 6) and larger (per sample: 20).
@pytest.mark.parametrize(
    "shape,group_size", [((256, 48), 16), ((8, 32, 5, 3), 16), ((16, 20, 6), 8), ((4, 40, 5, 4), 16)]
)
def test_float32_training_step_matches_float64_reference(method, shape, group_size):
    # Many groups, spatial axes and a padded last group, in float32 (where the layout of the GEMMs
    # decides the rounding), against the float64 reference.
    x, w, b = inputs(shape, seed=5)
    layer = normlab.DecorrelatedBatchNorm(shape[1], group_size=group_size, method=method, eps=1e-3)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    x32 = x.detach().float().requires_grad_(True)
    y = layer(x32)
    y_ref, _ = ref_dbn(x, w, b, group_size, method, 1e-3)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    gy = torch.randn_like(y_ref)
    got = torch.autograd.grad(y, (x32, layer.weight, layer.bias), gy.float())
    want = torch.autograd.grad(y_ref, (x, w, b), gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e.float(), rtol=1e-3, atol=1e-3 * float(e.abs().max()))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("spatial", [(3, 4), (5, 4)])  # the group-major and the per-sample layout
def test_strided_input_and_gradient_without_affine(method, spatial):
    # A channels-last input and the zero-stride gradient of y.sum(), with no gamma/beta.
    x, _, _ = inputs((6, 8, *spatial), seed=6)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    layer = normlab.DecorrelatedBatchNorm(8, group_size=4, method=method, affine=False, eps=1e-3, dtype=D64)
    y = layer(x_cl)
    y_ref, _ = ref_dbn(x, None, None, 4, method, 1e-3)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn(8, dtype=D64).view(1, 8, 1, 1)
    (got,) = torch.autograd.grad((y * weights).sum(), x_cl)
    (want,) = torch.autograd.grad((y_ref * weights).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    (got,) = torch.autograd.grad(layer(x_cl).sum(), x_cl)  # dL/dy = 1 everywhere: the gradient is zero
    torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,group_size", [((12, 6), 4), ((4, 5, 2, 3), 3), ((2, 5, 3, 6), 3)])
def test_gradcheck(method, shape, group_size):
    x, w, b = inputs(shape, seed=1)
    fn = lambda x, w, b: decorrelated_batch_norm(  # noqa: E731
        x, None, None, w, b, True, None, 1e-3, group_size=group_size, method=method
    )
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,group_size", [((40, 10), 4), ((6, 6, 3, 3), 3)])
def test_synchronized_path_matches_in_one_process(method, shape, group_size):
    # The path taken under a process group (sums of x and x x^T, then autograd), with the identity
    # as the reduction: the same outputs, statistics and gradients as the fused single-process step.
    from normlab.decorrelated import _batch_step, group_layout

    x, w, b = inputs(shape, seed=12)
    G, g = group_layout(shape[1], group_size)
    fused = dbn_step(x, w, b, group_size, method, 1e-3)
    composed = _batch_step(x, w, b, G, g, 1e-3, method, 5, None, composed=True)
    for a, e in zip(composed[:4], fused[:4]):
        torch.testing.assert_close(a, e)
    assert float(composed[4]) == float(fused[4])
    gy = torch.randn_like(fused[0])
    for a, e in zip(torch.autograd.grad(composed[0], (x, w, b), gy), torch.autograd.grad(fused[0], (x, w, b), gy)):
        torch.testing.assert_close(a, e)
    # An empty local batch reaches the global sample-count check (here, alone, it fails it).
    with pytest.raises(ValueError, match="DecorrelatedBatchNorm.*process group"):
        _batch_step(x.detach()[:0], w, b, G, g, 1e-3, method, 5, None, composed=True)


@pytest.mark.parametrize("iterations", [1, 2, 7])
def test_newton_hand_backward_equals_autograd(iterations):
    from normlab.decorrelated import _newton, _newton_backward, _newton_forward, _pad_mask, _regularized

    g = torch.Generator().manual_seed(13)
    a = torch.randn(3, 4, 11, generator=g, dtype=D64)
    cov = a @ a.mT / 11
    cov[2, 3, :] = cov[2, :, 3] = 0  # the last group has 3 real channels and one of padding
    mask = _pad_mask(11, 3, 4, cov)
    sigma = _regularized(cov, 1e-3, mask, "newton")
    gW = torch.randn(3, 4, 4, generator=g, dtype=D64)
    leaf = sigma.clone().requires_grad_(True)
    W = _newton(leaf, iterations, mask)
    (want,) = torch.autograd.grad(W, leaf, gW)
    W_hand, saved = _newton_forward(sigma, iterations, mask)
    torch.testing.assert_close(W_hand, W.detach(), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(_newton_backward(saved, gW, mask), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whitening_matrix_gradcheck(method):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 4, 9, generator=g, dtype=D64)
    cov = (a @ a.mT / 9).requires_grad_(True)
    # Symmetrize so that finite differences stay among symmetric matrices.
    assert torch.autograd.gradcheck(lambda c: whitening_matrix((c + c.mT) / 2, method, 1e-3), (cov,))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,group_size", [((256, 12), 4), ((32, 10, 4, 4), 4), ((128, 6), 16)])
def test_output_is_white(method, shape, group_size):
    # Newton converges slowly for ill-conditioned covariances and is not self-correcting for condition
    # numbers above 9 (Higham, Functions of Matrices, 6.4): a milder covariance and 12 steps for it.
    x, _, _ = inputs(shape, seed=2, mixing=0.1 if method == "newton" else 0.3)
    iterations = 12
    layer = normlab.DecorrelatedBatchNorm(
        shape[1], group_size=group_size, method=method, eps=1e-9, affine=False, iterations=iterations, dtype=D64
    )
    y = layer(x.detach())
    for cov in group_cov(y, group_size):
        torch.testing.assert_close(cov, torch.eye(cov.size(0), dtype=D64), rtol=0, atol=1e-6)


def test_zca_whitening_matrix_is_symmetric_and_pca_is_not():
    x, _, _ = inputs((64, 8), seed=4)
    for method, symmetric in (("zca", True), ("pca", False)):
        W = dbn_step(x.detach(), None, None, 8, method, 1e-5)[3]
        assert torch.allclose(W, W.mT, atol=1e-12) is symmetric


def test_group_size_one_is_batchnorm():
    x, w, b = inputs((8, 6, 5, 5), seed=5)
    layer = normlab.DecorrelatedBatchNorm(6, group_size=1, dtype=D64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    bn = nn.BatchNorm2d(6, dtype=D64)
    bn.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "running_whitening"})
    for _ in range(2):
        y, y_bn = layer(x), bn(x)
        torch.testing.assert_close(y, y_bn)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, layer.weight, layer.bias), gy)
        want = torch.autograd.grad(y_bn, (x, bn.weight, bn.bias), gy)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.running_var, bn.running_var)


def test_group_size_at_least_c_whitens_all_channels_together():
    x, w, b = inputs((50, 6), seed=6)
    y = dbn_step(x, w, b, 100, "zca", 1e-4)[0]
    y_ref, _ = ref_dbn(x, w, b, 6, "zca", 1e-4)
    torch.testing.assert_close(y, y_ref)
    assert normlab.DecorrelatedBatchNorm(6, group_size=100).running_whitening.shape == (1, 6, 6)


# ------------------------------------------------------------------------------------ degenerate inputs
def degenerate_cases():
    g = torch.Generator().manual_seed(7)
    const = torch.randn(32, 6, generator=g, dtype=D64)
    const[:, 2] = 3.0
    dup = torch.randn(16, 6, 2, 2, generator=g, dtype=D64)
    dup[:, 4] = dup[:, 1]
    few = torch.randn(3, 8, generator=g, dtype=D64)  # m = 3 < group_size = 8
    one = torch.randn(1, 6, 3, 3, generator=g, dtype=D64)  # a batch of one sample, m = 9
    zero = torch.zeros(4, 6, dtype=D64)
    return {"constant": (const, 6), "duplicate": (dup, 6), "m<g": (few, 8), "one sample": (one, 4), "zero": (zero, 3)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(degenerate_cases()))
@pytest.mark.parametrize("dtype", [D64, torch.float32])
def test_degenerate_inputs_give_finite_outputs_and_gradients(method, case, dtype):
    x, group_size = degenerate_cases()[case]
    x = x.to(dtype).requires_grad_(True)
    layer = normlab.DecorrelatedBatchNorm(x.size(1), group_size=group_size, method=method, dtype=dtype)
    y = layer(x)
    y.backward(torch.randn_like(y))
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.bias.grad).all()
    assert torch.isfinite(layer.running_whitening).all()


def test_zca_gradient_at_coincident_eigenvalues_is_the_limit():
    # Columns of a Hadamard matrix: centred, Xc Xc^T / m = I exactly, all eigenvalues coincide.
    h = torch.tensor([[1.0]], dtype=D64)
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    x = h[:, 1:5].clone()  # (8, 4), each column sums to zero and columns are orthogonal
    gy = torch.randn(8, 4, dtype=D64, generator=torch.Generator().manual_seed(8))

    def grad_at(x0):
        x0 = x0.clone().requires_grad_(True)
        y = dbn_step(x0, None, None, 4, "zca", 1e-3)[0]
        return torch.autograd.grad(y, x0, gy)[0]

    # Autograd through eigh fails here; the layer's gradient is finite and the limit of nearby ones.
    xr = x.clone().requires_grad_(True)
    y_ref, _ = ref_dbn(xr, None, None, 4, "zca", 1e-3)
    assert not torch.isfinite(torch.autograd.grad(y_ref, xr, gy)[0]).all()
    at = grad_at(x)
    assert torch.isfinite(at).all()
    delta = 1e-6 * torch.randn(8, 4, dtype=D64, generator=torch.Generator().manual_seed(9))
    xd = (x + delta).requires_grad_(True)
    nearby = torch.autograd.grad(ref_dbn(xd, None, None, 4, "zca", 1e-3)[0], xd, gy)[0]
    torch.testing.assert_close(at, nearby, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ running statistics
@pytest.mark.parametrize("method", METHODS)
def test_running_statistics_and_eval(method):
    c, group_size, momentum = 7, 3, 0.3
    layer = normlab.DecorrelatedBatchNorm(c, group_size=group_size, method=method, momentum=momentum, dtype=D64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    mean = torch.zeros(c, dtype=D64)
    var = torch.ones(c, dtype=D64)
    W = torch.eye(3, dtype=D64).repeat(3, 1, 1)
    for seed in range(3):
        x, _, _ = inputs((20, c, 2), seed=seed)
        x = x.detach()
        layer(x)
        X = x.transpose(0, 1).reshape(c, -1)
        mean = (1 - momentum) * mean + momentum * X.mean(1)
        var = (1 - momentum) * var + momentum * X.var(1, unbiased=True)
        _, mats = ref_dbn(x, None, None, group_size, method, layer.eps)
        batch_W = torch.eye(3, dtype=D64).repeat(3, 1, 1)
        for k, Wk in enumerate(mats):
            r = Wk.size(0)
            batch_W[k, :r, :r] = Wk
        W = (1 - momentum) * W + momentum * batch_W
    if method != "pca":  # pca's eigenvector signs are LAPACK's choice per matrix
        torch.testing.assert_close(layer.running_whitening, W)
    torch.testing.assert_close(layer.running_mean, mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(layer.running_var, var, rtol=1e-13, atol=1e-13)
    assert int(layer.num_batches_tracked) == 3
    # The padding of the last group (one real channel of three) stays the identity.
    torch.testing.assert_close(layer.running_whitening[2, 1:, 1:], torch.eye(2, dtype=D64))
    torch.testing.assert_close(layer.running_whitening[2, 0, 1:], torch.zeros(2, dtype=D64))

    layer.eval()
    x, _, _ = inputs((5, c, 2), seed=9)
    x = x.detach()
    X = x.transpose(0, 1).reshape(c, -1) - layer.running_mean[:, None]
    blocks = [layer.running_whitening[k, :r, :r] for k, r in enumerate((3, 3, 1))]
    Y = torch.block_diag(*blocks) @ X * layer.weight[:, None] + layer.bias[:, None]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.testing.assert_close(layer(x), Y.reshape(c, 5, 2).transpose(0, 1))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_momentum_none_is_cumulative_average():
    layer = normlab.DecorrelatedBatchNorm(4, group_size=2, momentum=None, dtype=D64)
    xs = [inputs((30, 4), seed=s)[0].detach() for s in range(3)]
    Ws = []
    for x in xs:
        Ws.append(dbn_step(x, None, None, 2, "zca", layer.eps)[3])
        layer(x)
    torch.testing.assert_close(layer.running_whitening, torch.stack(Ws).mean(0))
    torch.testing.assert_close(layer.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))


def test_no_running_stats_uses_batch_statistics_in_eval():
    layer = normlab.DecorrelatedBatchNorm(4, group_size=2, track_running_stats=False, dtype=D64).eval()
    x = inputs((30, 4), seed=3)[0].detach()
    assert layer.running_whitening is None
    torch.testing.assert_close(layer(x), ref_dbn(x, layer.weight, layer.bias, 2, "zca", layer.eps)[0])


def test_frozen_uses_running_statistics_in_training():
    layer = normlab.DecorrelatedBatchNorm(4, group_size=2, dtype=D64)
    layer(inputs((30, 4), seed=3)[0].detach())
    layer.frozen = True
    x = inputs((30, 4), seed=4)[0].detach()
    before = layer.running_whitening.clone()
    y = layer(x)
    torch.testing.assert_close(y, layer.eval()(x))
    assert torch.equal(layer.running_whitening, before)


def test_state_dict_round_trip():
    layer = normlab.DecorrelatedBatchNorm(10, group_size=4, method="newton", iterations=7)
    for s in range(2):
        layer(inputs((16, 10, 3, 3), seed=s, dtype=torch.float32)[0].detach())
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "running_whitening", "num_batches_tracked"}
    assert state["running_whitening"].shape == (3, 4, 4)
    other = normlab.DecorrelatedBatchNorm(10, group_size=4, method="newton", iterations=7)
    other.load_state_dict(state)
    x = inputs((4, 10, 3, 3), seed=5, dtype=torch.float32)[0].detach()
    torch.testing.assert_close(other.eval()(x), layer.eval()(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        normlab.DecorrelatedBatchNorm(10, group_size=5).load_state_dict(state)


def test_loads_a_batchnorm_checkpoint():
    bn = nn.BatchNorm2d(6)
    bn.train()
    for s in range(2):
        bn(torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(s)) * 2 + 1)
    layer = normlab.DecorrelatedBatchNorm(6, group_size=4)
    layer.load_state_dict(bn.state_dict())
    x = torch.randn(5, 6, 3, 3)
    torch.testing.assert_close(layer.eval()(x), bn.eval()(x), rtol=1e-5, atol=1e-5)


def test_half_precision_keeps_float32_statistics():
    layer = normlab.DecorrelatedBatchNorm(8, group_size=4).to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    assert layer.running_whitening.dtype == torch.float32 and layer.running_mean.dtype == torch.float32
    x = torch.randn(16, 8, 2, 2).to(torch.bfloat16).requires_grad_(True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(y.float()).all() and torch.isfinite(layer.running_whitening).all()
    ref = normlab.DecorrelatedBatchNorm(8, group_size=4)(x.detach().float())
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------ tools and registry
def test_convert_from_batchnorm_keeps_eval_output():
    model = nn.Sequential(
        nn.Conv2d(3, 10, 3), nn.BatchNorm2d(10), nn.ReLU(), nn.Flatten(), nn.Linear(160, 6), nn.BatchNorm1d(6)
    )
    model.train()
    for s in range(3):
        model(torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(s)))
    model.eval()
    x = torch.randn(4, 3, 6, 6)
    want = model(x)
    dbn = normlab.convert(model, "dbn", group_size=4, method="newton", iterations=3)
    layers = [m for m in dbn.modules() if isinstance(m, normlab.DecorrelatedBatchNorm)]
    assert len(layers) == 2
    assert all(m.group_size == 4 and m.method == "newton" and m.iterations == 3 for m in layers)
    assert layers[0].running_whitening.shape == (3, 4, 4)
    torch.testing.assert_close(layers[0].weight, model[1].weight)
    torch.testing.assert_close(dbn(x), want, rtol=1e-5, atol=1e-5)
    back = normlab.convert(dbn, "bn")
    assert isinstance(back[1], nn.BatchNorm2d)
    torch.testing.assert_close(back[1].running_var, model[1].running_var)


def test_kind_registered():
    assert "dbn" in normlab.kinds()


@pytest.mark.parametrize("method", METHODS)
def test_statistics_interface(method):
    c, group_size = 7, 3
    layer = normlab.DecorrelatedBatchNorm(c, group_size=group_size, method=method, iterations=20, dtype=D64)
    x = inputs((40, c, 2), seed=11)[0].detach()
    mom = normlab.batch_moments(layer, x)
    assert mom.count == 80 and mom.mean.shape == (c,) and mom.var.shape == (3, 3, 3)
    X = x.transpose(0, 1).reshape(c, -1)
    Xc = X - X.mean(1, keepdim=True)
    full = Xc @ Xc.T / 80
    torch.testing.assert_close(mom.mean, X.mean(1))
    torch.testing.assert_close(mom.var[0], full[:3, :3])
    torch.testing.assert_close(mom.var[2, :1, :1], full[6:, 6:])
    assert torch.count_nonzero(mom.var[2, 1:]) == 0

    unbiased = mom.var * 80 / 79
    normlab.load_statistics(layer, mom.mean, unbiased)
    torch.testing.assert_close(layer.running_var, torch.diagonal(full) * 80 / 79)
    blocks = []
    for k, r in enumerate((3, 3, 1)):
        sigma = unbiased[k, :r, :r] + layer.eps * torch.eye(r, dtype=D64)
        Wk = ref_whitening(sigma, method, 20)
        if method != "pca":
            torch.testing.assert_close(layer.running_whitening[k, :r, :r], Wk)
        blocks.append(layer.running_whitening[k, :r, :r])
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2)
        layer.bias.normal_()
    A, b = normlab.inference_affine(layer)
    assert A.shape == (c, c) and b.shape == (c,)
    torch.testing.assert_close(A, torch.diag(layer.weight) @ torch.block_diag(*blocks))
    layer.eval()
    y = layer(x)
    torch.testing.assert_close(y, torch.einsum("dc,nc...->nd...", A, x) + b.view(1, c, 1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("spatial", [(), (2, 2), (5, 4)])  # each layout of the step
def test_nonfinite_value_spoils_its_group_only(bad, spatial):
    # eigh cannot take such a covariance: the group gets NaN eigenvalues and a NaN output, as its
    # channels would under BatchNorm; the other groups are whitened as on their own.
    x = torch.randn(16, 8, *spatial)
    x[3, 5].fill_(bad)
    layer = normlab.DecorrelatedBatchNorm(8, group_size=4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="DecorrelatedBatchNorm: a training batch gave non-finite"):
        y = layer(x)
    assert not torch.isfinite(y[:, 4:]).any()
    alone = normlab.DecorrelatedBatchNorm(4, group_size=4)(x[:, :4])
    torch.testing.assert_close(y[:, :4], alone)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_statistics_validates_before_touching_state():
    layer = normlab.DecorrelatedBatchNorm(6, group_size=4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="DecorrelatedBatchNorm.*covariance of shape \\(2, 4, 4\\)"):
        layer.load_statistics(torch.zeros(6), torch.eye(6))
    with pytest.raises(ValueError, match="DecorrelatedBatchNorm.*mean of shape"):
        layer.load_statistics(torch.zeros(5), torch.eye(4).repeat(2, 1, 1))
    bad = torch.eye(4).repeat(2, 1, 1)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="DecorrelatedBatchNorm.*finite"):
        layer.load_statistics(torch.zeros(6), bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------ bad input
def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="DecorrelatedBatchNorm.*method"):
        normlab.DecorrelatedBatchNorm(4, method="cholesky")
    with pytest.raises(ValueError, match="DecorrelatedBatchNorm.*group_size"):
        normlab.DecorrelatedBatchNorm(4, group_size=0)
    with pytest.raises(ValueError, match="DecorrelatedBatchNorm.*iterations"):
        normlab.DecorrelatedBatchNorm(4, method="newton", iterations=0)
    with pytest.raises(ValueError, match="DecorrelatedBatchNorm.*eps > 0"):
        normlab.DecorrelatedBatchNorm(4, eps=0.0)
    layer = normlab.DecorrelatedBatchNorm(4, group_size=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="DecorrelatedBatchNorm.*4 channels"):
        layer(torch.randn(8, 5))
    with pytest.raises(ValueError, match="DecorrelatedBatchNorm.*more than 1 value"):
        layer(torch.randn(1, 4))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "group_size=2" in repr(layer) and "method='zca'" in repr(layer)


# ------------------------------------------------------------------------------------ properties
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(1, 9),
    spatial=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    group_size=st.integers(1, 10),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_and_finiteness(n, c, spatial, group_size, method, seed):
    shape = (n, c, *spatial)
    if math.prod(shape) // c <= 1:
        n = 2
        shape = (n, c, *spatial)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D64).requires_grad_(True)
    layer = normlab.DecorrelatedBatchNorm(c, group_size=group_size, method=method, affine=False, dtype=D64)
    y = layer(x)
    assert y.shape == x.shape
    y.backward(torch.ones_like(y))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    # Each output channel is centred over the batch (the whitening is linear in the centred input).
    torch.testing.assert_close(y.transpose(0, 1).reshape(c, -1).mean(1), torch.zeros(c, dtype=D64), rtol=0, atol=1e-9)
    # The output is invariant to a shift of the input, so the gradient sums to zero per channel.
    scale = 1e-9 * (1 + float(x.grad.abs().max()))
    torch.testing.assert_close(
        x.grad.transpose(0, 1).reshape(c, -1).sum(1), torch.zeros(c, dtype=D64), rtol=0, atol=scale
    )
    assert layer.eval()(x).shape == x.shape


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 6),
    c=st.integers(2, 7),
    spatial=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    group_size=st.integers(2, 5),
    method=st.sampled_from(["zca", "newton"]),
)
def test_property_fused_step_matches_autograd_of_the_composed_step(n, c, spatial, group_size, method):
    """Maps on both sides of the group-major threshold (16 values), padded last groups: the fused step's
    outputs and gradients against autograd through the step composed of differentiable ops."""
    from normlab.decorrelated import _batch_step, group_layout

    shape = (n, c, *spatial)
    x, w, b = inputs(shape, seed=n * 100 + c * 10 + group_size)
    G, g = group_layout(c, group_size)
    fused = _batch_step(x, w, b, G, g, 1e-2, method, 5, None)
    composed = _batch_step(x, w, b, G, g, 1e-2, method, 5, None, composed=True)
    for a, e in zip(fused[:4], composed[:4]):
        torch.testing.assert_close(a, e)
    gy = torch.randn(shape, dtype=D64, generator=torch.Generator().manual_seed(c))
    for a, e in zip(torch.autograd.grad(fused[0], (x, w, b), gy), torch.autograd.grad(composed[0], (x, w, b), gy)):
        torch.testing.assert_close(a, e)


def test_matches_f_batch_norm_for_single_channels_in_float32():
    x = torch.randn(64, 5, 4, 4)
    y = normlab.DecorrelatedBatchNorm(5, group_size=1)(x)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True, eps=1e-5), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ forms and signatures
@pytest.mark.parametrize("shape", [(24, 6), (8, 6, 3, 3)])
def test_functional_core_has_batch_norm_shape(shape):
    """decorrelated_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, ...)
    does what the layer does: training updates the given buffers in place, eval uses them."""
    x, w, b = inputs(shape, seed=21)
    layer = normlab.DecorrelatedBatchNorm(6, group_size=4, momentum=0.3, dtype=D64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    buffers = [layer.running_mean.clone(), layer.running_var.clone(), layer.running_whitening.clone()]
    kw = {"running_whitening": buffers[2], "group_size": 4}
    for _ in range(2):
        y = decorrelated_batch_norm(x, buffers[0], buffers[1], w, b, True, 0.3, 1e-5, **kw)
        torch.testing.assert_close(y, layer(x))
    for got, name in zip(buffers, ("running_mean", "running_var", "running_whitening")):
        torch.testing.assert_close(got, getattr(layer, name))
    y = decorrelated_batch_norm(x, buffers[0], None, w, b, False, eps=1e-5, **kw)
    torch.testing.assert_close(y, layer.eval()(x))
    with pytest.raises(ValueError, match="decorrelated_batch_norm.*running_whitening"):
        decorrelated_batch_norm(x, None, None, w, b, False)


def test_deprecated_forms_warn_and_agree():
    x, w, b = inputs((20, 6), seed=22)
    with pytest.warns(DeprecationWarning, match="keyword-only"):
        old = normlab.DecorrelatedBatchNorm(6, 4, "newton", dtype=D64)
    assert (old.group_size, old.method) == (4, "newton")
    with pytest.warns(DeprecationWarning, match="decorrelated_batch_norm"):
        y, mean, cov, W, m = decorrelated_batch_norm(x, w, b, 4, "zca", 1e-3)
    want = dbn_step(x, w, b, 4, "zca", 1e-3)
    for a, e in zip((y, mean, cov, W), want):
        torch.testing.assert_close(a, e)
    assert isinstance(m, torch.Tensor) and float(m) == float(want[4]) == 20  # as the earlier form returned it
    torch.testing.assert_close(y, ref_dbn(x, w, b, 4, "zca", 1e-3)[0])


@pytest.mark.parametrize("shape", [(16, 6), (16, 8), (4, 8, 3, 3), (4, 6, 3, 3), (4, 8, 5, 5), (4, 6, 5, 5)])
def test_training_output_is_not_a_view(shape):
    """The block pattern of torchvision's ResNet modifies the output in place (ReLU(inplace=True), +=)."""
    x = torch.randn(shape, dtype=D64, requires_grad=True)
    layer = normlab.DecorrelatedBatchNorm(shape[1], group_size=4, dtype=D64)
    y = layer(x)
    assert y._base is None
    z = layer(x)
    z += 1  # the residual add, then the in-place ReLU
    z.relu_()
    (gz,) = torch.autograd.grad(z.sum(), x)
    (go,) = torch.autograd.grad((y + 1).relu().sum(), x)
    torch.testing.assert_close(gz, go)


@pytest.mark.parametrize("spatial", [(3, 3), (5, 4)])
def test_torch_compile_channels_last_input(spatial):
    """A channels_last input's grouped view is strided: the step's buffers must still have the layouts
    its shape function declares (group-major and per-sample), or the compiled graph is wrong about them."""
    eager = normlab.DecorrelatedBatchNorm(8, group_size=4)
    compiled_matches_eager(
        eager, (4, 8, *spatial), ("running_whitening", "running_mean"), memory_format=torch.channels_last
    )


@pytest.mark.parametrize("method,spatial", [("zca", (3, 3)), ("newton", (3, 3)), ("zca", (5, 4))])
def test_torch_compile_fullgraph_matches_eager(method, spatial):
    """The training step is a custom op under compile (its shape function: _step_fake, for the group-major
    and the per-sample layout); eval is plain ops."""
    eager = normlab.DecorrelatedBatchNorm(6, group_size=4, method=method)  # a padded group of 2
    compiled_layer = compiled_matches_eager(eager, (4, 6, *spatial), ("running_whitening", "running_mean"))
    compiled = torch.compile(compiled_layer, fullgraph=True)
    eager.eval()
    compiled_layer.eval()
    x = torch.randn(5, 6, 3, 3)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
