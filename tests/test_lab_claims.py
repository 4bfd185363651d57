"""Tests of the claim logic and the measurements of the lab's batch-norm, normprop, weight-norm and whitening
experiments: verdicts follow constructed numbers (REPRODUCED / NOT REPRODUCED / INCONCLUSIVE), and each
measurement function computes what its experiment says it measures."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import normlab

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from normlab.lab.data import Split  # noqa: E402
from normlab.lab.experiments import batch_norm, normprop, weight_norm, whitening  # noqa: E402
from normlab.lab.experiments.common import chosen_rate  # noqa: E402
from normlab.lab.models import mlp, with_norm  # noqa: E402
from normlab.lab.report import INCONCLUSIVE, NOT_CHECKED, NOT_REPRODUCED, REPRODUCED  # noqa: E402
from normlab.lab.train import Context  # noqa: E402

TINY = Context("tiny", progress=False)


def _verdicts(claims: list) -> dict[str, str]:
    return {c.name: c.verdict for c in claims}


_PATTERN = (-1.0, 1.0, -0.5, 0.5, -0.25, 0.25, 0.0, 0.0)  # zero mean over 8 seeds


def _noise(s: int, scale: float) -> float:
    """A fixed per-seed jitter of mean zero over 8 seeds: a difference that carries it has a finite interval."""
    return scale * _PATTERN[s % len(_PATTERN)]


# ------------------------------------------------------------------------------------------ batch-norm
def _bn_cell(acc: float, steps: int, drift: float, loss: float, pop: float = 97.0, ma: float = 97.0) -> dict:
    return {
        "final_train_loss": loss,
        "test_accuracy": acc,
        "accuracy_curve": [acc],
        "steps_to_target": steps,
        "reached_target": acc >= batch_norm.TARGET,
        "drift": drift,
        "percentile_steps": [0, 60],
        "unit0_percentiles": [[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]],
        "population_accuracy": pop,
        "moving_average_accuracy": ma,
    }


def _bn_results(speedup: float, drift_gap: float, bn_top: int, pop_shift: float, seeds: int = 8) -> dict:
    """Tiny-grid results: BN reaches the target ``speedup`` times faster, drifts ``drift_gap`` less, trains up to
    grid index ``bn_top`` (the plain network up to index 0), and population minus moving averages is ``pop_shift``."""
    grid = batch_norm._lrs(TINY)
    outputs = []
    for s in range(seeds):
        j = _noise(s, 0.1)
        none = {
            str(lr): _bn_cell(96.0 if i == 0 else 10.0, 400, 2.0 + j, 0.01 if i == 0 else 2.3)
            for i, lr in enumerate(grid)
        }
        bn = {
            str(lr): _bn_cell(
                97.0 if i <= bn_top else 10.0,
                round(400 / speedup * (1 + j)),
                2.0 - drift_gap,
                0.005 * (i + 1),
                97.0 + pop_shift + j,
                97.0,
            )
            for i, lr in enumerate(grid)
        }
        outputs.append({"none": none, "BN": bn})
    return batch_norm.collect(TINY, outputs)


def test_batch_norm_verdicts_follow_the_numbers() -> None:
    clear = _bn_results(speedup=4.0, drift_gap=1.5, bn_top=2, pop_shift=0.0)
    assert set(_verdicts(batch_norm.claims(clear)).values()) == {REPRODUCED}
    absent = _bn_results(speedup=1.0, drift_gap=0.0, bn_top=0, pop_shift=3.0)
    assert set(_verdicts(batch_norm.claims(absent)).values()) == {NOT_REPRODUCED}
    near = _bn_results(speedup=1.5, drift_gap=batch_norm.MIN_DRIFT_GAP, bn_top=1, pop_shift=batch_norm.POP_MARGIN)
    assert set(_verdicts(batch_norm.claims(near)).values()) == {INCONCLUSIVE}


def test_batch_norm_picks_rates_by_final_loss_and_flags_the_edge() -> None:
    results = _bn_results(speedup=4.0, drift_gap=1.5, bn_top=2, pop_shift=0.0)
    grid = batch_norm._lrs(TINY)
    # none: only the smallest rate trains; BN: the loss grows with the rate, so both choose the smallest rate.
    assert results["settings"]["chosen_learning_rate"] == {"none": grid[0], "BN": grid[0]}
    assert any("edge" in n for n in results["notes"])
    assert any("lower bound" in n for n in results["notes"])  # BN trains at the grid's largest rate
    assert batch_norm.max_trainable_step(results, "BN") == [2.0] * 8
    assert batch_norm.max_trainable_step(results, "none") == [0.0] * 8


def test_batch_norm_steps_to_target_and_drift() -> None:
    assert batch_norm.steps_to([10.0, 50.0, 91.0, 95.0], 5, 90.0, 20) == (15, True)
    assert batch_norm.steps_to([10.0, 50.0], 5, 90.0, 20) == (20, False)  # censored at the run's length
    early = torch.tensor([[-1.0, 0.0], [0.0, 1.0], [1.0, 2.0]])
    assert batch_norm.drift(early, early + torch.tensor([[0.5, -0.5]] * 3)) == pytest.approx(0.5)


def test_batch_norm_sigmoid_input_is_the_training_time_pre_activation() -> None:
    torch.manual_seed(0)
    model = batch_norm.sigmoid_mlp(6, hidden=5, depth=2, num_classes=3)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm1d):
                m.weight.uniform_(0.5, 2.0)
                m.bias.normal_()
    x = torch.randn(40, 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    z = batch_norm.sigmoid_input(model, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # no running statistic moved
    h = torch.sigmoid(model[1](model[0](x)))  # the first hidden layer in training mode
    t = model[3](h)
    var, mean = torch.var_mean(t, dim=0, correction=0)
    expected = (t - mean) / torch.sqrt(var + model[4].eps) * model[4].weight + model[4].bias
    assert torch.allclose(z, expected, atol=1e-5)
    q = batch_norm.percentiles(model, x)
    assert q.shape == (3, 5) and bool((q[0] <= q[1]).all() and (q[1] <= q[2]).all())
    plain = batch_norm._strip(model)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain)
    assert torch.allclose(batch_norm.sigmoid_input(plain, x), plain[2](torch.sigmoid(plain[0](x))))


def test_batch_norm_population_check_is_algorithm_2() -> None:
    torch.manual_seed(0)
    model = batch_norm.sigmoid_mlp(4, hidden=3, depth=1, num_classes=2)
    x = torch.randn(120, 4) * 3 + 1
    y = torch.randint(0, 2, (120,))
    split = Split("toy", x, y, x, y)
    out = batch_norm._population_check(model, split, TINY)
    # Algorithm 2 by hand over the two training batches of 60: the mean of the batch means and
    # m / (m - 1) times the mean of the biased batch variances.
    pre = model[0](x).detach()
    batches = (pre[:60], pre[60:])
    by_hand = copy.deepcopy(model).eval()
    with torch.no_grad():
        by_hand[1].running_mean.copy_(sum(b.mean(0) for b in batches) / 2)
        by_hand[1].running_var.copy_(sum(b.var(0, correction=0) for b in batches) / 2 * 60 / 59)
        expected = 100 * float((by_hand(x).argmax(1) == y).float().mean())
        moving = 100 * float((model.eval()(x).argmax(1) == y).float().mean())
    assert out == {"moving_average_accuracy": pytest.approx(moving), "population_accuracy": pytest.approx(expected)}


# ------------------------------------------------------------------------------------------ normprop
def _np_run(early: float, late: float, total: int = 40) -> dict:
    steps = normprop._record_steps(total)
    dist = [[early] * 3 if s <= normprop.EARLY * total else [late] * 3 for s in steps]
    return {"steps": steps, "distance": dist, "test_accuracy": 95.0, "final_train_loss": 0.05}


def _np_results(bn_early: float, bn_late: float, np_early: float, batch1: float, seeds: int = 8) -> dict:
    outputs = []
    for s in range(seeds):
        j = _noise(s, 0.01)
        out = {label: _np_run(np_early + j, np_early + j) for label in normprop.VARIANTS if "NormProp" in label}
        out |= {bn: _np_run(bn_early, bn_late + j) for bn in normprop.BNS}
        out["batch1"] = {"test_accuracy": batch1 + 100 * j, "final_train_loss": 0.3, "steps": 128}
        outputs.append(out)
    return normprop.collect(TINY, outputs)


def test_normprop_verdicts_follow_the_numbers() -> None:
    clear = _np_results(bn_early=0.5, bn_late=0.05, np_early=0.1, batch1=92.0)
    assert set(_verdicts(normprop.claims(clear)).values()) == {REPRODUCED}
    absent = _np_results(bn_early=0.1, bn_late=0.1, np_early=0.1, batch1=50.0)
    assert set(_verdicts(normprop.claims(absent)).values()) == {NOT_REPRODUCED}
    near = _np_results(
        bn_early=0.2, bn_late=0.2 - normprop.MIN_LAG, np_early=0.2 - normprop.MIN_EARLY, batch1=normprop.BATCH1_FLOOR
    )
    assert set(_verdicts(normprop.claims(near)).values()) == {INCONCLUSIVE}


def test_normprop_windows() -> None:
    run = _np_run(0.4, 0.1, total=40)
    assert normprop._window(run, 0.0, normprop.EARLY) == pytest.approx(0.4)
    assert normprop._window(run, 0.5, 1.0) == pytest.approx(0.1)
    assert normprop._record_steps(40)[:6] == [0, 1, 2, 3, 4, 5]


def test_normprop_measures_the_normalized_input_before_the_affine() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64)
    layer = normlab.NormPropLinear(6, 4, factor=1.21).double()
    with torch.no_grad():
        layer.gain.uniform_(0.5, 2.0)
        layer.bias.normal_()
    w = layer.weight.detach()
    expected = x @ w.T / (1.21 * torch.sqrt((w * w).sum(1)))  # W_i . x / (c ||W_i||), no gamma, no beta
    assert torch.allclose(normprop.normalized_input(layer, x), expected)
    bn = nn.BatchNorm1d(4).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    t = torch.randn(50, 4, dtype=torch.float64)
    assert torch.allclose(normprop.normalized_input(bn, t), (t - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))


def test_normprop_zero_mean_distance_is_scale_free_and_is_bn_lag() -> None:
    torch.manual_seed(0)
    std = normlab.Standardize(torch.zeros(5), torch.ones(5), dim=1)
    x = torch.randn(200, 5) + 0.3
    dist = {}
    for c in (1.0, 1.21):
        torch.manual_seed(1)
        net = nn.Sequential(std, normlab.NormPropLinear(5, 4, factor=c))
        dist[c] = normprop.zero_mean_distance(net, [net[1]], x)
    assert dist[1.0] == pytest.approx(dist[1.21])  # c only scales z
    net, layers = normprop.build("BN m=0.01", normlab.Standardize(torch.zeros(64), torch.ones(64), dim=1))
    assert all(m.momentum == 0.01 for m in layers) and len(layers) == normprop.DEPTH
    bn = nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.5)  # moving average 0.5 behind an input of mean 1.0 and std 2
    t = 1.0 + 2.0 * torch.randn(4000, 4)
    (d,) = normprop.zero_mean_distance(nn.Sequential(bn), [bn], t)
    assert d == pytest.approx(0.25, abs=0.05)  # |1.0 - 0.5| / 2: the lag in units of the input's spread


# ------------------------------------------------------------------------------------------ weight-norm
def _wn_results(init_gain: float, mobn_gain: float, acc_gap: float, seeds: int = 8) -> dict:
    """Run-averaged training losses: plain 0.5 at every rate's best, the WN variants ``gain`` percent lower."""
    grid = weight_norm._lrs(TINY)
    outputs = []
    for s in range(seeds):
        j = _noise(s, 1.0)
        loss = {
            "plain": 0.5,
            "WN": 0.5,
            "WN + init": 0.5 * (1 - (init_gain + j) / 100),
            "WN + mean-only BN": 0.5 * (1 - (mobn_gain + j) / 100),
            "BN": 0.3,
        }
        acc = {v: 96.0 for v in weight_norm.VARIANTS} | {"WN + mean-only BN": 96.0 + acc_gap + 0.3 * j}
        outputs.append(
            {
                v: {
                    str(lr): {
                        "mean_train_loss": loss[v] * (1 + i),
                        "final_train_loss": 0.01,
                        "test_accuracy": acc[v],
                        "curve": [loss[v]],
                        "step_ms": 1.0,
                    }
                    for i, lr in enumerate(grid)
                }
                for v in weight_norm.VARIANTS
            }
        )
    return weight_norm.collect(TINY, outputs)


