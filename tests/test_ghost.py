"""GhostBatchNorm against a reference written from Hoffer et al. (2017): torch's BatchNorm run on
each contiguous ghost batch in turn, with the same running statistics (as the authors' code does)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import normlab
from normlab import kernels
from normlab.ghost import ghost_batch_norm, micro_batch_step

D = torch.float64


def _factor(bn):
    bn.num_batches_tracked += 1
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, None])
# Stacked ghost batches (equal sizes, a small spatial extent: one kernel call) and the step per ghost
# batch (a remainder, or a larger extent), 2-D to 4-D.
@pytest.mark.parametrize(
    "shape,v",
    [((10, 6), 4), ((12, 6), 4), ((8, 6, 3, 3), 4), ((8, 6, 9, 9), 4), ((9, 6, 2), 4), ((5, 6, 2, 2), 8)],
)
def test_matches_batch_norm_per_ghost_batch(shape, v, momentum):
    torch.manual_seed(0)
    layer = normlab.GhostBatchNorm(6, momentum=momentum, virtual_batch_size=v, dtype=D)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    for step in range(2):
        x = (torch.randn(shape, dtype=D) * (1 + step) + step).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y = layer(x)
        bn = nn.BatchNorm1d(6, momentum=momentum, dtype=D)
        bn.num_batches_tracked.copy_(layer.num_batches_tracked - len(range(0, shape[0], v)))
        y_ref = torch.cat([nn.functional.batch_norm(c, rm, rv, w, b, True, _factor(bn), 1e-5) for c in xr.split(v)])
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
        want = torch.autograd.grad(y_ref, (xr, w, b), g)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)
        torch.testing.assert_close(layer.running_mean, rm)
        torch.testing.assert_close(layer.running_var, rv)
        assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked)
    x = torch.randn(shape, dtype=D)
    torch.testing.assert_close(layer.eval()(x), nn.functional.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5))


@pytest.mark.parametrize("v", [None, 8, 100])
def test_one_ghost_batch_is_batch_norm(v):
    torch.manual_seed(1)
    layer = normlab.GhostBatchNorm(4, virtual_batch_size=v, dtype=D)
    bn = nn.BatchNorm2d(4, dtype=D)
    for _ in range(2):
        x = torch.randn(8, 4, 3, 3, dtype=D)
        torch.testing.assert_close(layer(x), bn(x))
    for k, value in bn.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], value)


def test_a_ghost_batch_of_one_value_is_refused_before_state_moves():
    layer = normlab.GhostBatchNorm(3, virtual_batch_size=4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="GhostBatchNorm: expected more than 1 value per channel"):
        layer(torch.randn(9, 3))  # the last ghost batch holds one sample
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    layer(torch.randn(9, 3, 2))  # one sample with two values is a ghost batch BatchNorm accepts
    with pytest.raises(ValueError, match="virtual_batch_size"):
        normlab.GhostBatchNorm(3, virtual_batch_size=0)


# A remainder (7 = 3 + 3 + 1: the step per ghost batch), and stacked ghost batches (6 = 3 + 3), 2-D to 4-D.
@pytest.mark.parametrize(
    "shape,stacked", [((7, 3, 2), False), ((6, 3), True), ((6, 3, 2), True), ((6, 3, 2, 2), True)]
)
def test_gradcheck_and_gradgradcheck(shape, stacked):
    torch.manual_seed(2)
    x = torch.randn(shape, dtype=D, requires_grad=True)
    assert kernels.stacked_micro_batches(x, kernels.micro_batch_sizes(shape[0], 3)) == stacked
    w = (torch.rand(3, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=D, requires_grad=True)

    def fn(x, w, b):
        return ghost_batch_norm(x, None, None, w, b, True, None, virtual_batch_size=3)

    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("shape", [(16, 5), (16, 5, 3), (16, 5, 4, 4)])
def test_stacked_and_per_ghost_batch_paths_agree(monkeypatch, shape):
    torch.manual_seed(5)
    x = (torch.randn(shape) * 3 + 2).requires_grad_()
    w, b = torch.rand(5, requires_grad=True), torch.randn(5, requires_grad=True)
    assert kernels.stacked_micro_batches(x, kernels.micro_batch_sizes(16, 4))
    out = micro_batch_step(x, 4, w, b, 1e-5)
    g = torch.randn(shape)
    grads = torch.autograd.grad(out[0], (x, w, b), g)
    monkeypatch.setattr(kernels, "_STACKED_EXTENT", 0)
    monkeypatch.setattr(kernels, "_STACKED_EXTENT_UNSWEPT", 0)
    assert not kernels.stacked_micro_batches(x, kernels.micro_batch_sizes(16, 4))
    ref = micro_batch_step(x, 4, w, b, 1e-5)
    for a, e in zip(out, ref):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    for a, e in zip(grads, torch.autograd.grad(ref[0], (x, w, b), g)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert out[0]._base is None and out[0].is_contiguous()  # a fresh output: in-place ops may follow


def test_functional_core_matches_the_layer():
    torch.manual_seed(3)
    layer = normlab.GhostBatchNorm(5, virtual_batch_size=3, dtype=D)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(8, 5, 2, dtype=D)
    y = ghost_batch_norm(x, rm, rv, layer.weight, layer.bias, True, 0.1, virtual_batch_size=3)
    torch.testing.assert_close(y, layer(x))
    torch.testing.assert_close((rm, rv), (layer.running_mean, layer.running_var))
    torch.testing.assert_close(ghost_batch_norm(x, rm, rv, layer.weight, layer.bias), layer.eval()(x))


def test_convert_and_back_keep_the_learned_state():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    model(torch.randn(16, 3, 6, 6))
    ghost = normlab.convert(model, "ghost", virtual_batch_size=4)
    assert isinstance(ghost[1], normlab.GhostBatchNorm) and ghost[1].virtual_batch_size == 4
    torch.testing.assert_close(ghost[1].running_var, model[1].running_var)
    back = normlab.convert(ghost, "bn")
    assert type(back[1]) is nn.BatchNorm2d


@pytest.mark.parametrize("shape,sizes", [((12, 6), [4, 4, 4]), ((5, 8, 3, 3), [2, 2, 1])])
def test_step_passes_torch_opcheck(shape, sizes):
    from normlab.ghost import _STEP

    torch.manual_seed(5)
    x = torch.randn(shape, requires_grad=True)
    w, b = torch.rand(shape[1], requires_grad=True) + 0.5, torch.randn(shape[1], requires_grad=True)
    torch.library.opcheck(_STEP._op, (x, w, b, sizes, 1e-5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_parameter_only_gradients(dtype):
    torch.manual_seed(6)
    layer = normlab.GhostBatchNorm(4, virtual_batch_size=3)
    x = torch.randn(8, 4, 3, 3).to(dtype)
    y = layer(x)
    ref = torch.cat(
        [nn.functional.batch_norm(c.float(), None, None, layer.weight, layer.bias, True) for c in x.split(3)]
    )
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)
    assert y.dtype == dtype
    (gw,) = torch.autograd.grad(y.float().square().sum(), layer.weight)  # no input gradient asked for
    (gw_ref,) = torch.autograd.grad(ref.square().sum(), layer.weight)
    torch.testing.assert_close(gw, gw_ref, atol=0.5, rtol=2e-2)


def test_parameter_only_gradients():
    torch.manual_seed(7)
    layer = normlab.GhostBatchNorm(4, virtual_batch_size=3, dtype=D)
    x = torch.randn(8, 4, 3, 3, dtype=D)  # no input gradient asked for
    ref = torch.cat([nn.functional.batch_norm(c, None, None, layer.weight, layer.bias, True) for c in x.split(3)])
    got = torch.autograd.grad(layer(x).square().sum(), (layer.weight, layer.bias))
    for a, e in zip(got, torch.autograd.grad(ref.square().sum(), (layer.weight, layer.bias))):
        torch.testing.assert_close(a, e)
