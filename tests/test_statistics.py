"""Population statistics (Ioffe & Szegedy 2015, Algorithm 2; exact pooling) and freezing, against
references written from the equations: batch normalization per batch, then the mean and unbiased
(co)variance of all samples or the Algorithm 2 average of batch statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normlab
from _shared import make_norm
from normlab.base import Moments, stat_layers
from normlab.freezing import is_frozen
from normlab.population import MomentPool

D = torch.float64
EPS = 1e-5


# ----------------------------------------------------------------------------- references
def dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def sh(x: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def data_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance per channel of all samples of ``x``, straight from the definition."""
    flat = x.transpose(0, 1).reshape(x.size(1), -1)
    mean = flat.sum(1) / flat.size(1)
    var = ((flat - mean[:, None]) ** 2).sum(1) / (flat.size(1) - 1)
    return mean, var


def data_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (C, C) of the channels of ``x``."""
    flat = x.transpose(0, 1).reshape(x.size(1), -1)
    mean = flat.mean(1)
    xc = flat - mean[:, None]
    return mean, xc @ xc.T / (flat.size(1) - 1)


def bn_train(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Batch normalization with the batch's own (biased) statistics, as in training."""
    mean = h.mean(dims(h), keepdim=True)
    var = ((h - mean) ** 2).mean(dims(h), keepdim=True)
    return (h - mean) / torch.sqrt(var + EPS) * gamma.view(sh(h)) + beta.view(sh(h))


def zca(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """``(cov + eps I)^(-1/2)`` by an eigendecomposition (the paper's ZCA whitening matrix)."""
    lam, vec = torch.linalg.eigh(cov + eps * torch.eye(cov.size(0), dtype=cov.dtype))
    return vec @ torch.diag(lam.rsqrt()) @ vec.T


def batches(sizes: list[int], shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = shape[0]
    scale = 0.5 + torch.rand(c, generator=g, dtype=D) * 2
    shift = torch.randn(c, generator=g, dtype=D) * 3
    view = (1, -1) + (1,) * (len(shape) - 1)
    return [torch.randn((n, *shape), generator=g, dtype=D) * scale.view(view) + shift.view(view) for n in sizes]


def randomize_affine(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in stat_layers(model):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=m.bias.dtype))


def conv_norm_model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    # 6 channels: DecorrelatedBatchNorm whitens a group of 4 and a padded group of 2.
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), make_norm(kind, 6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    if kind == "cbn":
        model[1].attach(model[0])
    return model.to(D)


def train_steps(model: nn.Module, n: int = 3) -> None:
    """A few training forwards so the running statistics and windows are non-trivial."""
    model.train()
    for x in batches([8] * n, (3, 5, 5), seed=99):
        model(x)


# ----------------------------------------------------------------------------- recompute: exact
def test_exact_equals_whole_dataset_two_layers() -> None:
    """Exact mode = mean and unbiased variance over all samples, for every layer, unequal batches."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), normlab.BatchRenorm(5)
    ).to(D)
    randomize_affine(model)
    train_steps(model)
    model.eval()
    data = batches([7, 5, 9, 3], (3, 6, 6))
    steps = [int(m.num_batches_tracked) for _, m in stat_layers(model)]
    momenta = [m.momentum for _, m in stat_layers(model)]

    normlab.recompute_statistics(model, data, mode="exact")

    conv1, bn1, conv2, brn = model[0], model[1], model[3], model[4]
    with torch.no_grad():
        h1 = [conv1(x) for x in data]
        # The training network: layer 1 normalizes each batch with that batch's statistics.
        h2 = [conv2(torch.relu(bn_train(h, bn1.weight, bn1.bias))) for h in h1]
    for layer, inputs in ((bn1, h1), (brn, h2)):
        mean, var = data_stats(torch.cat(inputs))
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-10, atol=1e-12)
    assert not model.training and not any(m.training for m in model.modules())
    assert [int(m.num_batches_tracked) for _, m in stat_layers(model)] == steps
    assert [m.momentum for _, m in stat_layers(model)] == momenta


def test_average_is_algorithm_2() -> None:
    """Average mode: E[x] = mean of batch means, Var[x] = m/(m-1) * mean of biased batch variances."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3)).to(D)
    randomize_affine(model)
    model.train()
    data = batches([10, 10, 10], (4,))
    normlab.recompute_statistics(model, data)  # mode="average" is the default
    with torch.no_grad():
        h1 = [model[0](x) for x in data]
        h2 = [model[3](torch.relu(bn_train(h, model[1].weight, model[1].bias))) for h in h1]
    m = 10
    for layer, inputs in ((model[1], h1), (model[4], h2)):
        means = torch.stack([h.mean(0) for h in inputs])
        variances = torch.stack([((h - h.mean(0)) ** 2).mean(0) for h in inputs])
        torch.testing.assert_close(layer.running_mean, means.mean(0), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, m / (m - 1) * variances.mean(0), rtol=1e-10, atol=1e-12)
    assert model.training and all(mod.training for mod in model.modules())


def test_average_with_unequal_batches_unbiases_each_batch() -> None:
    data = batches([4, 9], (3,))
    layer = nn.BatchNorm1d(3).to(D)
    normlab.recompute_statistics(layer, data, mode="average")
    unbiased = [((x - x.mean(0)) ** 2).sum(0) / (x.size(0) - 1) for x in data]
    torch.testing.assert_close(layer.running_mean, (data[0].mean(0) + data[1].mean(0)) / 2)
    torch.testing.assert_close(layer.running_var, (unbiased[0] + unbiased[1]) / 2)


def test_average_and_exact_differ_and_exact_is_not_batch_dependent() -> None:
    data = batches([6, 6, 6], (3, 4))
    whole = torch.cat(data)
    a, b, c = (nn.BatchNorm1d(3).to(D) for _ in range(3))
    normlab.recompute_statistics(a, data, mode="exact")
    normlab.recompute_statistics(b, [whole[:5], whole[5:]], mode="exact")
    normlab.recompute_statistics(c, data, mode="average")
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a.running_var, c.running_var, rtol=1e-6, atol=0)