def test_weight_norm_verdicts_follow_the_numbers() -> None:
    clear = _wn_results(init_gain=30.0, mobn_gain=40.0, acc_gap=0.0)
    assert set(_verdicts(weight_norm.claims(clear)).values()) == {REPRODUCED}
    absent = _wn_results(init_gain=0.0, mobn_gain=-5.0, acc_gap=-3.0)
    assert set(_verdicts(weight_norm.claims(absent)).values()) == {NOT_REPRODUCED}
    near = _wn_results(init_gain=weight_norm.MIN_FASTER, mobn_gain=weight_norm.MIN_FASTER, acc_gap=weight_norm.MARGIN)
    assert set(_verdicts(weight_norm.claims(near)).values()) == {INCONCLUSIVE}
    assert clear["settings"]["chosen_learning_rate"]["plain"] == weight_norm._lrs(TINY)[0]
    assert any("edge" in n for n in clear["notes"])


def test_weight_norm_diverged_everywhere_is_not_checked() -> None:
    results = _wn_results(init_gain=30.0, mobn_gain=40.0, acc_gap=0.0)
    for cells in results["cells"]["plain"].values():
        for c in cells:
            c["mean_train_loss"] = None
    results["settings"]["chosen_learning_rate"]["plain"] = chosen_rate(results["cells"]["plain"], "mean_train_loss")[0]
    verdicts = _verdicts(weight_norm.claims(results))
    assert verdicts["WN+init: faster than plain"] == NOT_CHECKED
    assert verdicts["WN+MOBN matches BN"] == REPRODUCED


