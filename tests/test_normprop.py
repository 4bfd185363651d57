"""Normalization Propagation against references written from Arpit et al. (ICML 2016)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad
from torch import nn

import normlab
from normlab import NormPropConv2d, NormPropLinear, NormPropReLU, Standardize, dataset_statistics
from normlab.normprop import PAPER_FACTOR, RELU_MEAN, RELU_STD

F64 = torch.float64


def gaussian_moment(fn, k: int = 1) -> float:  # noqa: ANN001
    """E[fn(z)^k] for z ~ N(0, 1) by numerical integration."""

    def integrand(z: float) -> float:
        return fn(z) ** k * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    return quad(integrand, -math.inf, 0)[0] + quad(integrand, 0, math.inf)[0]


def relu(z: float) -> float:
    return max(z, 0.0)


def test_relu_constants_are_the_moments_of_relu_of_a_standard_normal() -> None:
    assert RELU_MEAN == pytest.approx(gaussian_moment(relu), rel=1e-10)
    var = gaussian_moment(relu, 2) - gaussian_moment(relu) ** 2
    assert RELU_STD == pytest.approx(math.sqrt(var), rel=1e-10)
    assert PAPER_FACTOR == 1.21


def test_normprop_relu_formula() -> None:
    u = torch.linspace(-3, 3, 101, dtype=F64)
    expected = (torch.clamp(u, min=0) - math.sqrt(1 / (2 * math.pi))) / math.sqrt(0.5 * (1 - 1 / math.pi))
    torch.testing.assert_close(NormPropReLU()(u), expected, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(NormPropReLU(), (torch.randn(7, dtype=F64, requires_grad=True),))


def reference_linear(x: torch.Tensor, w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, c: float):
    """u_i = gamma_i (W_i . x) / (c ||W_i||) + beta_i, unit by unit."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)
    for i in range(w.shape[0]):
        out[:, i] = gamma[i] * (x @ w[i]) / (c * math.sqrt(float(w[i] @ w[i]))) + beta[i]
    return out


def reference_conv(x: torch.Tensor, w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, c: float, **kw):
    """The same per output channel, with the filter's norm over C_in * kh * kw, via explicit patches."""
    n, _, h, wd = x.shape
    k = w.shape[-1]
    patches = F.unfold(x, k, padding=kw.get("padding", 0), stride=kw.get("stride", 1))  # (N, C*k*k, L)
    oh = (h + 2 * kw.get("padding", 0) - k) // kw.get("stride", 1) + 1
    ow = (wd + 2 * kw.get("padding", 0) - k) // kw.get("stride", 1) + 1
    out = torch.empty(n, w.shape[0], patches.shape[-1], dtype=x.dtype)
    for i in range(w.shape[0]):
        wi = w[i].reshape(-1)
        out[:, i] = gamma[i] * torch.einsum("k,nkl->nl", wi, patches) / (c * math.sqrt(float(wi @ wi))) + beta[i]
    return out.reshape(n, w.shape[0], oh, ow)


def randomize(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2.0)
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("factor", [1.0, PAPER_FACTOR])
def test_linear_matches_formula_and_plain_layer(factor: float) -> None:
    torch.manual_seed(0)
    layer = randomize(NormPropLinear(6, 4, factor=factor, dtype=F64))
    x = torch.randn(5, 6, dtype=F64)
    expected = reference_linear(x, layer.weight.detach(), layer.gain.detach(), layer.bias.detach(), factor)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    plain = layer.as_plain()
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain(x), expected, rtol=1e-12, atol=1e-12)
    # Extra leading dimensions, as nn.Linear.
    torch.testing.assert_close(layer(x.view(5, 1, 6)).squeeze(1), expected)


@pytest.mark.parametrize("kw", [{}, {"padding": 1}, {"stride": 2, "padding": 1}])
def test_conv_matches_formula_and_plain_layer(kw: dict) -> None:
    torch.manual_seed(1)
    layer = randomize(NormPropConv2d(3, 4, 3, factor=PAPER_FACTOR, dtype=F64, **kw))
    x = torch.randn(2, 3, 6, 7, dtype=F64)
    expected = reference_conv(x, layer.weight.detach(), layer.gain.detach(), layer.bias.detach(), PAPER_FACTOR, **kw)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    plain = layer.as_plain()
    assert type(plain) is nn.Conv2d
    torch.testing.assert_close(plain(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x[0]), expected[0])  # unbatched input


def test_grouped_conv_norm_is_per_output_channel() -> None:
    torch.manual_seed(2)
    layer = NormPropConv2d(4, 6, 2, groups=2, bias=False, dtype=F64)
    w = layer.effective_weight()
    torch.testing.assert_close(w.reshape(6, -1).norm(dim=1), torch.ones(6, dtype=F64))
    x = torch.randn(1, 4, 3, 3, dtype=F64)
    torch.testing.assert_close(layer(x), F.conv2d(x, w, groups=2))
    torch.testing.assert_close(layer.as_plain()(x), layer(x))


