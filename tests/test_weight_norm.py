"""Weight normalization against references written from Salimans & Kingma (2016)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

from normlab import clip_weight_norm_, init_weight_norm, is_weight_normalized, remove_weight_norm, weight_norm
from normlab.weight_norm import WeightNorm, norm_except_dim, normalized_weight

F64 = torch.float64


def explicit_wn(g: torch.Tensor, v: torch.Tensor, dim: int | None) -> torch.Tensor:
    """w = g * v / ||v||, one output unit at a time (``dim=None``: one norm for the whole tensor)."""
    if dim is None:
        return g * v / math.sqrt(float((v * v).sum()))
    w = torch.empty_like(v)
    for i in range(v.shape[dim]):
        vi = v.select(dim, i)
        w.select(dim, i).copy_(g.reshape(-1)[i] * vi / math.sqrt(float((vi * vi).sum())))
    return w


def layers() -> list[tuple[nn.Module, int | None, tuple[int, ...]]]:
    return [
        (nn.Linear(5, 4, dtype=F64), 0, (3, 5)),
        (nn.Conv2d(3, 4, 3, dtype=F64), 0, (2, 3, 5, 5)),
        (nn.Conv1d(3, 6, 2, groups=3, dtype=F64), 0, (2, 3, 5)),
        (nn.ConvTranspose2d(3, 4, 3, dtype=F64), 1, (2, 3, 4, 4)),
        (nn.Conv2d(3, 4, 3, dtype=F64), None, (2, 3, 5, 5)),
    ]


@pytest.mark.parametrize("case", range(5))
def test_forward_is_g_v_over_norm(case: int) -> None:
    torch.manual_seed(case)
    layer, dim, xshape = layers()[case]
    x = torch.randn(xshape, dtype=F64)
    before = layer(x)
    weight_norm(layer, dim=dim)
    # Registration keeps the function: g starts at ||w||.
    torch.testing.assert_close(layer(x), before)
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1
    with torch.no_grad():
        g.uniform_(0.5, 2.0)
        v.normal_()
    torch.testing.assert_close(layer.weight, explicit_wn(g.detach(), v.detach(), dim), rtol=1e-12, atol=1e-12)


def test_gradcheck() -> None:
    torch.manual_seed(0)
    for dim, shape in ((0, (4, 3, 2)), (1, (3, 4, 2)), (None, (4, 3)), (0, (5,))):
        p = WeightNorm(dim)
        v = torch.randn(shape, dtype=F64, requires_grad=True)
        g = (norm_except_dim(v.detach(), dim) + 0.5).requires_grad_(True)
        assert torch.autograd.gradcheck(p, (g, v))
    # A gain that broadcasts (one for all units) takes the general path for dim=0, too.
    v = torch.randn(4, 3, dtype=F64, requires_grad=True)
    g = torch.tensor([[1.5]], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, v: normalized_weight(v, g, 0), (g, v))
    torch.testing.assert_close(normalized_weight(v, g, 0), explicit_wn(g.expand(4, 1), v.detach(), 0))
    p = WeightNorm(0, log_gain_factor=3.0)
    v = torch.randn(4, 3, dtype=F64, requires_grad=True)
    s = (0.1 * torch.randn(4, 1, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(p, (s, v))


@pytest.mark.parametrize("case", range(5))
def test_state_dict_interchange_with_torch(case: int) -> None:
    torch.manual_seed(10 + case)
    base, dim, xshape = layers()[case]
    x = torch.randn(xshape, dtype=F64)
    ours = weight_norm(base, dim=dim)
    with torch.no_grad():
        ours.parametrizations.weight.original0.mul_(1.7)
    twin, _, _ = layers()[case]
    theirs = parametrizations.weight_norm(twin, dim=dim)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert all(ours.state_dict()[k].shape == v.shape for k, v in theirs.state_dict().items())
    # ours -> torch's
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(theirs(x), ours(x))
    # torch's -> ours
    with torch.no_grad():
        theirs.parametrizations.weight.original0.mul_(0.3)
        theirs.parametrizations.weight.original1.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(ours(x), theirs(x))


def test_log_gain() -> None:
    torch.manual_seed(1)
    layer = weight_norm(nn.Linear(4, 3, dtype=F64), log_gain_factor=3.0)
    s = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1
    with torch.no_grad():
        s.normal_(0, 0.1)
    expected = explicit_wn(torch.exp(3.0 * s.detach()), v.detach(), 0)
    torch.testing.assert_close(layer.weight, expected)
    # A fresh registration keeps the weight: s = log(||w||) / c.
    plain = nn.Linear(4, 3, dtype=F64)
    w0 = plain.weight.detach().clone()
    weight_norm(plain, log_gain_factor=2.0)
    torch.testing.assert_close(plain.weight, w0)


def test_zero_direction_raises_then_never_nan() -> None:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight[1].zero_()
    with pytest.raises(ValueError, match="all-zero"):
        weight_norm(layer)
    assert not is_weight_normalized(layer)
    layer = weight_norm(nn.Linear(3, 2))
    with torch.no_grad():
        layer.parametrizations.weight.original1[0].zero_()
    w = layer.weight
    assert torch.isfinite(w).all() and torch.equal(w[0], torch.zeros(3))
    out = layer(torch.randn(4, 3))
    out.sum().backward()
    assert torch.isfinite(layer.parametrizations.weight.original1.grad).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dim"):
        weight_norm(nn.Linear(3, 2), dim=2)
    with pytest.raises(ValueError, match="dim"):
        weight_norm(nn.Linear(3, 2), dim=-1)
    with pytest.raises(ValueError, match="log_gain_factor"):
        weight_norm(nn.Linear(3, 2), log_gain_factor=0)
    with pytest.raises(ValueError, match="'kernel'"):
        weight_norm(nn.Linear(3, 2), name="kernel")
    layer = weight_norm(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="already"):
        weight_norm(layer)
    with pytest.raises(ValueError, match="not weight-normalized"):
        remove_weight_norm(nn.Linear(3, 2))


# ----------------------------------------------------------------------------------- initialization
def mlp(depth: int = 6, width: int = 32) -> nn.Sequential:
    mods: list[nn.Module] = []
    fan_in = 10
    for _ in range(depth):
        mods += [weight_norm(nn.Linear(fan_in, width, dtype=F64)), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*mods, weight_norm(nn.Linear(width, 3, dtype=F64)))


def cnn() -> nn.Sequential:
    return nn.Sequential(
        weight_norm(nn.Conv2d(3, 8, 3, padding=1, dtype=F64)),
        nn.ReLU(),
        parametrizations.weight_norm(nn.Conv2d(8, 8, 3, stride=2, dtype=F64)),  # torch's, too
        nn.ELU(),
        weight_norm(nn.ConvTranspose2d(8, 6, 2, dtype=F64), dim=1),
        nn.ReLU(),
        weight_norm(nn.Conv2d(6, 4, 1, bias=True, dtype=F64), log_gain_factor=3.0),
        nn.Flatten(),
        weight_norm(nn.Linear(4 * 6 * 6, 5, dtype=F64)),
    )


def preactivations(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
    """Every weight-normalized layer's output in a plain forward pass."""
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [
        m.register_forward_hook(lambda m, a, out: seen.append((m, out.detach())))
        for m in model.modules()
        if is_weight_normalized(m)
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("build,shape", [(mlp, (64, 10)), (cnn, (16, 3, 12, 12))])
def test_init_standardizes_every_preactivation(build, shape) -> None:  # noqa: ANN001
    torch.manual_seed(2)
    model = build()
    x = torch.randn(shape, dtype=F64) * 2 + 0.5
    names = init_weight_norm(model, x)
    assert len(names) == sum(is_weight_normalized(m) for m in model.modules())
    assert names == sorted(names, key=lambda n: int(n.split(".")[0]))  # forward order
    outs = preactivations(model, x)  # a fresh forward with the initialized parameters
    for module, out in outs:
        axis = out.dim() - 1 if isinstance(module, nn.Linear) else 1
        flat = out.movedim(axis, 0).reshape(out.shape[axis], -1)
        # mean exactly 0; std sqrt(var / (var + eps)) with eps = 1e-6 and var = O(0.1) here
        assert flat.mean(1).abs().max().item() < 1e-10
        assert (flat.std(1, correction=0) - 1).abs().max().item() < 1e-4


def test_init_on_a_different_batch_is_only_approximately_standard() -> None:
    torch.manual_seed(3)
    model = mlp(depth=3, width=64)
    init_weight_norm(model, torch.randn(512, 10, dtype=F64))
    for _, out in preactivations(model, torch.randn(512, 10, dtype=F64))[:-1]:
        assert out.mean(0).abs().max().item() < 0.5
        assert (out.std(0) - 1).abs().max().item() < 0.5


def test_init_shared_layer_initialized_once_and_errors_restore() -> None:
    torch.manual_seed(4)
    shared = weight_norm(nn.Linear(6, 6, dtype=F64))
    model = nn.Sequential(shared, nn.Tanh(), shared)
    assert init_weight_norm(model, torch.randn(32, 6, dtype=F64)) == ["0"]
    # A layer with one gain for the whole weight cannot be initialized per unit: error, nothing changed.
    bad = nn.Sequential(weight_norm(nn.Linear(4, 5, dtype=F64)), weight_norm(nn.Linear(5, 3, dtype=F64), dim=None))
    before = {k: v.clone() for k, v in bad.state_dict().items()}
    with pytest.raises(ValueError, match="one gain per output unit"):
        init_weight_norm(bad, torch.randn(8, 4, dtype=F64))
    for k, v in bad.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="none"):
        init_weight_norm(nn.Linear(3, 3), torch.randn(4, 3))