def test_weight_norm_mean_only_variant_is_initialized_and_scale_free() -> None:
    torch.manual_seed(0)
    batch = torch.randn(64, 1, 8, 8)
    model = weight_norm._build("WN + mean-only BN", 4, batch)
    norms = [m for m in model.modules() if isinstance(m, normlab.NormBase)]
    assert len(norms) == 3 and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert all(int(m.num_batches_tracked) == 0 and float(m.running_mean.abs().max()) == 0.0 for m in norms)
    seen = []
    handles = [m.register_forward_hook(lambda _m, _i, o: seen.append(o)) for m in norms]
    with torch.no_grad():
        model.train()(batch)
    for h in handles:
        h.remove()
    for out in seen:  # the data-dependent init: zero-mean, unit-variance pre-activations on the init batch
        var, mean = torch.var_mean(out, dim=(0, 2, 3), correction=0)
        assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
        assert torch.allclose(var, torch.ones_like(var), atol=1e-3)


# ------------------------------------------------------------------------------------------ whitening
def _wh_results(cond: dict[str, float], loss: dict[str, float], seeds: int = 8) -> dict:
    grid = whitening._lrs(TINY)
    outputs = []
    for s in range(seeds):
        j = _noise(s, 0.02)
        outputs.append(
            {
                v: {
                    str(lr): {
                        "diverged": False,
                        "mean_train_loss": loss[v] * (1 + (j if v == "DBN-zca16" else 0)),
                        "final_train_loss": 0.01,
                        "curve": [loss[v]],
                        "cond_curve": [cond[v]],
                        "final_cond": cond[v] + (j if v in ("BN", "DBN-zca4") else 0),
                        "test_accuracy": 97.0,
                    }
                    for lr in grid
                }
                for v in whitening.VARIANTS
            }
        )
    return whitening.collect(TINY, outputs)


