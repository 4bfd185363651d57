"""normprop: Normalization Propagation (Arpit et al., "Normalization Propagation: A Parametric
Technique for Removing Internal Covariate Shift in Deep Networks", ICML 2016, arXiv 1603.01431)
against BN's validation-time estimates, and NormProp at batch size 1.

The paper's point: BN normalizes validation data with moving averages of minibatch statistics,
which lag the shifting parameters, especially early in training; NormProp normalizes with the
weights alone (``W_i . x / (c ||W_i||)``, no batch statistics), so its hidden-layer inputs on
validation data stay near zero mean from the first step. What is measured, per hidden unit, on the
test images (the validation set) in eval mode, every few steps from initialization on:

* NormProp: ``z = W_i . x / (c ||W_i||)``, the pre-activation before the learned gain and bias;
* BN: ``x_hat = (t - running_mean) / sqrt(running_var + eps)``, also before BN's affine.

The distance from zero mean is ``|mean(z)| / std(z)`` over the validation images (scale-free: ``c``
scales ``z`` by ``1 / c``), averaged over units and the three hidden layers. For BN it is exactly
the lag of the moving-average mean behind the layer input's current validation mean, in units of
its spread: the lag is measured explicitly.

Networks: MLPs of 3 hidden layers (64 units) on scikit-learn's digits (64 pixels) behind the same
per-pixel standardization with dataset statistics (:class:`normlab.normprop.Standardize`, the
paper's input step): NormProp (``NormPropLinear -> NormPropReLU``) with Algorithm 1's ``c = 1.21``
and, as an ablation, the derivation's ``c = 1``; BN (``Linear -> BatchNorm1d -> ReLU``) with moving
averages of momentum 0.1 (torch's default) and 0.01 (a slower average, closer to the long
averages the paper's point is about). Same initial weights (the BN network's and NormProp's
networks drawn after seeding with the repetition's seed), minibatch order and SGD settings per seed; NormProp also
trains at batch size 1 for one epoch, where BN cannot normalize.

Claims (paired over seeds, 95 % Student-t intervals, minimum effects fixed here):

1. *zero mean early, vs BN momentum 0.1* and 2. *vs BN momentum 0.01*: over the first
   :data:`EARLY` of training, BN's distance from zero mean exceeds NormProp's (``c = 1.21``) by
   more than :data:`MIN_EARLY` standard deviations.
3. *BN's estimates lag early*: BN's distance from zero mean over the first :data:`EARLY` of training
   exceeds that over the second half by more than :data:`MIN_LAG` (both momenta).
4. *NormProp trains at batch size 1*: its test accuracy after one epoch at batch size 1 exceeds
   :data:`BATCH1_FLOOR` % (chance is 10 %).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab import normprop

from ..data import Split, digits, subset
from ..models import mlp, run_with_hooks, with_norm
from ..report import Claim, pyplot
from ..stats import Interval, mean_interval, paired_interval
from ..train import Context, TrainConfig, count_steps, evaluate, fit
from . import Experiment
from .common import save, save_effects

HIDDEN, DEPTH = 64, 3
BATCH, LR, BATCH1_LR = 32, 0.05, 0.05 / 32
VARIANTS = {  # label: (kind, c for NormProp / momentum for BN)
    "NormProp c=1.21": ("normprop", normprop.PAPER_FACTOR),
    "NormProp c=1": ("normprop", 1.0),
    "BN m=0.1": ("bn", 0.1),
    "BN m=0.01": ("bn", 0.01),
}
NORMPROP = "NormProp c=1.21"
BNS = ("BN m=0.1", "BN m=0.01")
EARLY = 0.1  # the first tenth of the steps is "early training"
MIN_EARLY = 0.1  # claims 1, 2: BN's early distance from zero mean minus NormProp's, in standard deviations
MIN_LAG = 0.1  # claim 3: BN's early minus late distance from zero mean, in standard deviations
BATCH1_FLOOR = 80.0  # claim 4: NormProp's test accuracy (%) after one epoch at batch size 1


def _normprop_net(std: nn.Module, factor: float) -> nn.Sequential:
    layers: list[nn.Module] = [std, nn.Flatten()]
    width = 64
    for _ in range(DEPTH):
        layers += [normprop.NormPropLinear(width, HIDDEN, factor=factor), normprop.NormPropReLU()]
        width = HIDDEN
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def build(label: str, std: nn.Module) -> tuple[nn.Sequential, list[nn.Module]]:
    """The network ``label`` of :data:`VARIANTS` and its normalizing modules (NormPropLinear or BatchNorm1d)."""
    kind, value = VARIANTS[label]
    if kind == "normprop":
        net = _normprop_net(std, value)
        return net, [m for m in net if isinstance(m, normprop.NormPropLinear)]
    net = with_norm(nn.Sequential(std, mlp(64, HIDDEN, DEPTH, 10)), "bn")
    layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    for m in layers:
        m.momentum = value
    return net, layers


def normalized_input(module: nn.Module, x: Tensor) -> Tensor:
    """The normalized pre-activation a layer computes from its input ``x``, before its learned affine.

    NormPropLinear: ``W_i . x / (c ||W_i||)``; BatchNorm1d (eval): ``(x - running_mean) / sqrt(running_var + eps)``.
    """
    if isinstance(module, nn.modules.batchnorm._BatchNorm):  # (normlab.BatchNorm too, under torchrun)
        return (x - module.running_mean) / torch.sqrt(module.running_var + module.eps)
    w = module.weight
    return F.linear(x, w / (module.factor * w.norm(dim=1, keepdim=True).clamp_min(module.eps)))


@torch.no_grad()
def zero_mean_distance(model: nn.Module, layers: list[nn.Module], x: Tensor) -> list[float]:
    """Per layer, the mean over units of ``|mean| / std`` of the normalized input over ``x`` (eval mode)."""
    was = model.training
    model.eval()
    out: list[float] = []

    def hook(m: nn.Module, args: tuple[Tensor, ...], _out: Tensor) -> None:
        var, mean = torch.var_mean(normalized_input(m, args[0]).double(), dim=0, correction=0)
        out.append(float((mean.abs() / var.sqrt().clamp_min(1e-12)).mean()))

    try:
        run_with_hooks(model, x, layers, hook)
    finally:
        model.train(was)
    return out


def _split(ctx: Context) -> Split:
    split = digits()
    if ctx.preset == "tiny":
        split = subset(split, 128, 64)
    return Split(split.name, split.x_train.flatten(1), split.y_train, split.x_test.flatten(1), split.y_test)


def _epochs(ctx: Context) -> int:
    return ctx.pick(1, 6, 20)


def _record_steps(total: int) -> list[int]:
    """Every step over the early window, then about 25 points over the rest (0: initialization)."""
    early = max(1, math.ceil(EARLY * total))
    later = range(early, total + 1, max(1, total // 25))
    return sorted({*range(early + 1), *later, total})


def seeds(ctx: Context) -> int:
    """Paired repetitions: 2 (tiny), 12 (quick), 16 (full); a repetition costs about 3 core-seconds."""
    return ctx.pick(2, 12, 16)


def job(ctx: Context, s: int) -> dict[str, Any]:
    """Repetition ``s``: every variant at batch 32 with its distance from zero mean over training, and
    NormProp (c = 1.21) at batch 1."""
    split = _split(ctx)
    seed = ctx.run_seed(s)
    mean, sd = normprop.dataset_statistics([split.x_train])
    cfg = TrainConfig(_epochs(ctx), BATCH, LR)
    total = count_steps(split, cfg)
    at = set(_record_steps(total))
    probe = split.x_test.to(ctx.device)
    out: dict[str, Any] = {}
    for label in VARIANTS:
        torch.manual_seed(seed)
        model, layers = build(label, normprop.Standardize(mean, sd, dim=1))
        model.to(ctx.device)
        dist: dict[int, list[float]] = {0: zero_mean_distance(model, layers, probe)}
        # By name: under torchrun the training loop replaces the BatchNorm layers by synchronized ones.
        names = [n for n, m in model.named_modules() if any(m is layer for layer in layers)]

        def record(step: int, m: nn.Module, dist: dict = dist, names: list = names) -> None:
            if step in at:
                current = dict(m.named_modules())
                dist[step] = zero_mean_distance(m, [current[n] for n in names], probe)

        hist = fit(model, split, cfg, ctx, seed=seed, desc=label, on_step=record)
        out[label] = {
            "steps": sorted(dist),
            "distance": [dist[k] for k in sorted(dist)],
            "test_accuracy": 100 * evaluate(model, split.x_test, split.y_test)[0],
            "final_train_loss": hist.final_loss(),
        }
    torch.manual_seed(seed)
    model, _ = build(NORMPROP, normprop.Standardize(mean, sd, dim=1))
    hist = fit(model, split, TrainConfig(1, 1, BATCH1_LR), ctx, seed=seed, desc="NormProp batch 1")
    out["batch1"] = {
        "test_accuracy": 100 * evaluate(model, split.x_test, split.y_test)[0],
        "final_train_loss": hist.final_loss(),
        "steps": hist.steps,
    }
    return out


def collect(ctx: Context, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant the per-seed records (seed order), NormProp's batch-1 runs, the settings."""
    split = _split(ctx)
    cfg = TrainConfig(_epochs(ctx), BATCH, LR)
    settings = {
        "data": f"digits as 64 pixels, {len(split.y_train)} train / {len(split.y_test)} test, per-pixel "
        "standardization with dataset statistics",
        "models": f"MLP {DEPTH} x {HIDDEN}: NormPropLinear + NormPropReLU (c = 1.21 and 1) / Linear + BN + ReLU "
        "(momentum 0.1 and 0.01)",
        "batch_size": BATCH,
        "epochs": _epochs(ctx),
        "steps": count_steps(split, cfg),
        "optimizer": f"SGD lr {LR} momentum 0.9; batch 1: lr {BATCH1_LR:g}, one epoch",
        "measured": "per unit over the test images in eval mode, |mean| / std of the normalized hidden input before "
        "the learned affine (NormProp: W.x / (c ||W||); BN: (t - running_mean) / sqrt(running_var + eps)); mean "
        "over units and layers",
        "early_fraction": EARLY,
        "thresholds": {"min_early_gap": MIN_EARLY, "min_lag": MIN_LAG, "batch1_floor": BATCH1_FLOOR},
    }
    runs = {label: [o[label] for o in outputs] for label in VARIANTS}
    results = {"settings": settings, "runs": runs, "batch1": [o["batch1"] for o in outputs]}
    results["notes"] = [
        f"ablation, early |mean|/std of NormProp c=1 minus c=1.21: {ablation(results).text('std')}",
        "test accuracy, NormProp c=1 minus c=1.21: "
        + paired_interval(*[[r["test_accuracy"] for r in runs[k]] for k in ("NormProp c=1", NORMPROP)]).text("points"),
    ]
    return results


