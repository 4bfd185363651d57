"""A training batch with non-finite statistics never reaches a layer's state (``on_nonfinite``).

One NaN, Inf or overflowing batch (mixed-precision training meets them) used to poison the running
statistics, BatchRenorm's corrections, CBN's window and DBN's whitening matrix for good. Now its
output is returned as torch's BatchNorm would return it, the layer warns once, its state is untouched
and it trains on normally; ``on_nonfinite="raise"`` raises instead.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import normlab
from _shared import STAT_KINDS, make_norm

GUARDED = [k for k in STAT_KINDS if k != "torch"]  # torch's own BatchNorm is torch's business
BAD = {"nan": float("nan"), "inf": float("inf"), "overflow": 1e20}


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _batch(seed: int, bad: float | None = None) -> torch.Tensor:
    x = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(seed))
    if bad is not None:
        x[2, 1, 0, 0] = bad
    return x


def _trained(kind: str) -> nn.Module:
    layer = make_norm(kind, 6).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unpaired CBN says so
        for s in range(4):
            layer(_batch(s))
    return layer


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("kind", GUARDED)
def test_nonfinite_batch_leaves_state_and_training_intact(kind, bad):
    layer = _trained(kind)
    before = _state(layer)
    x = _batch(10, BAD[bad])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
        layer(_batch(11, BAD[bad]))
    nonfinite = [w for w in caught if issubclass(w.category, RuntimeWarning) and "non-finite" in str(w.message)]
    if bad == "overflow" and not nonfinite:
        # 1e20 overflows float32 only where squared: MeanOnlyBatchNorm takes no square, and
        # GhostBatchNorm's variance of a small ghost batch (torch.var_mean) stays below float32's max.
        # Finite statistics need no guard; the layer must still train on.
        assert kind in ("mobn", "ghost")
        assert all(torch.isfinite(layer(_batch(30 + s))).all() for s in range(5))
        return
    assert len(nonfinite) == 1 and type(layer).__name__ in str(nonfinite[0].message)  # warned once
    for k, v in _state(layer).items():
        assert torch.equal(v, before[k]), k
    assert y.shape == x.shape
    # The output is what it is, as with torch's BatchNorm: the channel with the bad value is not finite
    # (for DBN, its whitening group), the others are normalized as usual.
    if bad != "overflow" and kind != "dbn":
        assert not torch.isfinite(y[:, 1]).all() and torch.isfinite(y[:, 0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = [layer(_batch(20 + s)) for s in range(20)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert not torch.equal(layer.state_dict()["running_mean"], before["running_mean"])  # it trains on


@pytest.mark.parametrize("kind", GUARDED)
def test_on_nonfinite_raise(kind):
    layer = _trained(kind)
    layer.configure(on_nonfinite="raise")
    before = _state(layer)
    with pytest.raises(ValueError, match=f"{type(layer).__name__}: a training batch gave non-finite statistics"):
        layer(_batch(10, float("nan")))
    for k, v in _state(layer).items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="on_nonfinite"):
        layer.configure(on_nonfinite="ignore")


def test_setting_is_carried_by_convert_and_sync():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), normlab.BatchRenorm(4))
    model[1].configure(on_nonfinite="raise")
    for converted in (normlab.convert(model, "cbn", window=2), normlab.sync(model), normlab.convert(model, "bn")):
        norm = converted[1]
        if isinstance(norm, normlab.base.ToolState):
            assert norm.on_nonfinite == "raise"


def test_batchnorm_stores_what_torch_stores_bit_for_bit():
    torch.manual_seed(0)
    for momentum in (0.1, None):
        ours = normlab.BatchNorm(5, momentum=momentum, dtype=torch.float64)
        ref = nn.BatchNorm2d(5, momentum=momentum, dtype=torch.float64)
        for _ in range(4):
            x = torch.randn(4, 5, 3, 3, dtype=torch.float64) * 2 + 1
            assert torch.equal(ours(x), ref(x))
        for k, v in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k


@pytest.mark.parametrize("kind", ["brn", "cbn", "dbn"])
def test_momentum_none_running_mean_in_float64_matches_torch(kind):
    torch.manual_seed(0)
    options = {"brn": {"r_max": 1.0, "d_max": 0.0}, "cbn": {"window": 1}, "dbn": {"group_size": 1}}[kind]
    layer = make_norm(kind, 4, dims=1, momentum=None, dtype=torch.float64, **options)
    ref = nn.BatchNorm1d(4, momentum=None, dtype=torch.float64)
    for _ in range(7):
        x = torch.randn(16, 4, dtype=torch.float64) * 3 + 1
        layer(x)
        ref(x)
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- checks before state
@pytest.mark.parametrize("kind", GUARDED)
def test_wrong_dtype_input_is_refused_before_any_counter_moves(kind):
    layer = _trained(kind)
    before = _state(layer)
    with pytest.raises(ValueError, match=f"{type(layer).__name__}: expected an input of dtype torch.float32"):
        layer(_batch(5).double())
    for k, v in _state(layer).items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", ["brn", "cbn", "dbn"])
def test_eps_zero_is_refused_where_the_layer_divides(kind):
    with pytest.raises(ValueError, match="expected eps > 0"):
        make_norm(kind, 4, eps=0.0)
    make_norm("mobn", 4, eps=0.0)  # divides by nothing


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("kind", GUARDED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_module_trains_and_evaluates(kind, dtype):
    layer = make_norm(kind, 6).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in range(3):  # CBN: burn-in-free window of 3, so windowed from the second step
            y = layer(_batch(s).to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all()
        layer.eval()
        y = layer(_batch(9).to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    # normlab's statistics stay float32; normlab.BatchNorm is torch's layer and casts them as torch does.
    assert layer.running_mean.dtype == (dtype if kind == "bn" else torch.float32)


@pytest.mark.parametrize("kind", GUARDED)
def test_bf16_autocast_trains_like_float32(kind):
    """Under autocast the layer sees a bfloat16 input (a conv's output) and computes as without it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    layer = make_norm(kind, 6)
    ref = make_norm(kind, 6)
    x = torch.randn(8, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = conv(x)
            y = layer(h)
        y.float().square().mean().backward()
        want = ref(h.detach().float())
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- loads and tools
def _paired_cbn() -> tuple[nn.Module, nn.Module]:
    conv = nn.Conv2d(3, 4, 3)
    layer = normlab.CrossIterationBatchNorm(4, window=3).attach(conv)
    for s in range(5):
        layer(conv(torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(s))))
    return conv, layer


def test_cbn_window_and_counters_survive_failed_and_partial_loads():
    _, layer = _paired_cbn()
    window = {k: v.clone() for k, v in layer.state_dict().items() if k.startswith("window") or k == "num_steps"}
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(nn.BatchNorm2d(5).state_dict())
    layer.load_state_dict({"weight": torch.ones(4), "bias": torch.zeros(4)}, strict=False)
    for k, v in window.items():
        assert torch.equal(layer.state_dict()[k], v), k
    steps = int(layer.num_batches_tracked)
    layer.load_state_dict({"weight": torch.ones(4)}, strict=False)
    assert int(layer.num_batches_tracked) == steps  # as torch: a partial state dict keeps the count
    # A BatchNorm checkpoint is a different thing: its statistics load and the window starts afresh.
    layer.load_state_dict(nn.BatchNorm2d(4).state_dict())
    assert int(layer.window_count) == 0 and int(layer.num_steps) == 0


def test_partial_state_dict_keeps_batch_renorm_schedule():
    layer = normlab.BatchRenorm(4, **normlab.paper_schedule(scale=1e-3))
    for _ in range(7):
        layer(torch.randn(8, 4))
    limits = layer.limits()
    layer.load_state_dict({"weight": torch.ones(4), "bias": torch.zeros(4)}, strict=False)
    assert int(layer.num_batches_tracked) == 7 and layer.limits() == limits
    ref = nn.BatchNorm1d(4)
    ref.num_batches_tracked.fill_(7)
    ref.load_state_dict({"weight": torch.ones(4), "bias": torch.zeros(4)}, strict=False)
    assert int(ref.num_batches_tracked) == 7  # what torch does


@pytest.mark.parametrize("kind", STAT_KINDS)
def test_load_statistics_validates_before_writing(kind):
    layer = make_norm(kind, 4, dims=1)
    before = _state(layer)
    keeps_var = layer.running_var is not None
    cases = [
        (torch.tensor(0.5), torch.ones(4), "mean of shape \\(4,\\)"),
        (torch.full((4,), float("nan")), torch.ones(4), "finite mean"),
    ]
    if keeps_var and kind != "dbn":
        cases += [
            (torch.zeros(4), torch.ones(3), "variance of shape \\(4,\\)"),
            (torch.zeros(4), -torch.ones(4), "variance >= 0"),
            (torch.zeros(4), torch.tensor([1.0, float("inf"), 1.0, 1.0]), "finite variance"),
        ]
    for mean, var, message in cases:
        if kind == "dbn":
            var = torch.eye(4).expand(1, 4, 4)
            message = "mean of shape" if mean.dim() == 0 else "finite"
        with pytest.raises(ValueError, match=message):
            normlab.base.load_statistics(layer, mean, var)
        for k, v in _state(layer).items():
            assert torch.equal(v, before[k]), k


def test_init_weight_norm_refuses_a_non_finite_batch():
    model = nn.Sequential(normlab.weight_norm(nn.Linear(4, 5)), nn.ReLU(), normlab.weight_norm(nn.Linear(5, 2)))
    before = _state(model)
    x = torch.randn(32, 4)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="init_weight_norm: expected finite pre-activations"):
        normlab.init_weight_norm(model, x)
    for k, v in _state(model).items():
        assert torch.equal(v, before[k]), k