def test_gradcheck() -> None:
    torch.manual_seed(3)
    lin = randomize(NormPropLinear(4, 3, factor=PAPER_FACTOR, dtype=F64))
    conv = randomize(NormPropConv2d(2, 3, 2, dtype=F64))
    for layer, x in ((lin, torch.randn(3, 4, dtype=F64)), (conv, torch.randn(2, 2, 3, 3, dtype=F64))):
        params = (layer.weight, layer.gain, layer.bias)

        def fn(x, w, g, b, layer=layer):  # noqa: ANN001, ANN202
            return torch.func.functional_call(layer, {"weight": w, "gain": g, "bias": b}, (x,))

        inputs = (x.requires_grad_(True), *(p.detach().clone().requires_grad_(True) for p in params))
        assert torch.autograd.gradcheck(fn, inputs)


def first_layer_tolerance(n: int) -> tuple[float, float]:
    """Five standard errors of a sample mean and a sample variance of n draws of NormPropReLU(N(0, 1))."""
    mu4 = gaussian_moment(lambda z: (relu(z) - RELU_MEAN) / RELU_STD, 4)  # 5.41: ReLU outputs are heavy-tailed
    return 5 / math.sqrt(n), 5 * math.sqrt((mu4 - 1) / n)


def stack(kind: str) -> tuple[list[nn.Module], torch.Tensor]:
    torch.manual_seed(4)
    if kind == "linear":
        layers: list[nn.Module] = [NormPropLinear(256, 256) for _ in range(10)]
        return layers, torch.randn(4096, 256)
    if kind == "conv":  # 'valid' convolutions: every output sums a full C_in * 3 * 3 window
        layers = [NormPropConv2d(32, 32, 3) for _ in range(10)]
        return layers, torch.randn(32, 32, 28, 28)
    layers = [NormPropConv2d(16, 16, 3) for _ in range(5)] + [nn.Flatten()]
    layers += [NormPropLinear(16 * 6 * 6, 256)] + [NormPropLinear(256, 256) for _ in range(4)]
    return layers, torch.randn(2048, 16, 16, 16)


@pytest.mark.parametrize("kind", ["linear", "conv", "mixed"])
def test_stack_of_ten_layers_propagates_zero_mean_unit_variance(kind: str) -> None:
    """Standard normal data through 10 NormProp layers (each followed by NormPropReLU), random weights.

    Theory (section 3 of the paper): at the first layer the input is exactly N(0, I), so each
    u_i ~ N(0, 1) and the ReLU output has exactly mean 0 and variance 1: only the sampling error is
    left (5 standard errors; ReLU outputs have fourth moment 5.41). Deeper, the layer input is
    white only approximately: units share inputs through non-orthogonal rows of W, whose cosines
    are O(1/sqrt(fan_in)) (the coherence term of the paper's Theorem 1), so each unit's variance is
    off by O(1/sqrt(fan_in)) per layer and the error accumulates with depth, while the average over
    units stays at 1 to first order. For fan-in >= 256 that is ~0.035 per layer: the tolerances
    grow linearly with the layer index l (RMS of per-unit means <= 0.03 + 0.015 l, RMS of per-unit
    variance errors <= 0.05 + 0.035 l, unit-averaged variance within 1 +- (0.05 + 0.03 l)).
    """
    layers, x = stack(kind)
    act = NormPropReLU()
    with torch.no_grad():
        for depth, layer in enumerate(layers, start=1):
            if isinstance(layer, nn.Flatten):
                x = layer(x)
                continue
            x = act(layer(x))
            dims = [0, 2, 3] if x.dim() == 4 else [0]
            mean, var = x.mean(dims), x.var(dims)
            n = x.numel() // x.shape[1]
            if depth == 1:
                tol_mean, tol_var = first_layer_tolerance(n)
                assert mean.abs().max().item() < tol_mean
                assert (var - 1).abs().max().item() < tol_var
            level = depth - (1 if kind == "mixed" and depth > 5 else 0)
            assert mean.square().mean().sqrt().item() < 0.03 + 0.015 * level, (depth, mean)
            assert (var - 1).square().mean().sqrt().item() < 0.05 + 0.035 * level, (depth, var)
            assert abs(var.mean().item() - 1) < 0.05 + 0.03 * level, (depth, var.mean())


def test_paper_factor_scales_the_preactivation_variance() -> None:
    torch.manual_seed(5)
    x = torch.randn(8192, 128)
    for factor in (1.0, PAPER_FACTOR):
        u = NormPropLinear(128, 64, factor=factor)(x).detach()
        # white input: var(u_i) = 1 / c^2 exactly, up to sampling error (5 standard errors)
        assert (u.var(0) * factor**2 - 1).abs().max().item() < 5 * math.sqrt(2 / 8192)


