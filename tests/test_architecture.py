"""Every kind in a real architecture, the way users run it: torchvision's ResNet block pattern
(in-place residual add, ``ReLU(inplace=True)``, a downsample branch) trained with channels_last,
under bf16 autocast and under ``torch.compile(fullgraph=True)``, then exported for inference with
``torch.export``, folded or not.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import normlab
from _shared import STAT_KINDS, resnet, to_kind

pytestmark = pytest.mark.slow


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer converts and, for cbn, pairs with its producer
        return to_kind(resnet(), kind).train()


def _batch(seed: int) -> torch.Tensor:
    return torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.float().square().mean().backward()
    return y.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", STAT_KINDS)
def test_channels_last_trains_as_contiguous(kind):
    model = _model(kind)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for s in range(3):
        x = _batch(s)
        y, grads = _step(model, x)
        y_last, grads_last = _step(last, x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(y_last, y, rtol=1e-4, atol=1e-5)
        for a, e in zip(grads_last, grads):
            torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-5)
    for name, buf in model.state_dict().items():
        torch.testing.assert_close(last.state_dict()[name], buf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", STAT_KINDS)
def test_bf16_autocast_trains(kind):
    model = _model(kind)
    ref = copy.deepcopy(model)
    for s in range(3):
        x = _batch(s)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, grads = _step(model, x)
        y_ref, _ = _step(ref, x)
        assert torch.isfinite(y.float()).all()
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        # bfloat16 products: the same outputs to bfloat16's precision
        torch.testing.assert_close(y.float(), y_ref, rtol=0.1, atol=0.1)
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())


@pytest.mark.parametrize("kind", STAT_KINDS)
def test_compile_fullgraph_trains_as_eager(kind):
    torch._dynamo.reset()
    eager = _model(kind)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for s in range(3):
        x = _batch(s)
        y, grads = _step(eager, x)
        y_c, grads_c = _step(compiled, x)
        torch.testing.assert_close(y_c, y, rtol=1e-4, atol=1e-4)
        for a, e in zip(grads_c, grads):
            torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-4)
    for name, buf in eager.state_dict().items():
        torch.testing.assert_close(compiled_model.state_dict()[name], buf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", STAT_KINDS)
def test_exports_for_inference_folded_or_not(kind):
    model = _model(kind)
    for s in range(3):
        _step(model, _batch(s))
    model.eval()
    x = _batch(10)
    with torch.no_grad():
        want = model(x)
        for deployed in (model, normlab.fold(model)):
            exported = torch.export.export(deployed, (x,))
            torch.testing.assert_close(exported.module()(x), want, rtol=1e-4, atol=1e-5)
            other = _batch(11)
            torch.testing.assert_close(exported.module()(other), model(other), rtol=1e-4, atol=1e-5)