def test_newton_warns_on_a_rank_deficient_covariance():
    layer = normlab.DecorrelatedBatchNorm(8, group_size=8, method="newton")
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        layer(torch.randn(6, 8))  # 6 samples for a group of 8 channels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normlab.DecorrelatedBatchNorm(8, group_size=8, method="newton")(torch.randn(32, 8))
        normlab.DecorrelatedBatchNorm(8, group_size=8)(torch.randn(6, 8))  # zca: exact at any rank


# ----------------------------------------------------------------------------- torch's conventions
@pytest.mark.parametrize("kind", GUARDED)
def test_bias_false_as_torch(kind):
    """torch >= 2.13's BatchNorm(bias=False): a learnable scale, no shift; convert keeps it."""
    src = nn.BatchNorm2d(6)
    try:
        src = nn.BatchNorm2d(6, bias=False)
    except TypeError:
        pytest.skip("this torch's BatchNorm has no bias keyword")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = normlab.convert(nn.Sequential(src), kind if kind != "bn" else "bn")[0]
        if kind not in ("bn",):
            assert type(layer)(6, bias=False).bias is None
        assert layer.bias is None and layer.weight is not None and "bias=False" in repr(layer)
        y = layer(_batch(0))
        y.square().mean().backward()
    assert layer.weight.grad is not None
    assert "bias" not in layer.state_dict()


def test_empty_batch():
    y = normlab.BatchNorm(6)(torch.randn(0, 6, 3, 3))  # as torch's layer: an empty output
    assert y.shape == (0, 6, 3, 3)
    for kind in ("brn", "dbn", "mobn"):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            make_norm(kind, 6)(torch.randn(0, 6, 3, 3))


def test_messages_name_the_tool_and_the_way_out():
    with pytest.warns(UserWarning, match="source='gn'"):
        normlab.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), "bn")
    with pytest.warns(UserWarning, match="^adapt: the model has no normalization layer"):
        normlab.adapt(nn.Linear(3, 3), [torch.randn(4, 3)])
