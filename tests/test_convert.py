"""normlab.convert and the registry, on the shared ResNet-style model."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import normlab
from _shared import STAT_KINDS, to_kind
from _shared import resnet as shared_resnet


def resnet() -> nn.Module:
    """The shared ResNet with a BatchNorm1d on the classifier's output: six BatchNorm2d, one BatchNorm1d."""
    return shared_resnet(num_classes=4, head_norm="post")


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
    assert len(_norms(converted, normlab.BatchRenorm)) == 7
    assert not _norms(converted, nn.modules.batchnorm._BatchNorm)
    assert len(report.converted) == 7 and not report.skipped
    assert all(new == "BatchRenorm" for _, _, new in report.converted)
    torch.testing.assert_close(converted.eval()(x), before, rtol=1e-5, atol=1e-5)
    # The original is untouched (a copy was converted).
    assert len(_norms(model, nn.BatchNorm2d)) == 6


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
    layer = model.bn1
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
    assert len(layers) == 7 and all(m.num_groups == 4 for m in layers)
    assert torch.equal(layers[0].weight, model.bn1.weight)
    gn(torch.randn(2, 3, 8, 8))
    # GroupNorms are left alone unless named as a source.
    assert len(_norms(normlab.convert(gn, "bn"), nn.GroupNorm)) == 7
    assert not _norms(normlab.convert(gn, "bn", source="gn"), nn.GroupNorm)
    with pytest.raises(ValueError, match="num_groups to divide num_channels=8"):
        normlab.convert(model, "gn", num_groups=3)


def test_unknown_kind_lists_known_ones(resnet_model):
    with pytest.raises(ValueError, match=r"unknown normalization kind 'nope'; known kinds: .*bn.*brn.*gn"):
        normlab.convert(resnet_model, "nope")
    assert {"bn", "brn", "gn"} <= set(normlab.kinds())


def test_bad_option_is_an_error_not_a_skip(resnet_model):
    with pytest.raises(ValueError, match="cannot build 'brn'"):
        normlab.convert(resnet_model, "brn", no_such_option=1)


def test_nothing_to_convert_warns_and_conversions_are_logged(caplog):
    with pytest.warns(UserWarning, match="found no normalization layer"):
        normlab.convert(nn.Linear(3, 3), "brn")
    with caplog.at_level(logging.INFO, logger="normlab"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            normlab.convert(resnet(), "brn")
    assert sum("BatchNorm2d -> BatchRenorm" in r.message for r in caplog.records) == 6


def test_report_is_readable():
    _, report = normlab.convert(resnet(), "brn", report=True)
    text = str(report)
    assert "7 converted, 0 skipped" in text and "layer1.0.bn1: BatchNorm2d -> BatchRenorm" in text


@pytest.mark.parametrize("kind", STAT_KINDS)
def test_every_kind_trains_in_the_resnet_with_inplace_residual_add(kind):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer converts (and, for cbn, pairs with its producer)
        model = to_kind(resnet(), kind).train()
    model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_inplace_conversion_is_all_or_nothing():
    """A layer that cannot be built (here the last one: GroupNorm's groups do not divide 6) leaves the
    model exactly as it was, also with inplace=True."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6))
    before = [type(m) for m in model]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="num_groups"):
        normlab.convert(model, "gn", inplace=True, num_groups=4)
    assert [type(m) for m in model] == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