def test_every_variant_gets_the_dataset_statistics(stat_kind: str) -> None:
    model = conv_norm_model(stat_kind)
    train_steps(model)
    layer = model[1]
    before = {k: v.clone() for k, v in layer.named_buffers() if v is not None}
    data = batches([5, 8, 4], (3, 5, 5), seed=3)
    normlab.recompute_statistics(model, data, mode="exact")
    with torch.no_grad():
        h = torch.cat([model[0](x) for x in data])
    mean, var = data_stats(h)
    torch.testing.assert_close(layer.running_mean, mean, rtol=1e-10, atol=1e-12)
    if stat_kind == "mobn":
        assert layer.running_var is None
    else:
        torch.testing.assert_close(layer.running_var, var, rtol=1e-10, atol=1e-12)
    if stat_kind == "dbn":
        _, cov = data_cov(h)
        w = layer.running_whitening
        torch.testing.assert_close(w[0], zca(cov[:4, :4], layer.eps), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(w[1, :2, :2], zca(cov[4:, 4:], layer.eps), rtol=1e-8, atol=1e-10)
    # Everything else (step counters, CBN's window) is as it was before the pass.
    for k, v in layer.named_buffers():
        if v is not None and k not in ("running_mean", "running_var", "running_whitening"):
            assert torch.equal(v, before[k]), k


def test_dbn_exact_pooling_of_covariances() -> None:
    """Pooling per-group covariances exactly gives the covariance of all samples (zero padding kept)."""
    layer = normlab.DecorrelatedBatchNorm(6, group_size=4).to(D)
    data = batches([3, 7, 5], (6, 2))
    pool = MomentPool("exact")
    for x in data:
        pool.add(layer.moments(x))
    mean, cov = pool.result()
    ref_mean, ref_cov = data_cov(torch.cat(data))
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(cov[0], ref_cov[:4, :4])
    torch.testing.assert_close(cov[1, :2, :2], ref_cov[4:, 4:])
    assert torch.count_nonzero(cov[1, 2:]) == 0 and torch.count_nonzero(cov[1, :, 2:]) == 0


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(2, 9), min_size=1, max_size=5),
    channels=st.integers(1, 4),
    constant=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_pool_matches_definitions(sizes: list[int], channels: int, constant: bool, seed: int) -> None:
    data = batches(sizes, (channels,), seed=seed)
    if constant:  # degenerate: a constant channel has zero variance, in every mode
        data = [x.index_fill(1, torch.tensor([0]), 2.5) for x in data]
    exact, average = MomentPool("exact"), MomentPool("average")
    for x in data:
        var, mean = torch.var_mean(x, 0, correction=0)
        exact.add(Moments(x.size(0), mean, var))
        average.add(Moments(x.size(0), mean, var))
    mean, var = data_stats(torch.cat(data))
    got_mean, got_var = exact.result()
    torch.testing.assert_close(got_mean, mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_var, var, rtol=1e-10, atol=1e-10)
    a_mean, a_var = average.result()
    torch.testing.assert_close(a_mean, torch.stack([x.mean(0) for x in data]).mean(0))
    torch.testing.assert_close(a_var, torch.stack([x.var(0) for x in data]).mean(0))
    if constant:
        assert got_var[0] == 0 and a_var[0] == 0


