"""Conformance: every kind against torch's own BatchNorm module tests, on inputs normlab did not write.

torch ships the inputs of its module tests in the wheel (``torch.testing._internal.common_modules``,
the ``ModuleInfo`` entries of ``nn.BatchNorm1d/2d/3d``: constructor arguments, forward inputs, error
inputs). Each kind runs them in the configuration where it must be batch normalization, with the
checks of torch's ``test/test_modules.py`` (forward and backward against torch's layer in float64,
train and eval, gradcheck and gradgradcheck, pickle and deepcopy, non-contiguous and channels_last
inputs, factory kwargs and ``to_empty`` from meta, the state dict into torch's layer and back), and
against its own formula where it departs from BatchNorm by design:

* BatchRenorm moves ``sigma``, not the variance (``running_var = sigma^2 - eps``), needs running
  statistics (``track_running_stats=False`` is refused) and defaults to the paper's momentum 0.01;
* DecorrelatedBatchNorm evaluates with its running whitening matrix (with ``group_size=1``, the
  average of ``1/sqrt(var_B + eps)``), and refuses second derivatives;
* the variants refuse a training batch of no samples; MeanOnlyBatchNorm (its own test below) never
  divides.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import normlab

common_modules = pytest.importorskip("torch.testing._internal.common_modules")  # needs expecttest (dev extra)

D = torch.float64
TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INFOS = {m.name: m for m in common_modules.module_db if m.module_cls in TORCH_BN}

# Each kind in the configuration where its training step is batch normalization.
CONFIGS = {
    "bn": (normlab.BatchNorm, {}),
    "brn": (normlab.BatchRenorm, {"r_max": 1.0, "d_max": 0.0}),
    "dbn": (normlab.DecorrelatedBatchNorm, {"group_size": 1}),
    "cbn-window1": (normlab.CrossIterationBatchNorm, {"window": 1}),
    "cbn-burn-in": (normlab.CrossIterationBatchNorm, {"window": 3, "burn_in": 10_000}),
    "ghost": (normlab.GhostBatchNorm, {"virtual_batch_size": None}),
    "bkn": (normlab.BatchKalmanNorm, {"micro_batch": None}),
}


def _cases() -> list:
    cases = []
    for name, info in INFOS.items():
        for training in (True, False):
            torch.manual_seed(0)
            inputs = info.module_inputs_func(info, device="cpu", dtype=D, requires_grad=True, training=training)
            for i, mi in enumerate(inputs):
                for kind in CONFIGS:
                    case = f"{kind}-{name}-{mi.desc or 'default'}-{'train' if training else 'eval'}"
                    cases.append(pytest.param(name, training, i, kind, id=case))
    return cases


def _module_input(name: str, training: bool, index: int):
    info = INFOS[name]
    torch.manual_seed(0)
    return list(info.module_inputs_func(info, device="cpu", dtype=D, requires_grad=True, training=training))[index]


def _build(kind: str, args: tuple, kwargs: dict, **factory) -> nn.Module:
    cls, options = CONFIGS[kind]
    if kind == "brn" and len(args) < 3 and "momentum" not in kwargs:
        options = {**options, "momentum": 0.1}  # torch's default; BatchRenorm's own is the paper's 0.01
    return cls(*args, **kwargs, **options, **factory)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _expected_running_var(kind: str, before: torch.Tensor, x: torch.Tensor, ref_after: torch.Tensor, factor, eps):
    """The running variance each kind stores after one training step (BatchRenorm moves sigma)."""
    if kind != "brn":
        return ref_after
    dims = [0, *range(2, x.dim())]
    sigma_b = torch.sqrt(x.detach().var(dims, correction=0) + eps)
    sigma = torch.sqrt(before + eps)
    return (sigma + factor * (sigma_b - sigma)) ** 2 - eps


@pytest.mark.parametrize("name,training,index,kind", _cases())
def test_matches_torch_batchnorm(name, training, index, kind):
    mi = _module_input(name, training, index)
    args, kwargs = mi.constructor_input.args, dict(mi.constructor_input.kwargs)
    (x,) = mi.forward_input.args
    ref = INFOS[name].module_cls(*args, **kwargs, dtype=D).train(training)
    tracks = ref.track_running_stats
    if kind == "brn" and not tracks:
        with pytest.raises(ValueError, match="BatchRenorm: expected track_running_stats=True"):
            _build(kind, args, kwargs, dtype=D)
        return
    layer = _build(kind, args, kwargs, dtype=D).train(training)
    with torch.no_grad():  # a random affine, the same in both
        for p, q in zip(ref.parameters(), layer.parameters()):
            p.copy_(torch.rand_like(p) + 0.5)
            q.copy_(p)
    uses_batch = training or not tracks
    if x.size(0) == 0 and uses_batch and kind != "bn":
        # The variants refuse a batch of no samples (nothing to correct, pool or whiten with).
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(x)
        return
    eps, momentum = ref.eps, ref.momentum
    for step in range(2):
        before = _state(layer)
        xs = x.detach().clone().requires_grad_(True) if step == 0 else (x.detach() * 1.5 - 0.3).requires_grad_(True)
        xr = xs.detach().clone().requires_grad_(True)
        y, y_ref = layer(xs), ref(xr)
        if kind == "dbn" and not uses_batch:
            # Eval with the running whitening matrix: y = gamma W (x - mu) + beta per channel.
            shape = (1, -1) + (1,) * (xs.dim() - 2)
            scale = layer.running_whitening[:, 0, 0].reshape(shape)
            y_ref = (xr - layer.running_mean.reshape(shape)) * scale
            if ref.weight is not None:  # ref's parameters hold the same values as the layer's
                y_ref = y_ref * ref.weight.reshape(shape)
            if ref.bias is not None:
                y_ref = y_ref + ref.bias.reshape(shape)
        torch.testing.assert_close(y, y_ref)
        if xs.numel():
            g = torch.randn_like(y)
            got = torch.autograd.grad(y, [xs, *layer.parameters()], g, allow_unused=True)
            want = torch.autograd.grad(y_ref, [xr, *ref.parameters()], g, allow_unused=True)
            for a, e in zip(got, want):
                torch.testing.assert_close(a, e)
        if training and tracks:
            factor = momentum if momentum is not None else 1.0 / float(ref.num_batches_tracked)
            torch.testing.assert_close(layer.running_mean, ref.running_mean)
            torch.testing.assert_close(layer.num_batches_tracked, ref.num_batches_tracked)
            if xs.numel():
                expected = _expected_running_var(kind, before["running_var"], xs, ref.running_var, factor, eps)
                torch.testing.assert_close(layer.running_var, expected)
        elif tracks:
            for k, v in before.items():
                assert torch.equal(layer.state_dict()[k], v), k  # eval moves nothing


def _one_per_info() -> list:
    return [pytest.param(name, kind, id=f"{kind}-{name}") for name in INFOS for kind in CONFIGS]


def _default_input(name: str):
    return _module_input(name, True, 0)


@pytest.mark.parametrize("name,kind", _one_per_info())
def test_module_checks(name, kind):
    """torch's generic module checks: gradcheck, gradgradcheck, pickle/deepcopy, strides, formats, meta."""
    mi = _default_input(name)
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    x = mi.forward_input.args[0].detach()
    layer = _build(kind, args, kwargs, dtype=D)
    # Factory kwargs: parameters and buffers in the dtype asked for.
    assert all(t.dtype == D for t in (*layer.parameters(), layer.running_mean, layer.running_var))
    # gradcheck and gradgradcheck in training (the output does not depend on the running statistics).
    xg = x.clone().requires_grad_(True)
    assert gradcheck(layer, (xg,), fast_mode=True)
    if kind == "dbn":
        with pytest.raises(RuntimeError, match="DecorrelatedBatchNorm: second derivatives"):
            gradgradcheck(layer, (xg,), fast_mode=True)
    else:
        assert gradgradcheck(layer, (xg,), fast_mode=True)
    layer(x * 2 + 1)  # some state to carry
    layer.eval()
    want = layer(x)
    # pickle and deepcopy
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(layer), torch.load(buffer, weights_only=False)):
        torch.testing.assert_close(copied(x), want, rtol=0, atol=0)
    # non-contiguous and channels_last inputs: the same values
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    torch.testing.assert_close(layer(strided), want)
    if x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        torch.testing.assert_close(layer(x.contiguous(memory_format=fmt)), want)
        layer.train()
        torch.testing.assert_close(
            copy.deepcopy(layer)(x.contiguous(memory_format=fmt)), copy.deepcopy(layer)(x)
        )
        layer.eval()
    # to_empty from meta, then reset: a fresh layer
    meta = _build(kind, args, kwargs, device="meta", dtype=D)
    assert all(t.is_meta for t in meta.state_dict().values())
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    torch.testing.assert_close(meta.train()(x), _build(kind, args, kwargs, dtype=D).train()(x))