def test_whitening_verdicts_follow_the_numbers() -> None:
    cond = {"BN": 2.5, "DBN-zca4": 2.3, "DBN-zca16": 1.8, "DBN-zca64": 0.9, "DBN-pca16": 2.0}
    loss = {"BN": 0.1, "DBN-zca4": 0.1, "DBN-zca16": 0.05, "DBN-zca64": 0.3, "DBN-pca16": 2.3}
    assert set(_verdicts(whitening.claims(_wh_results(cond, loss))).values()) == {REPRODUCED}
    flat = dict.fromkeys(cond, 2.0)
    same = dict.fromkeys(loss, 0.1)
    assert set(_verdicts(whitening.claims(_wh_results(flat, same))).values()) == {NOT_REPRODUCED}
    step = math.log10(whitening.COND_FACTOR)
    near_cond = {"BN": 2.0 + step, "DBN-zca4": 2.0 + step, "DBN-zca16": 2.0, "DBN-zca64": 2.0, "DBN-pca16": 2.0}
    f = 1 - whitening.MIN_FASTER / 100
    near_loss = {"BN": 0.1, "DBN-zca4": 0.1, "DBN-zca16": 0.1 * f, "DBN-zca64": 0.1, "DBN-pca16": 0.1}
    assert set(_verdicts(whitening.claims(_wh_results(near_cond, near_loss))).values()) == {INCONCLUSIVE}


