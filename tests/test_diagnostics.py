"""Conditioning diagnostics against eigenvalues computed independently with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.diagnostics import SpectrumRecorder, condition_number, covariance_spectrum, layer_spectra


def np_group_spectra(x: torch.Tensor, group_size: int) -> list[np.ndarray]:
    a = x.detach().double().numpy()
    c = a.shape[1]
    X = np.moveaxis(a, 1, 0).reshape(c, -1)
    Xc = X - X.mean(1, keepdims=True)
    cov = Xc @ Xc.T / X.shape[1]
    return [
        np.sort(np.linalg.eigvalsh(cov[s : s + group_size, s : s + group_size]))[::-1] for s in range(0, c, group_size)
    ]


@pytest.mark.parametrize("shape,group_size", [((50, 7), 3), ((8, 6, 3, 3), None), ((20, 8, 5), 4), ((30, 5), 9)])
def test_covariance_spectrum_matches_numpy(shape, group_size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x = x + 0.5 * x[:, :1]  # correlate every channel with the first
    spectra = covariance_spectrum(x, group_size)
    want = np_group_spectra(x, group_size or shape[1])
    assert len(spectra) == len(want)
    for got, exp in zip(spectra, want):
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), exp, rtol=1e-6, atol=1e-9)
    cond = condition_number(x, group_size)
    np.testing.assert_allclose(cond.numpy(), [w[0] / w[-1] for w in want], rtol=1e-6)
    cond_eps = condition_number(x, group_size, eps=0.1)
    np.testing.assert_allclose(cond_eps.numpy(), [(w[0] + 0.1) / (w[-1] + 0.1) for w in want], rtol=1e-6)


def test_singular_covariance_has_infinite_condition_number():
    x = torch.randn(40, 4)
    x[:, 3] = x[:, 0] - x[:, 1]
    assert torch.isinf(condition_number(x)).all()
    assert torch.isfinite(condition_number(x, eps=1e-3)).all()


def test_recorder_on_decorrelated_layer_whitens_the_output():
    torch.manual_seed(0)
    c = 8
    mix = torch.eye(c) + 2.0 * torch.randn(c, c)
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(64, c, 4, 4))
    layer = normlab.DecorrelatedBatchNorm(c, group_size=4)
    model = nn.Sequential(nn.Identity(), layer)
    with SpectrumRecorder(layer) as rec:
        model(x)
        model(x)
    assert len(rec.records) == 2
    assert rec.group_size == 4
    record = rec.records[0]
    assert len(record.input) == 2 and record.input[0].shape == (4,)
    np.testing.assert_allclose(torch.cat(record.input).numpy(), np.concatenate(np_group_spectra(x, 4)), rtol=1e-5)
    assert (record.input_condition > 5).all()
    # ZCA output covariance is (Sigma + eps I)^{-1} Sigma: condition number 1 up to eps and rounding.
    np.testing.assert_allclose(record.output_condition.numpy(), 1.0, atol=1e-3)
    model(x)
    assert len(rec.records) == 2  # the hook was removed on leaving the block

    bn_model = nn.Sequential(nn.BatchNorm2d(c))
    spec = layer_spectra(bn_model, bn_model[0], x, group_size=4)
    # BatchNorm standardizes but does not decorrelate: its output stays ill-conditioned.
    assert (spec.output_condition > 5).all()


def test_layer_spectra_errors_when_layer_is_not_called():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="layer_spectra.*not called"):
        layer_spectra(model, nn.BatchNorm1d(3), torch.randn(5, 3))


def test_bad_inputs():
    with pytest.raises(ValueError, match="covariance_spectrum.*\\(N, C, \\*\\)"):
        covariance_spectrum(torch.randn(5))
    with pytest.raises(ValueError, match="condition_number.*group_size"):
        condition_number(torch.randn(5, 3), group_size=0)