@pytest.mark.parametrize("name,kind", _one_per_info())
def test_state_dict_into_torch_and_back(name, kind):
    mi = _default_input(name)
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    x = mi.forward_input.args[0].detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = _build(kind, args, kwargs, dtype=D)
        for s in range(3):
            layer(x * (1 + s) + s)
    torch_cls = INFOS[name].module_cls
    ref = torch_cls(*args, **kwargs, dtype=D)
    shared = {k: v for k, v in layer.state_dict().items() if k in ref.state_dict()}
    ref.load_state_dict(shared)
    back = _build(kind, args, kwargs, dtype=D)
    back.load_state_dict(ref.state_dict())  # a BatchNorm checkpoint loads into every kind
    ref.eval()
    back.eval()
    # Into torch's layer and back, the eval output is torch's (DBN's whitening is derived from the
    # loaded variance: diag(1/sqrt(var + eps))).
    torch.testing.assert_close(back(x), ref(x))


@pytest.mark.parametrize("name", list(INFOS))
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_error_inputs(name, kind):
    info = INFOS[name]
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False, training=True)
    for error in errors:
        mi = error.module_error_input
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        with pytest.raises(error.error_type, match="eps"):  # torch: "eps must be positive" on forward
            _build(kind, args, kwargs)(*mi.forward_input.args)