def test_whitening_log10_condition_on_a_known_covariance() -> None:
    torch.manual_seed(0)
    z = torch.randn(20000, 3, dtype=torch.float64)
    z = (z - z.mean(0)) @ torch.linalg.inv_ex(torch.linalg.cholesky(torch.cov(z.T)))[0].T  # exactly white
    x = z * torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64)
    assert whitening.log10_condition(x) == pytest.approx(2.0, abs=1e-6)
    dead = torch.cat([x, torch.zeros(20000, 1, dtype=torch.float64)], 1)  # a dead unit is left out
    assert whitening.log10_condition(dead) == pytest.approx(2.0, abs=1e-6)
    assert math.isnan(whitening.log10_condition(x * float("nan")))


def test_whitening_conditioning_is_measured_at_the_next_layer_input() -> None:
    torch.manual_seed(0)
    model = with_norm(mlp(8, 4, 1, 3), "bn")  # Flatten, Linear, BN, ReLU, Linear
    with torch.no_grad():  # independent channels; BN's affine scales them 1 : 10 : 1 : 1
        model[1].weight.copy_(torch.eye(4, 8))
        model[1].bias.zero_()
        model[2].weight.copy_(torch.tensor([1.0, 10.0, 1.0, 1.0]))
        model[2].bias.copy_(torch.tensor([100.0, 100.0, 0.0, 100.0]))  # channel 2 goes through the ReLU
    probe = torch.randn(8192, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    value = whitening.next_layer_conditioning(model, probe, 2048)
    # The classifier's input has variances 1, 100, var(ReLU(z)) = (1 - 1/pi) / 2, 1; the BN output's
    # own would be 1, 100, 1, 1 (log10 cond 2).
    assert value == pytest.approx(math.log10(100 / (0.5 * (1 - 1 / math.pi))), abs=0.05)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no running statistic moved
