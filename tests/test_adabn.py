"""AdaBN (Li et al. 2016) on a synthetic domain shift, its two modes against references from the
equations, and the statistic-shift diagnostic."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

import normlab
from _shared import to_kind
from normlab.base import stat_layers
from normlab.diagnostics import symmetric_kl

D = torch.float64
EPS = 1e-5


def data_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance per channel of all rows of ``x`` ``(N, C)``."""
    mean = x.sum(0) / x.size(0)
    return mean, ((x - mean) ** 2).sum(0) / (x.size(0) - 1)


def blobs(n_batches: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three Gaussian classes in 4-D, as (x, label) batches."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0, 0, 1], [0, 2.0, 0, -1], [0, 0, 2.0, 0]], dtype=D)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 3, (batch,), generator=g)
        out.append((centers[y] + torch.randn(batch, 4, generator=g, dtype=D), y))
    return out


# A per-feature scale and offset: the synthetic domain shift.
SCALE = torch.tensor([0.3, 0.3, 4.0, 4.0], dtype=D)
OFFSET = torch.tensor([-5.0, 5.0, -5.0, 5.0], dtype=D)


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def shifted(data: Batches, scale: bool = True) -> Batches:
    return [(x * (SCALE if scale else 1) + OFFSET, y) for x, y in data]


def net(input_eps: float = 1e-10) -> nn.Sequential:
    """An MLP whose first layer normalizes the raw features (a tiny eps keeps that exactly invariant
    to per-feature scale and offset)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.BatchNorm1d(4, eps=input_eps),
        nn.Linear(4, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).to(D)


def accuracy(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    with torch.no_grad():
        return float(torch.cat([(model(x).argmax(1) == y) for x, y in data]).double().mean())


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for x, y in blobs(60, 32, seed=1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


# ----------------------------------------------------------------------------- the domain shift
@pytest.mark.parametrize("mode", ["one-pass", "layerwise"])
def test_adabn_restores_source_accuracy_and_outputs(trained: nn.Module, mode: str) -> None:
    source = blobs(8, 64, seed=2)
    target = shifted(source)
    src_model = normlab.adapt(copy.deepcopy(trained), source, mode=mode)  # population stats on the source
    src_acc = accuracy(src_model, source)
    assert src_acc > 0.85
    assert accuracy(src_model, target) < src_acc - 0.25  # the shift breaks the model...

    before = normlab.statistic_shift(src_model, None, target)
    tgt_model = normlab.adapt(copy.deepcopy(src_model), target, mode=mode)
    after = normlab.statistic_shift(tgt_model, None, target)

    assert accuracy(tgt_model, target) == pytest.approx(src_acc)  # ...and AdaBN repairs it
    src_model.eval(), tgt_model.eval()
    with torch.no_grad():
        for (xs, _), (xt, _) in zip(source, target):
            torch.testing.assert_close(tgt_model(xt), src_model(xs), rtol=1e-6, atol=1e-6)
    assert list(before) == [n for n, _ in stat_layers(src_model)]
    assert before["0"] > 1.0  # the input layer sees the whole shift
    assert after["0"] < 1e-6 * before["0"]
    if mode == "layerwise":  # every layer normalizes with exactly its target statistics
        assert max(after.values()) < 1e-9
    # What each layer sees: source data through the source model vs target data through the adapted one.
    seen = normlab.statistic_shift(tgt_model, source, target, source_model=src_model)
    assert seen["0"] == pytest.approx(normlab.statistic_shift(src_model, source, target)["0"])
    assert seen["2"] < 1e-9 and seen["5"] < 1e-9
    unadapted = normlab.statistic_shift(src_model, source, target)
    assert unadapted["2"] > 1.0 and unadapted["5"] > 1.0


def _variant(kind: str) -> nn.Module:
    model = net()
    with pytest.warns(UserWarning) if kind == "cbn" else contextlib.nullcontext():  # the input CBN has no producer
        return to_kind(model, kind)


@pytest.mark.parametrize("mode", ["one-pass", "layerwise"])
def test_every_variant_is_adapted(stat_kind: str, mode: str) -> None:
    """Adapted on the shifted data, each variant computes what it computed on the source data.

    Mean-only layers remove offsets only, and ZCA whitening is not invariant to per-channel scales,
    so those two see an offset-only shift.
    """
    base = _variant(stat_kind)
    source = blobs(6, 48, seed=4)
    target = shifted(source, scale=stat_kind not in ("mobn", "dbn"))
    src_model = normlab.adapt(copy.deepcopy(base), source, mode=mode)
    tgt_model = normlab.adapt(copy.deepcopy(src_model), target, mode=mode)
    src_model.eval(), tgt_model.eval()
    with torch.no_grad():
        for (xs, _), (xt, _) in zip(source, target):
            torch.testing.assert_close(tgt_model(xt), src_model(xs), rtol=1e-6, atol=1e-6)
    before = normlab.statistic_shift(src_model, None, target)
    after = normlab.statistic_shift(tgt_model, None, target)
    assert before["0"] > 1.0 and after["0"] < 1e-6
    if mode == "layerwise":
        assert max(after.values()) < 1e-6


# ----------------------------------------------------------------------------- the two modes
def test_layerwise_uses_the_adapted_statistics_of_earlier_layers() -> None:
    """Layer k's statistics are those of its input when layers 1..k-1 normalize with their
    adapted (population) statistics: the reference applies the equations layer by layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4), nn.BatchNorm1d(4)).to(D)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
        model[1].bias.normal_()
    data = [x * 3 + 1 for x, _ in blobs(5, 20, seed=3)]
    data = [x[:, :3] for x in data]
    layerwise = normlab.adapt(copy.deepcopy(model), data, mode="layerwise")
    onepass = normlab.adapt(copy.deepcopy(model), data, mode="one-pass")
    with torch.no_grad():
        h1 = model[0](torch.cat(data))
        mu1, var1 = data_stats(h1)
        a1 = (h1 - mu1) / torch.sqrt(var1 + EPS) * model[1].weight + model[1].bias
        h2 = model[3](torch.relu(a1))
        mu2, var2 = data_stats(h2)
    torch.testing.assert_close(layerwise[1].running_mean, mu1)
    torch.testing.assert_close(layerwise[1].running_var, var1)
    torch.testing.assert_close(layerwise[4].running_mean, mu2)
    torch.testing.assert_close(layerwise[4].running_var, var2)
    # One pass: the first layer alike, the second computed on batch-normalized inputs instead.
    torch.testing.assert_close(onepass[1].running_var, var1)
    assert not torch.allclose(onepass[4].running_var, var2, rtol=1e-4, atol=0)
    # AdaBN's per-neuron statistics over all target samples, not the batch average.
    averaged = normlab.adapt(copy.deepcopy(model), data, mode="layerwise", pooling="average")
    assert not torch.allclose(averaged[1].running_var, var1, rtol=1e-6, atol=0)