@pytest.mark.parametrize("name", list(INFOS))
def test_mean_only_follows_its_formula_on_torch_inputs(name):
    """MeanOnlyBatchNorm on the same inputs: y = weight (x - mean) + bias, the mean as BatchNorm keeps it."""
    info = INFOS[name]
    for training in (True, False):
        torch.manual_seed(0)
        for mi in info.module_inputs_func(info, device="cpu", dtype=D, requires_grad=True, training=training):
            args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
            (x,) = mi.forward_input.args
            ref = info.module_cls(*args, **kwargs, dtype=D).train(training)
            layer = normlab.MeanOnlyBatchNorm(*args, **kwargs, dtype=D).train(training)
            uses_batch = training or not ref.track_running_stats
            if x.size(0) == 0 and uses_batch:
                with pytest.raises(ValueError, match="more than 1 value per channel"):
                    layer(x)
                continue
            y = layer(x)
            ref(x.detach())
            dims = [0, *range(2, x.dim())]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean = x.detach().mean(dims) if uses_batch else torch.zeros(x.size(1), dtype=D)
            want = x.detach() - mean.reshape(shape)
            if layer.weight is not None:
                want = want * layer.weight.detach().reshape(shape)
            if layer.bias is not None:
                want = want + layer.bias.detach().reshape(shape)
            torch.testing.assert_close(y.detach(), want)
            if training and ref.track_running_stats:
                torch.testing.assert_close(layer.running_mean, ref.running_mean)
                assert layer.running_var is None and math.isclose(
                    float(layer.num_batches_tracked), float(ref.num_batches_tracked)
                )


@pytest.mark.parametrize("kind", [*CONFIGS, "mobn", "dbn-g4"])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_kept_and_batched_gradients(kind, training):
    """As torch's layer: a channels_last input gives channels_last output and gradient; gradients for a
    batch of incoming gradients at once (is_grads_batched, i.e. vmap over the backward) equal a loop."""
    extra = {"mobn": (normlab.MeanOnlyBatchNorm, {}), "dbn-g4": (normlab.DecorrelatedBatchNorm, {"group_size": 4})}
    cls, options = extra.get(kind) or CONFIGS[kind]
    layer = cls(6, **options, dtype=D).train(training)
    layer(torch.randn(8, 6, 3, 3, dtype=D))  # some running statistics
    x = torch.randn(8, 6, 3, 3, dtype=D).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    grads = torch.randn(3, *y.shape, dtype=D)
    (batched,) = torch.autograd.grad(y, x, grads, is_grads_batched=True, retain_graph=True)
    one_by_one = torch.stack([torch.autograd.grad(y, x, g, retain_graph=True)[0] for g in grads])
    torch.testing.assert_close(batched, one_by_one)
    # In a channels_last model the incoming gradient is channels_last too; the input's gradient stays so
    # (but for DBN's eval, composed of grouping reshapes: documented in docs/conventions.md).
    (gx,) = torch.autograd.grad(y, x, grads[0].contiguous(memory_format=torch.channels_last))
    assert gx.is_contiguous(memory_format=torch.channels_last) or (kind.startswith("dbn") and not training)
