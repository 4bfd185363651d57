"""normlab.convert and the registry, on a ResNet-style model built here."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import normlab


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


def resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        Block(8),
        Block(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def trained_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = resnet()
    for _ in range(3):
        model(torch.randn(6, 3, 8, 8) * 2 + 1)
    return model.eval()


def _norms(model: nn.Module, cls: type) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def test_convert_to_brn_replaces_every_bn_and_keeps_eval_outputs():
    model = trained_resnet()
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    converted, report = normlab.convert(model, "brn", report=True)
    assert len(_norms(converted, normlab.BatchRenorm)) == 6
    assert not _norms(converted, nn.modules.batchnorm._BatchNorm)
    assert len(report.converted) == 6 and not report.skipped
    assert all(new == "BatchRenorm" for _, _, new in report.converted)
    torch.testing.assert_close(converted.eval()(x), before, rtol=1e-5, atol=1e-5)
    # The original is untouched (a copy was converted).
    assert len(_norms(model, nn.BatchNorm2d)) == 5


def test_convert_back_to_bn_restores_torch_classes():
    model = trained_resnet()
    x = torch.randn(4, 3, 8, 8)
    back = normlab.convert(normlab.convert(model, "brn"), "bn")
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    torch.testing.assert_close(back.eval()(x), model(x))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_convert_inplace_and_training_flag():
    model = resnet().train()
    out = normlab.convert(model, "brn", inplace=True, momentum=0.2)
    assert out is model
    layer = model[1]
    assert isinstance(layer, normlab.BatchRenorm) and layer.training and layer.momentum == 0.2


def test_convert_a_single_layer_and_carry_state():
    bn = nn.BatchNorm1d(5)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
        bn.running_mean.uniform_()
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
    brn = normlab.convert(bn, "brn", r_max=2.0)
    assert isinstance(brn, normlab.BatchRenorm) and brn.r_max == 2.0
    for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(brn, k), getattr(bn, k)), k


def test_convert_to_groupnorm():
    model = trained_resnet()
    gn = normlab.convert(model, "gn", num_groups=4)
    layers = [m for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(layers) == 6 and all(m.num_groups == 4 for m in layers)
    assert torch.equal(layers[0].weight, model[1].weight)
    gn(torch.randn(2, 3, 8, 8))
    # GroupNorms are left alone unless named as a source.
    assert len(_norms(normlab.convert(gn, "bn"), nn.GroupNorm)) == 6
    assert not _norms(normlab.convert(gn, "bn", source="gn"), nn.GroupNorm)
    with pytest.raises(ValueError, match="num_groups to divide num_channels=8"):
        normlab.convert(model, "gn", num_groups=3)


def test_unknown_kind_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown normalization kind 'nope'; known kinds: .*bn.*brn.*gn"):
        normlab.convert(resnet(), "nope")
    assert {"bn", "brn", "gn"} <= set(normlab.kinds())


def test_bad_option_is_an_error_not_a_skip():
    with pytest.raises(ValueError, match="cannot build 'brn'"):
        normlab.convert(resnet(), "brn", no_such_option=1)


def test_nothing_to_convert_warns_and_conversions_are_logged(caplog):
    with pytest.warns(UserWarning, match="found no normalization layer"):
        normlab.convert(nn.Linear(3, 3), "brn")
    with caplog.at_level(logging.INFO, logger="normlab"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            normlab.convert(resnet(), "brn")
    assert sum("BatchNorm2d -> BatchRenorm" in r.message for r in caplog.records) == 5


def test_report_is_readable():
    _, report = normlab.convert(resnet(), "brn", report=True)
    text = str(report)
    assert "6 converted, 0 skipped" in text and "3.bn1: BatchNorm2d -> BatchRenorm" in text