def test_init_accepts_keyword_batches() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = weight_norm(nn.Linear(3, 4, dtype=F64))

        def forward(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
            return self.a(x + shift)

    model = Two()
    assert init_weight_norm(model, {"x": torch.randn(16, 3, dtype=F64), "shift": 1.0}) == ["a"]


# ----------------------------------------------------------------------------------- norm bound and removal
def test_norm_grows_under_sgd_and_clip_bounds_it_without_changing_outputs() -> None:
    torch.manual_seed(5)
    model = mlp(depth=2, width=16)
    x = torch.randn(32, 10, dtype=F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    norms0 = [m.parametrizations.weight.original1.norm(dim=1) for m in model.modules() if is_weight_normalized(m)]
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    norms1 = [m.parametrizations.weight.original1.norm(dim=1) for m in model.modules() if is_weight_normalized(m)]
    # Gradient steps are orthogonal to v (section 2.1): ||v|| never decreases.
    assert all((b >= a - 1e-12).all() for a, b in zip(norms0, norms1))
    before = model(x)
    everything = torch.cat(norms1)
    lo, hi = everything.quantile(0.25).item(), everything.quantile(0.75).item()
    expected = sum(int(((n > hi) | (n < lo)).sum()) for n in norms1)
    assert clip_weight_norm_(model, max_norm=hi, min_norm=lo) == expected > 0
    for m in model.modules():
        if is_weight_normalized(m):
            n = m.parametrizations.weight.original1.norm(dim=1)
            assert (n <= hi * (1 + 1e-12)).all() and (n >= lo * (1 - 1e-12)).all()
    torch.testing.assert_close(model(x), before)
    with pytest.raises(ValueError, match="min_norm <= max_norm"):
        clip_weight_norm_(model, max_norm=1.0, min_norm=2.0)
    with pytest.raises(ValueError, match="neither"):
        clip_weight_norm_(model)


def test_clip_leaves_zero_units() -> None:
    layer = weight_norm(nn.Linear(3, 2))
    with torch.no_grad():
        layer.parametrizations.weight.original1[0].zero_()
    assert clip_weight_norm_(layer, min_norm=5.0) == 1
    v = layer.parametrizations.weight.original1
    assert torch.equal(v[0], torch.zeros(3)) and abs(v[1].norm().item() - 5.0) < 1e-5


@pytest.mark.parametrize("ours", [True, False])
def test_remove_weight_norm_gives_plain_layer(ours: bool) -> None:
    torch.manual_seed(6)
    layer = nn.Conv2d(3, 4, 3, dtype=F64)
    layer = weight_norm(layer) if ours else parametrizations.weight_norm(layer)
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(2.5)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    y = layer(x)
    plain = remove_weight_norm(layer)
    assert type(plain) is nn.Conv2d and not is_weight_normalized(plain)
    assert set(plain.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(plain(x), y)


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 5),
    fan=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    scale=st.floats(1e-3, 1e3),
)
def test_property_unit_norm_direction(out: int, fan: list[int], scale: float) -> None:
    v = torch.randn(out, *fan, dtype=F64) * scale
    g = torch.rand(out, *([1] * len(fan)), dtype=F64) + 0.1
    w = WeightNorm(0)(g, v)
    norms = w.reshape(out, -1).norm(dim=1)
    torch.testing.assert_close(norms, g.reshape(-1))
    # w is invariant to the scale of v (what makes clipping ||v|| harmless).
    torch.testing.assert_close(WeightNorm(0)(g, v * 7.0), w)