def test_layerwise_passes_stop_early() -> None:
    model = net()
    calls = []
    model[7].register_forward_hook(lambda m, a, o: calls.append(1))
    data = [x for x, _ in blobs(3, 16, seed=5)]
    normlab.adapt(model, data, mode="layerwise")
    assert len(calls) == 3  # the classifier runs in the first pass only


def test_shared_layer_gets_all_its_inputs() -> None:
    """A layer applied twice per forward pools both calls (and its pass is not cut short): in its
    pass, the second call's input is computed with the layer's statistics before adaptation."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.bn = nn.BatchNorm1d(3, affine=False), nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.bn(self.first(x)) * 2 + 5)

    model = Twice().to(D)
    data = [x[:, :3] * 3 - 1 for x, _ in blobs(2, 30, seed=6)]
    normlab.adapt(model, data, mode="layerwise")
    with torch.no_grad():
        h = torch.cat(data)
        mu, var = data_stats(h)
        z = (h - mu) / torch.sqrt(var + EPS)
        once = z / (1 + EPS) ** 0.5  # the unadapted bn: mean 0, variance 1, gamma 1, beta 0
        ref_mean, ref_var = data_stats(torch.cat([z, once * 2 + 5]))
    torch.testing.assert_close(model.first.running_var, var)
    torch.testing.assert_close(model.bn.running_mean, ref_mean)
    torch.testing.assert_close(model.bn.running_var, ref_var)


def test_errors_leave_the_model_unchanged() -> None:
    model = net()
    state = copy.deepcopy(model.state_dict())
    data = [x for x, _ in blobs(3, 16, seed=7)]
    with pytest.raises(ValueError, match="re-iterable"):
        normlab.adapt(model, iter(data), mode="layerwise")
    with pytest.raises(ValueError, match="mode"):
        normlab.adapt(model, data, mode="fast")
    with pytest.raises(ValueError, match="pooling"):
        normlab.adapt(model, data, pooling="median")

    passes = {"n": 0}

    def fails_in_third_pass(m: nn.Module, batch: torch.Tensor) -> None:
        passes["n"] += 1
        if passes["n"] > 2 * len(data):
            raise RuntimeError("data source failed")
        m(batch)

    with pytest.raises(RuntimeError, match="data source failed"):
        normlab.adapt(model, data, mode="layerwise", forward=fails_in_third_pass)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # the two layers adapted before the failure are rolled back
    assert all(m.training for m in model.modules())


# ----------------------------------------------------------------------------- the diagnostic
def test_symmetric_kl_is_the_sum_of_both_divergences() -> None:
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(5, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
    v1, v2 = torch.rand(5, generator=g, dtype=D) + 0.1, torch.rand(5, generator=g, dtype=D) + 0.1
    p, q = Normal(m1, v1.sqrt()), Normal(m2, v2.sqrt())
    torch.testing.assert_close(symmetric_kl(m1, v1, m2, v2), kl_divergence(p, q) + kl_divergence(q, p))
    assert torch.all(symmetric_kl(m1, v1, m1, v1) == 0)


def test_statistic_shift_values() -> None:
    """For a lone BN layer the diagnostic is the mean symmetric KL between N(running) and N(data)."""
    layer = nn.BatchNorm1d(3).to(D)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0]))
        layer.running_var.copy_(torch.tensor([1.0, 2.0, 0.5]))
    data = [x[:, :3] for x, _ in blobs(3, 40, seed=8)]
    mean, var = data_stats(torch.cat(data))
    ref = symmetric_kl(layer.running_mean, layer.running_var + layer.eps, mean, var + layer.eps).mean()
    got = normlab.statistic_shift(layer, None, data)
    assert list(got) == [""] and got[""] == pytest.approx(float(ref), rel=1e-12)
    other = [x[:, 1:] for x, _ in blobs(3, 40, seed=9)]
    m2, v2 = data_stats(torch.cat(other))
    ref2 = symmetric_kl(m2, v2 + layer.eps, mean, var + layer.eps).mean()
    assert normlab.statistic_shift(layer, other, data)[""] == pytest.approx(float(ref2), rel=1e-12)
    with pytest.raises(ValueError, match="source_model"):
        normlab.statistic_shift(net(), None, data, source_model=nn.Sequential(nn.BatchNorm1d(4)))