def test_batch_size_one_and_train_eval_identical() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(
        NormPropConv2d(3, 8, 3, padding=1, dtype=F64),
        NormPropReLU(),
        NormPropConv2d(8, 8, 3, stride=2, dtype=F64),
        NormPropReLU(),
        nn.Flatten(),
        NormPropLinear(8 * 3 * 3, 5, dtype=F64),
        NormPropReLU(),
        NormPropLinear(5, 2, dtype=F64),
    )
    for m in model:
        if isinstance(m, (NormPropLinear, NormPropConv2d)):
            randomize(m)
    x = torch.randn(6, 3, 8, 8, dtype=F64)
    batch = model(x)
    for i in range(6):
        torch.testing.assert_close(model(x[i : i + 1]), batch[i : i + 1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.eval()(x), batch, rtol=0, atol=0)
    # And the deployed model, with plain layers, computes the same.
    plain = nn.Sequential(*[m.as_plain() if hasattr(m, "as_plain") else m for m in model])
    assert not any(isinstance(m, (NormPropLinear, NormPropConv2d)) for m in plain)
    torch.testing.assert_close(plain(x), batch, rtol=1e-10, atol=1e-12)


def test_zero_row_gives_bias_not_nan() -> None:
    layer = NormPropLinear(3, 2)
    with torch.no_grad():
        layer.weight[0].zero_()
        layer.bias.fill_(0.25)
    out = layer(torch.randn(4, 3))
    assert torch.isfinite(out).all() and torch.equal(out[:, 0], torch.full((4,), 0.25))


def test_bad_input_and_arguments() -> None:
    with pytest.raises(ValueError, match=r"NormPropLinear: expected input of shape \(\*, 3\)"):
        NormPropLinear(3, 2)(torch.randn(4, 5))
    with pytest.raises(ValueError, match="NormPropConv2d: expected input"):
        NormPropConv2d(3, 2, 1)(torch.randn(4, 2, 5, 5))
    with pytest.raises(ValueError, match="NormPropConv2d: expected input"):
        NormPropConv2d(3, 2, 1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="factor"):
        NormPropLinear(3, 2, factor=0.0)
    with pytest.raises(ValueError, match="groups"):
        NormPropConv2d(3, 2, 1, groups=2)
    with pytest.raises(ValueError, match="in_features"):
        NormPropLinear(0, 2)
    assert "factor=1.21" in repr(NormPropLinear(3, 2, factor=PAPER_FACTOR))


# ----------------------------------------------------------------------------------- dataset statistics
def test_dataset_statistics_matches_the_concatenated_data() -> None:
    torch.manual_seed(7)
    data = [
        torch.randn(n, 3, 4, 4, dtype=F64) * torch.tensor([1.0, 2.0, 5.0], dtype=F64).view(1, 3, 1, 1) + 7
        for n in (5, 1, 9)
    ]
    mean, std = dataset_statistics((x, torch.zeros(len(x))) for x in data)
    full = torch.cat(data).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean, full.mean(1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(std, full.std(1, correction=0), rtol=1e-13, atol=1e-13)
    feats = [torch.randn(2, 5, 6, dtype=F64) for _ in range(3)]
    mean, std = dataset_statistics(feats, dim=-1)
    full = torch.cat(feats).reshape(-1, 6)
    torch.testing.assert_close(mean, full.mean(0))
    torch.testing.assert_close(std, full.std(0, correction=0))
    # Standardize with those statistics gives exactly standardized data.
    out = Standardize(mean, std, dim=-1)(torch.cat(feats)).reshape(-1, 6)
    torch.testing.assert_close(out.mean(0), torch.zeros(6, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.std(0, correction=0), torch.ones(6, dtype=F64))


def test_dataset_statistics_errors_and_constant_features() -> None:
    with pytest.raises(ValueError, match="at least one"):
        dataset_statistics([])
    with pytest.raises(ValueError, match="expected 3 features"):
        dataset_statistics([torch.randn(2, 3), torch.randn(2, 4)])
    with pytest.raises(ValueError, match="floating-point"):
        dataset_statistics([torch.ones(2, 3, dtype=torch.long)])
    mean, std = dataset_statistics([torch.ones(4, 2)])
    assert torch.equal(std, torch.zeros(2))
    out = Standardize(mean, std)(torch.ones(3, 2))
    assert torch.equal(out, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="Standardize: expected 2 features"):
        Standardize(mean, std)(torch.ones(3, 5))


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5), offset=st.floats(-1e4, 1e4))
def test_property_statistics_do_not_depend_on_batching(sizes: list[int], offset: float) -> None:
    if sum(sizes) == 0:
        with pytest.raises(ValueError):
            dataset_statistics([torch.empty(0, 2, dtype=F64) for _ in sizes])
        return
    data = torch.randn(sum(sizes), 2, 3, dtype=F64) + offset
    mean, std = dataset_statistics(list(torch.split(data, sizes)))
    full = data.transpose(0, 1).reshape(2, -1)
    torch.testing.assert_close(mean, full.mean(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(std, full.std(1, correction=0), rtol=1e-8, atol=1e-9)


def test_exported_names() -> None:
    for name in ("NormPropLinear", "NormPropConv2d", "NormPropReLU", "Standardize", "dataset_statistics"):
        assert hasattr(normlab, name)
