"""Folding normalization layers for deployment: the folded model computes what the eval model
computes, for every variant, on the shared ResNet-style model and an MLP; references for the pieces are
written from the maps ``y = A x + b``."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normlab
from _shared import resnet, to_kind
from normlab.base import is_stat_norm
from normlab.fold import ChannelAffine, find_pairs, fold_pair

D = torch.float64
# The channel-wise layers' inference_affine is computed in float32 (normlab.base), so float64
# models agree to float32 rounding.
TOL = {"rtol": 1e-5, "atol": 1e-6}


# ----------------------------------------------------------------------------- models
def fold_resnet(kind: str) -> nn.Module:
    """The shared ResNet with a bias in the stem conv (unlike the blocks) and a BatchNorm1d on the pooled
    features (no producer: it becomes a ChannelAffine). Six channels in the second stage: with groups of 4,
    DecorrelatedBatchNorm pads its second group there.

    DecorrelatedBatchNorm's autograd Function returns a view, which may not be modified in place yet (a
    known issue, with a fix to come): with dbn the blocks add the shortcut and apply the ReLUs out of place.
    """
    return resnet(widths=(4, 6), num_classes=5, head_norm="pre", stem_bias=True, inplace=kind != "dbn")


RESNET_PAIRS = {
    ("conv1", "bn1"),
    ("layer1.0.conv1", "layer1.0.bn1"),
    ("layer1.0.conv2", "layer1.0.bn2"),
    ("layer2.0.conv1", "layer2.0.bn1"),
    ("layer2.0.conv2", "layer2.0.bn2"),
    ("layer2.0.downsample.0", "layer2.0.downsample.1"),
}


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm1d(5),  # input normalization: no producer
        nn.Linear(5, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 8, bias=False),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
        nn.BatchNorm1d(3),
    )


def build(kind: str, arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = fold_resnet(kind) if arch == "resnet" else mlp()
    with pytest.warns(UserWarning) if kind == "cbn" else contextlib.nullcontext():  # unpaired CBNs warn
        model = to_kind(model, kind)
    model = model.to(D)
    # Non-trivial statistics and affine parameters: a few training steps on shifted, scaled data.
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(3):
        model(example(arch, g) * 2 + 0.5)
    with torch.no_grad():
        for _, m in model.named_modules():
            if is_stat_norm(m) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(generator=g)
    return model.eval()


def example(arch: str, g: torch.Generator | None = None, n: int = 6) -> torch.Tensor:
    shape = (n, 3, 8, 8) if arch == "resnet" else (n, 5)
    return torch.randn(shape, generator=g, dtype=D)


def stat_norms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_stat_norm(m)]


# ----------------------------------------------------------------------------- whole models
@pytest.mark.parametrize("arch", ["resnet", "mlp"])
def test_fold_equals_eval_model(stat_kind: str, arch: str) -> None:
    model = build(stat_kind, arch)
    state = copy.deepcopy(model.state_dict())
    model.train()
    folded = normlab.fold(model)
    assert model.training  # the original is not touched
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = example(arch, torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL)
    assert not folded.training
    assert stat_norms(folded) == []  # nothing left that keeps statistics...
    affines = [n for n, m in folded.named_modules() if isinstance(m, ChannelAffine)]
    assert affines == (["head_norm"] if arch == "resnet" else ["0"])  # ...and only unpaired layers became affine
    if arch == "resnet":
        assert set(find_pairs(model)) == RESNET_PAIRS
        assert all(isinstance(folded.get_submodule(b), nn.Identity) for _, b in RESNET_PAIRS)
    else:
        assert set(find_pairs(model)) == {("1", "2"), ("4", "5"), ("7", "8")}
    if stat_kind == "dbn":  # the whitening matrix mixes channels: the unpaired layer keeps a (C, C) matrix
        assert folded.get_submodule(affines[0]).weight.shape == ((5, 5) if arch == "mlp" else (6, 6))


@pytest.mark.parametrize("kind", ["torch", "dbn", "cbn"])
def test_folded_model_traces_and_exports(kind: str) -> None:
    model = build(kind, "resnet")
    folded = normlab.fold(model)
    x = example("resnet", torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(folded, x)
        torch.testing.assert_close(traced(x), ref, **TOL)
        exported = torch.export.export(folded, (x,))
        torch.testing.assert_close(exported.module()(x), ref, **TOL)
        y = example("resnet", torch.Generator().manual_seed(4))
        torch.testing.assert_close(traced(y), model(y), **TOL)  # not specialised to one input


def test_float32_model() -> None:
    model = build("torch", "resnet").float()
    x = example("resnet", torch.Generator().manual_seed(5)).float()
    with torch.no_grad():
        torch.testing.assert_close(normlab.fold(model)(x), model(x), rtol=1e-4, atol=1e-5)


def test_frozen_model_folds() -> None:
    model = normlab.freeze(build("torch", "resnet")).train()
    folded = normlab.fold(model)
    x = example("resnet")
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), **TOL)
    assert not any(m._forward_pre_hooks for m in folded.modules())


def test_norm_alone_becomes_affine() -> None:
    layer = build("torch", "mlp")[0]
    folded = normlab.fold(layer)
    assert isinstance(folded, ChannelAffine)
    x = example("mlp")
    torch.testing.assert_close(folded(x), layer(x), **TOL)


# ----------------------------------------------------------------------------- the pieces
def test_channel_affine_against_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=D)
    a, b = torch.randn(3, generator=g, dtype=D), torch.randn(3, generator=g, dtype=D)
    torch.testing.assert_close(ChannelAffine(a, b)(x), a.view(1, 3, 1, 1) * x + b.view(1, 3, 1, 1))
    m = torch.randn(3, 3, generator=g, dtype=D)
    torch.testing.assert_close(ChannelAffine(m, b)(x), torch.einsum("oc,nchw->nohw", m, x) + b.view(1, 3, 1, 1))
    with pytest.raises(ValueError, match="ChannelAffine"):
        ChannelAffine(torch.ones(3, 2), torch.ones(3))
    with pytest.raises(ValueError, match="ChannelAffine"):
        ChannelAffine(a, b)(torch.randn(2, 4))


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2]),
    per_group=st.integers(1, 3),
    cin_per_group=st.integers(1, 3),
    kernel=st.integers(1, 3),
    bias=st.booleans(),
    transposed=st.booleans(),
    dims=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_fold_pair_per_channel(
    groups: int, per_group: int, cin_per_group: int, kernel: int, bias: bool, transposed: bool, dims: int, seed: int
) -> None:
    """Conv / transposed conv (any groups) then BN: folded = BN(conv(x)) = A * conv(x) + b."""
    torch.manual_seed(seed)
    cin, cout = groups * cin_per_group, groups * per_group
    conv_cls = {
        (1, False): nn.Conv1d,
        (2, False): nn.Conv2d,
        (1, True): nn.ConvTranspose1d,
        (2, True): nn.ConvTranspose2d,
    }
    conv = conv_cls[dims, transposed](cin, cout, kernel, groups=groups, bias=bias).to(D)
    bn = nn.BatchNorm2d(cout).to(D).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.2, 3)
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(2, cin, *([5] * dims), dtype=D)
    with torch.no_grad():
        h = conv(x)
        shape = (1, -1) + (1,) * dims
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        ref = (h - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)
        assert fold_pair(conv, bn)
        torch.testing.assert_close(conv(x), ref, **TOL)


@pytest.mark.parametrize("transposed", [False, True])
def test_whitening_folds_into_output_channels(transposed: bool) -> None:
    torch.manual_seed(0)
    conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(3, 6, 3).to(D)
    dbn = normlab.DecorrelatedBatchNorm(6, group_size=4).to(D)
    x = torch.randn(8, 3, 6, 6, dtype=D)
    dbn.train()(conv(x).detach() * 3 + 1)
    dbn.eval()
    with torch.no_grad():
        ref = dbn(conv(x))
        assert fold_pair(conv, dbn)
        torch.testing.assert_close(conv(x), ref, rtol=1e-10, atol=1e-10)


def test_whitening_after_grouped_conv_stays_a_matrix() -> None:
    """A channel-mixing A cannot go into a grouped convolution: it becomes a (C, C) ChannelAffine."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), normlab.DecorrelatedBatchNorm(4, group_size=4)).to(D)
    x = torch.randn(8, 4, 6, 6, dtype=D)
    model.train()(x)
    model.eval()
    folded = normlab.fold(model)
    assert isinstance(folded[1], ChannelAffine) and folded[1].weight.shape == (4, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_find_pairs_from_the_graph() -> None:
    """Pairs follow the data flow, whatever the names: a normalization *before* a conv (pre-activation),
    a producer whose output is also used elsewhere, or a module called twice is not paired."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)  # pre-activation: bn1 feeds conv1
            self.features, self.scale = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # any names
            self.branch, self.bn_branch = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # output used twice
            self.twice, self.bn_twice = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # conv called twice

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv1(F.relu(self.bn1(x)))
            x = self.scale(self.features(x))
            b = self.branch(x)
            x = self.bn_branch(b) + b
            return self.bn_twice(self.twice(self.twice(x)))

    model = build_stats(Net().to(D))
    assert find_pairs(model) == [("features", "scale")]
    folded = normlab.fold(model)
    x = torch.randn(2, 4, 3, 3, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL)
    assert [type(m).__name__ for m in (folded.bn1, folded.scale, folded.bn_branch, folded.bn_twice)] == [
        "ChannelAffine",
        "Identity",
        "ChannelAffine",
        "ChannelAffine",
    ]


def test_find_pairs_rules_without_a_graph() -> None:
    """A model fx cannot trace is paired by the Sequential and naming rules, with a warning."""
    shared = nn.Conv2d(3, 3, 1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv_a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)  # pairs by name
            self.conv1, self.fc1, self.bn1 = nn.Conv2d(3, 5, 1), nn.Linear(3, 5), nn.BatchNorm1d(5)  # ambiguous
            self.conv2, self.bn2 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(7)  # channel mismatch
            self.linear, self.norm = nn.Linear(3, 2), nn.BatchNorm1d(2)  # linear -> norm
            self.conv3, self.bn3 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)  # no stats
            self.seq = nn.Sequential(shared, nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.ReLU(), nn.BatchNorm2d(3))
            self.again = shared  # registered twice: never folded

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: not traceable
                return x
            return -x

    with pytest.warns(UserWarning, match="naming rules"):
        pairs = find_pairs(Net())
    assert sorted(pairs) == [("conv_a", "bn_a"), ("linear", "norm")]


def test_explicit_pairs() -> None:
    class Odd(nn.Module):
        """Not traceable, and the naming rule does not cover it: the conv's output goes to ``scale``."""

        def __init__(self) -> None:
            super().__init__()
            self.features, self.scale = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.features(x)
            return self.scale(h) if h.shape[0] > 0 else h

    model = build_stats(Odd().to(D))
    x = torch.randn(2, 3, 6, 6, dtype=D)
    with pytest.warns(UserWarning, match="naming rules"):
        assert find_pairs(model) == []
    folded = normlab.fold(model, pairs=[("features", "scale")])
    assert isinstance(folded.scale, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL)
    with pytest.raises(ValueError, match="no module named"):
        normlab.fold(model, pairs=[("features", "missing")])
    with pytest.raises(ValueError, match="cannot fold"):
        normlab.fold(model, pairs=[("scale", "features")])


def build_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, m in model.named_modules():
            if is_stat_norm(m):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.normal_(generator=g)
                m.bias.normal_(generator=g)
    return model.eval()


# ----------------------------------------------------------------------------- reparametrized layers
def test_weight_normalized_layers_become_plain() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        normlab.weight_norm(nn.Conv2d(3, 4, 3)),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        torch.nn.utils.parametrizations.weight_norm(nn.Linear(36, 6)),
        nn.BatchNorm1d(6),
        torch.nn.utils.weight_norm(nn.Linear(6, 3)),  # torch's older hook-based weight norm
    ).to(D)
    build_stats(model)
    folded = normlab.fold(model)
    assert not any(k for k in folded.state_dict() if "parametrizations" in k or k.endswith(("_g", "_v")))
    assert not normlab.is_weight_normalized(folded[0]) and not folded[6]._forward_pre_hooks
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[5], nn.Identity)
    assert normlab.is_weight_normalized(model[0])  # the original keeps its parametrization
    x = torch.randn(5, 3, 5, 5, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL)


def test_normprop_layers_become_plain_and_fold() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        normlab.NormPropConv2d(3, 4, 3),
        nn.BatchNorm2d(4),  # folded after as_plain
        normlab.NormPropReLU(),
        nn.Flatten(),
        normlab.NormPropLinear(36, 5),
    ).to(D)
    build_stats(model)
    folded = normlab.fold(model)
    assert type(folded[0]) is nn.Conv2d and type(folded[4]) is nn.Linear
    assert isinstance(folded[1], nn.Identity)
    x = torch.randn(5, 3, 5, 5, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL)


def test_fold_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="fold"):
        normlab.fold("model")  # type: ignore[arg-type]