def test_pool_rejects_bad_batches() -> None:
    pool = MomentPool("exact")
    with pytest.raises(ValueError, match="more than 1 sample"):
        pool.add(Moments(1, torch.zeros(3), torch.zeros(3)))
    pool.add(Moments(4, torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError, match="shapes of the first"):
        pool.add(Moments(4, torch.zeros(2), torch.ones(2)))
    with pytest.raises(ValueError, match="mode"):
        MomentPool("median")
    with pytest.raises(ValueError, match="no batch"):
        MomentPool().result()


# ----------------------------------------------------------------------------- recompute: mechanics
def test_batch_formats_and_forward() -> None:
    data = batches([6, 6], (3,))
    results = []
    for given_batches, kw in (
        (data, {}),
        ([(x, torch.zeros(len(x))) for x in data], {}),
        ([[x, "label"] for x in data], {}),
        ([{"input": x} for x in data], {}),
        ([{"image": x} for x in data], {"forward": lambda model, b: model(b["image"])}),
        ((x for x in data), {}),
    ):
        layer = nn.BatchNorm1d(3).to(D)
        normlab.recompute_statistics(layer, given_batches, **kw)
        results.append(layer.running_var.clone())
    for r in results[1:]:
        assert torch.equal(r, results[0])
    with pytest.raises(TypeError, match="expected each batch"):
        normlab.recompute_statistics(nn.BatchNorm1d(3), [3.0])
    with pytest.raises(ValueError, match="at least one batch"):
        normlab.recompute_statistics(nn.BatchNorm1d(3), [])
    with pytest.raises(ValueError, match="mode"):
        normlab.recompute_statistics(nn.BatchNorm1d(3), data, mode="ema")


def test_dropout_is_off_and_flags_restored() -> None:
    """Other modules run in eval mode during the pass (no dropout noise), and get their flags back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.BatchNorm1d(5)).to(D).train()
    model[0].eval()  # a mixed state must come back as it was
    data = batches([16, 16], (3,))
    normlab.recompute_statistics(model, data, mode="exact")
    with torch.no_grad():
        mean, var = data_stats(torch.cat([model[0](x) for x in data]))
    torch.testing.assert_close(model[2].running_var, var)
    assert [m.training for m in model] == [False, True, True] and model.training


def test_bad_batch_leaves_every_layer_unchanged() -> None:
    model = conv_norm_model("brn")
    model.append(nn.BatchNorm2d(2).to(D))
    train_steps(model)
    model.train()
    state = copy.deepcopy(model.state_dict())
    good = batches([4, 4], (3, 5, 5))
    nan = good[1].clone()
    nan[0, 0, 0, 0] = float("nan")
    for data, err in (
        ([good[0], nan], ValueError),  # non-finite statistics: detected before loading
        ([good[0], torch.randn(4, 2, 5, 5, dtype=D)], RuntimeError),  # the model itself fails mid-pass
        ([good[0], good[1][:1, :, :1, :1]], ValueError),  # one value per channel in training
    ):
        with pytest.raises(err):
            normlab.recompute_statistics(model, data, mode="exact")
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert all(m.training for m in model.modules())
    # No hook is left behind.
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_no_gradients_and_warning_without_layers() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(D)
    normlab.recompute_statistics(model, batches([5], (3,)))
    assert all(p.grad is None for p in model.parameters())
    with pytest.warns(UserWarning, match="no normalization layer"):
        normlab.recompute_statistics(nn.Linear(2, 2), [torch.randn(3, 2)])


def test_unused_layer_is_left_unchanged_with_a_warning() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(3), nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = TwoHeads().to(D)
    with pytest.warns(UserWarning, match="unused"):
        normlab.recompute_statistics(model, batches([5, 5], (3,)))
    assert torch.equal(model.unused.running_var, torch.ones(3, dtype=D))
    assert not torch.equal(model.used.running_var, torch.ones(3, dtype=D))


def test_frozen_layers_are_recomputed_and_stay_frozen() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), normlab.BatchRenorm(4)).to(D)
    normlab.freeze(model)
    data = batches([6, 6], (3,))
    normlab.recompute_statistics(model, data, mode="exact")
    with torch.no_grad():
        mean, var = data_stats(torch.cat([model[0](x) for x in data]))
    torch.testing.assert_close(model[1].running_var, var)
    assert is_frozen(model[1]) and is_frozen(model[2])


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    normlab.recompute_statistics(nn.BatchNorm1d(3), [torch.randn(4, 3) for _ in range(3)], progress=True)
    assert "recompute_statistics" in capsys.readouterr().err


def test_float32_model_and_device_argument() -> None:
    layer = nn.BatchNorm2d(3)
    data = [x.float() for x in batches([4, 6], (3, 4, 4))]
    normlab.recompute_statistics(layer, data, mode="exact", device="cpu")
    mean, var = data_stats(torch.cat(data).double())
    assert layer.running_var.dtype == torch.float32
    torch.testing.assert_close(layer.running_var, var.float(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- freeze
def test_freeze_uses_running_stats_in_training_and_keeps_gradients(stat_kind: str) -> None:
    model = conv_norm_model(stat_kind)
    train_steps(model)
    randomize_affine(model)
    layer = model[1]
    x = batches([4], (3, 5, 5), seed=5)[0]
    model.eval()
    x1 = x.clone().requires_grad_(True)
    ref = model(x1)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    ref_x_grad = x1.grad.clone()
    model.zero_grad()

    normlab.freeze(model)
    normlab.freeze(model)  # idempotent
    model.train()
    buffers = {k: v.clone() for k, v in layer.named_buffers() if v is not None}
    x2 = x.clone().requires_grad_(True)
    out = model(x2)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n])
    torch.testing.assert_close(x2.grad, ref_x_grad)
    for k, v in layer.named_buffers():
        if v is not None:
            assert torch.equal(v, buffers[k]), k
    assert layer.training and is_frozen(layer)
    if not isinstance(layer, normlab.base.ToolState):  # torch's own layers are frozen by hooks
        assert len(layer._forward_pre_hooks) == 1 and len(layer._forward_hooks) == 1

    normlab.unfreeze(model)
    assert not is_frozen(layer) and not layer._forward_pre_hooks
    out = model(x)
    if stat_kind != "brn":  # (Batch Renorm's training output equals its eval output while r, d are not clipped)
        assert not torch.allclose(out, ref)  # batch statistics again
    assert any(not torch.equal(v, buffers[k]) for k, v in layer.named_buffers() if v is not None)


def test_freeze_survives_deepcopy_and_errors() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(D)
    normlab.freeze(model)
    clone = copy.deepcopy(model).train()
    stats = clone[1].running_var.clone()
    clone(torch.randn(5, 3, dtype=D))
    assert torch.equal(clone[1].running_var, stats)
    with pytest.raises(RuntimeError):  # the forward fails inside the layer...
        clone[1](torch.randn(5, 7, dtype=D))
    assert clone[1].training  # ...and the layer is in training mode again all the same
    normlab.unfreeze(clone)
    assert not clone[1]._forward_pre_hooks and not clone[1]._forward_hooks and not hasattr(clone[1], "frozen")
    clone(torch.randn(5, 3, dtype=D))
    assert not torch.equal(clone[1].running_var, stats)
    assert is_frozen(model[1])  # the original is untouched


def test_freeze_skips_layers_without_running_stats() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3))
    normlab.freeze(model)
    assert not hasattr(model[0], "frozen") and is_frozen(model[1])
    with pytest.warns(UserWarning):
        normlab.freeze(nn.Linear(2, 2))
