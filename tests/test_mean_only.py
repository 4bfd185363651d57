"""MeanOnlyBatchNorm against references written from Salimans & Kingma (2016), section 3."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normlab
from normlab import MeanOnlyBatchNorm
from normlab.mean_only import mean_only_batch_norm

SHAPES = [(8, 3), (4, 3, 5), (2, 3, 4, 5), (2, 3, 2, 3, 2)]


def reference(x: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y = weight * (x - mean) + bias along dimension 1, written out with explicit broadcasting."""
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    return weight.view(shape) * (x - mean.view(shape)) + bias.view(shape)


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean by moving the channel first and flattening the rest."""
    return x.transpose(0, 1).reshape(x.shape[1], -1).mean(1)


def randomized(layer: MeanOnlyBatchNorm) -> MeanOnlyBatchNorm:
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("shape", SHAPES)
def test_train_forward_subtracts_batch_mean(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = randomized(MeanOnlyBatchNorm(3, dtype=torch.float64))
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    y = layer(x)
    torch.testing.assert_close(y, reference(x, channel_mean(x), layer.weight, layer.bias), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_uses_running_mean(shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    layer = randomized(MeanOnlyBatchNorm(3, dtype=torch.float64))
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x, layer.running_mean, layer.weight, layer.bias))
    assert layer.num_batches_tracked.item() == 0


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_mean_update(momentum: float | None) -> None:
    torch.manual_seed(2)
    layer = MeanOnlyBatchNorm(3, momentum=momentum, dtype=torch.float64)
    expected = torch.zeros(3, dtype=torch.float64)
    for step in range(1, 5):
        x = torch.randn(6, 3, 4, dtype=torch.float64) + step
        layer(x)
        rate = 1.0 / step if momentum is None else momentum
        expected = (1 - rate) * expected + rate * channel_mean(x)
    torch.testing.assert_close(layer.running_mean, expected)
    assert layer.num_batches_tracked.item() == 4


def test_no_running_var_and_bn_checkpoint_loads() -> None:
    torch.manual_seed(3)
    layer = MeanOnlyBatchNorm(4)
    assert layer.running_var is None
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "num_batches_tracked"}
    bn = nn.BatchNorm2d(4)
    bn.train()
    bn(torch.randn(8, 4, 3, 3) * 2 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    result = layer.load_state_dict(bn.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(layer.running_mean, bn.running_mean)
    torch.testing.assert_close(layer.weight, bn.weight)
    assert layer.num_batches_tracked.item() == 1
    # The caller's state dict is left whole.
    assert "running_var" in bn.state_dict()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_train_mode(shape: tuple[int, ...], affine: bool) -> None:
    torch.manual_seed(4)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    if affine:
        w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(True)
        b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    else:
        w = b = None

    def fn(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
        return mean_only_batch_norm(x, None, None, w, b, training=True)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    # The gradients equal those of the reference formula through autograd.
    g = torch.randn(shape, dtype=torch.float64)
    params = [p for p in (w, b) if p is not None]
    got = torch.autograd.grad(fn(x, w, b), [x, *params], g)
    ones, zeros = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    ref = reference(x, channel_mean(x), ones if w is None else w, zeros if b is None else b)
    want = torch.autograd.grad(ref, [x, *params], g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_channels_last_gradient() -> None:
    torch.manual_seed(7)
    layer = randomized(MeanOnlyBatchNorm(3, dtype=torch.float64))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    (gx,) = torch.autograd.grad(layer(x), x, g)
    xr = x.detach().contiguous().requires_grad_(True)
    (gr,) = torch.autograd.grad(reference(xr, channel_mean(xr), layer.weight.detach(), layer.bias.detach()), xr, g)
    torch.testing.assert_close(gx, gr)


def test_inference_affine_and_statistics_interface() -> None:
    torch.manual_seed(5)
    layer = randomized(MeanOnlyBatchNorm(3, dtype=torch.float64))
    x = torch.randn(5, 3, 4, dtype=torch.float64) + 1
    m = normlab.batch_moments(layer, x)
    torch.testing.assert_close(m.mean, channel_mean(x))
    assert m.count == 20
    normlab.load_statistics(layer, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.full((3,), 9.0))
    torch.testing.assert_close(layer.running_mean, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    a, b = normlab.inference_affine(layer)
    layer.eval()
    torch.testing.assert_close(layer(x), (a.view(1, 3, 1) * x + b.view(1, 3, 1)).to(x.dtype))
    with pytest.raises(ValueError, match="MeanOnlyBatchNorm"):
        layer.load_statistics(torch.zeros(4))


def test_without_running_stats_eval_uses_batch_mean() -> None:
    layer = MeanOnlyBatchNorm(3, affine=False, track_running_stats=False, dtype=torch.float64).eval()
    x = torch.randn(4, 3, 5, dtype=torch.float64) + 3
    y = layer(x)
    torch.testing.assert_close(y, x - channel_mean(x).view(1, 3, 1))
    assert not normlab.is_stat_norm(layer)


def test_frozen_uses_running_mean_without_update() -> None:
    layer = MeanOnlyBatchNorm(3, affine=False, dtype=torch.float64)
    with torch.no_grad():
        layer.running_mean.fill_(1.0)
    layer.frozen = True
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x - 1.0)
    assert layer.num_batches_tracked.item() == 0
    torch.testing.assert_close(layer.running_mean, torch.ones(3, dtype=torch.float64))


def test_bad_input_raises_before_touching_state() -> None:
    layer = MeanOnlyBatchNorm(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad in (torch.randn(4, 2, 5), torch.randn(3), torch.randn(1, 3)):
        with pytest.raises(ValueError, match="MeanOnlyBatchNorm"):
            layer(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_convert_and_registry() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model(torch.randn(4, 2, 6, 6))
    converted = normlab.convert(model, "mobn")
    assert isinstance(converted[1], MeanOnlyBatchNorm)
    torch.testing.assert_close(converted[1].running_mean, model[1].running_mean)
    assert "mobn" in normlab.kinds()
    back = normlab.convert(converted, "bn")
    assert isinstance(back[1], nn.BatchNorm2d)


def test_half_keeps_float32_running_mean() -> None:
    layer = MeanOnlyBatchNorm(3).to(torch.bfloat16)
    assert layer.running_mean.dtype == torch.float32
    x = torch.randn(8, 3, 4).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16 and layer.bias.grad.dtype == torch.bfloat16
    torch.testing.assert_close(layer.running_mean, 0.1 * channel_mean(x.float()), rtol=0, atol=1e-6)


def test_repr_and_reset() -> None:
    layer = MeanOnlyBatchNorm(3, momentum=0.2)
    layer(torch.randn(4, 3) + 5)
    layer.reset_parameters()
    assert torch.equal(layer.running_mean, torch.zeros(3)) and layer.num_batches_tracked.item() == 0
    assert "momentum=0.2" in repr(layer)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 3), max_size=3),
    offset=st.floats(-1e3, 1e3),
)
def test_property_output_is_centred(n: int, c: int, spatial: list[int], offset: float) -> None:
    shape = (n, c, *spatial)
    layer = MeanOnlyBatchNorm(c, affine=False, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64) + offset
    if x.numel() // c <= 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(x)
        return
    y = layer(x)
    assert y.shape == x.shape
    assert channel_mean(y).abs().max().item() < 1e-9 * max(1.0, abs(offset))
    torch.testing.assert_close(y, x - channel_mean(x).view([1, c] + [1] * len(spatial)))