def _window(run: dict[str, Any], lo: float, hi: float) -> float:
    """The distance from zero mean (mean over layers) averaged over the recorded steps in ``(lo, hi]`` of the run."""
    total = run["steps"][-1]
    inside = [lo * total < step <= hi * total or (lo == 0 and step == 0) for step in run["steps"]]
    values = [sum(d) / len(d) for d, keep in zip(run["distance"], inside) if keep]
    return sum(values) / len(values) if values else math.nan


def early(results: dict[str, Any], label: str) -> list[float]:
    """Per seed: the distance from zero mean over the first :data:`EARLY` of training (initialization included)."""
    return [_window(r, 0.0, EARLY) for r in results["runs"][label]]


def late(results: dict[str, Any], label: str) -> list[float]:
    """Per seed: the distance from zero mean over the second half of training."""
    return [_window(r, 0.5, 1.0) for r in results["runs"][label]]


def claims(results: dict[str, Any]) -> list[Claim]:
    """The four claims of the module docstring, from the results alone."""
    out = []
    for bn in BNS:
        c = Claim(
            f"NormProp: zero mean ({bn})",
            "NormProp's hidden-layer inputs on validation data are closer to zero mean than BN's early in training, "
            f"when BN's moving averages lag (momentum {VARIANTS[bn][1]:g}); claimed here: over the first "
            f"{EARLY:.0%} of the steps, BN's |mean| / std exceeds NormProp's (c = 1.21) by more than {MIN_EARLY:g}",
        )
        c.greater(
            f"early |mean|/std: {bn} - {NORMPROP}",
            paired_interval(early(results, bn), early(results, NORMPROP)),
            MIN_EARLY,
            "std",
        )
        out.append(c)
    lag = Claim(
        "BN: estimates lag early",
        "BN's validation-time estimates (moving averages) lag the parameters early in training; claimed here: BN's "
        f"|mean| / std on validation data over the first {EARLY:.0%} of the steps exceeds that over the second "
        f"half by more than {MIN_LAG:g}",
    )
    for bn in BNS:
        lag.greater(
            f"{bn}: early - late |mean|/std", paired_interval(early(results, bn), late(results, bn)), MIN_LAG, "std"
        )
    out.append(lag)
    b1 = Claim(
        "NormProp: batch size 1",
        "NormProp needs no batch statistics, so it trains at batch size 1; claimed here: after one epoch at batch "
        f"size 1 its test accuracy exceeds {BATCH1_FLOOR:g} %",
    )
    b1.greater(
        f"test accuracy at batch 1 - {BATCH1_FLOOR:g} %",
        mean_interval([r["test_accuracy"] - BATCH1_FLOOR for r in results["batch1"]]),
        0.0,
    )
    out.append(b1)
    return out


def _iv(values: list[float], digits: int = 3) -> str:
    iv = mean_interval(values)
    if not math.isfinite(iv.low):
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} [{iv.low:.{digits}f}, {iv.high:.{digits}f}]"


def ablation(results: dict[str, Any]) -> Interval:
    """Early |mean|/std of NormProp with c = 1 minus with c = 1.21, paired over seeds."""
    return paired_interval(early(results, "NormProp c=1"), early(results, NORMPROP))


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per network: final training loss, test accuracy, early and late distance from zero mean (95 % CI)."""
    rows = []
    for label, runs in results["runs"].items():
        rows.append(
            [
                label,
                BATCH,
                round(sum(r["final_train_loss"] for r in runs) / len(runs), 4),
                _iv([r["test_accuracy"] for r in runs], 1),
                _iv(early(results, label)),
                _iv(late(results, label)),
            ]
        )
    b1 = results["batch1"]
    rows.append(
        [
            NORMPROP,
            1,
            round(sum(r["final_train_loss"] for r in b1) / len(b1), 4),
            _iv([r["test_accuracy"] for r in b1], 1),
            "-",
            "-",
        ]
    )
    headers = [
        "network",
        "batch",
        "final train loss",
        "test accuracy % [95% CI]",
        "early |mean|/std [95% CI]",
        "late |mean|/std [95% CI]",
    ]
    return headers, rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Distance from zero mean over training, BN's paired excess over NormProp per step, every claim's effect."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    runs = results["runs"]
    steps = runs[NORMPROP][0]["steps"]
    x = [max(s, 0.5) for s in steps]  # step 0 (initialization) at 0.5 on the log axis

    def curves(label: str) -> list[list[float]]:
        return [[sum(d) / len(d) for d in r["distance"]] for r in runs[label]]

    for i, label in enumerate(runs):
        ivs = [mean_interval(col) for col in zip(*curves(label))]
        ax1.plot(x, [v.mean for v in ivs], color=f"C{i}", label=label)
        if all(math.isfinite(v.low) for v in ivs):
            ax1.fill_between(x, [v.low for v in ivs], [v.high for v in ivs], color=f"C{i}", alpha=0.2)
    base = curves(NORMPROP)
    for bn in BNS:
        i = list(runs).index(bn)
        ivs = [paired_interval(a, b) for a, b in zip(zip(*curves(bn)), zip(*base))]
        ax2.plot(x, [v.mean for v in ivs], color=f"C{i}", label=f"{bn} - {NORMPROP}")
        if all(math.isfinite(v.low) for v in ivs):
            ax2.fill_between(x, [v.low for v in ivs], [v.high for v in ivs], color=f"C{i}", alpha=0.2)
    ax2.axhline(0.0, color="gray", linewidth=0.8)
    ax2.axhline(MIN_EARLY, color="black", linestyle="--", linewidth=1, label=f"minimum effect {MIN_EARLY:g}")
    total = results["settings"]["steps"]
    for ax in (ax1, ax2):
        ax.axvspan(0.5, EARLY * total, color="0.9", zorder=0)
        ax.set_xscale("log")
        ax.set_xlabel("step (log scale; initialization at 0.5; shaded: early window)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    ax1.set_ylabel("|mean| / std of the normalized input")
    ax1.set_title("distance from zero mean on validation data (95 % band)")
    ax2.set_ylabel("paired difference of |mean| / std")
    ax2.set_title("BN minus NormProp c=1.21, per step (95 % interval)")
    files = [save(fig, out, "normprop_zero_mean.png")]
    files += save_effects(claims(results), "normprop", out)
    return files


EXPERIMENT = Experiment(
    name="normprop",
    title="NormProp: zero-mean hidden inputs from the start, BN's lagging estimates, batch size 1",
    description=__doc__.split("\n\n", 1)[1].strip(),
    seeds=seeds,
    job=job,
    collect=collect,
    claims=claims,
    table=table,
    plot=plot,
)
