"""batch-norm: Ioffe & Szegedy's own claims for batch normalization on a sigmoid MLP (Ioffe & Szegedy,
"Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift", ICML
2015, arXiv 1502.03167, section 4.1 and Algorithm 2).

The paper's MNIST network (section 4.1): 3 fully connected hidden layers of 100 sigmoid units, with
and without BN on each hidden layer's pre-activation (``Linear -> BatchNorm1d -> Sigmoid``), minibatches
of 60. Here on scikit-learn's digits (64 standardized pixels, a fixed 70/30 split) with torch's
default initialization, SGD with momentum 0.9. Every repetition (seed) gives both networks the same
initial weights (the BN network built first, the plain one is the same network with BN removed) and
the same minibatch order; both train the same number of steps at every learning rate of one grid.

Each network's learning rate for claims 1, 2 and 4 is the grid's rate with the lowest final training
loss averaged over the seeds (the same rule for both; a rate at the grid's edge is flagged).

Claims, each a paired difference over seeds with a 95 % Student-t interval against a minimum effect
fixed here before running:

1. *fewer steps* (Figure 1a): BN reaches :data:`TARGET` % test accuracy in fewer steps:
   ``log2(steps without BN / steps with BN) > log2(MIN_SPEEDUP)``. Test accuracy is evaluated every
   few steps; a run that never reaches the target counts as reaching it at the last step, which
   understates BN's advantage.
2. *steady sigmoid inputs* (Figure 1b, c): the 15th, 50th and 85th percentiles, over the test
   images, of each last-hidden-layer sigmoid's input move less over training with BN: the drift
   (mean over the 100 units and the three percentiles of ``|p(end) - p(end / 10)|``, from a tenth
   of the run to its end, in the sigmoid's input units) is smaller by more than :data:`MIN_DRIFT_GAP`.
   BN's sigmoid input is measured as in training: the layer's input normalized by the probe's own
   batch statistics, then BN's affine (no running statistic moves).
3. *higher learning rates* (section 3.3): the largest grid rate at which a network still ends at
   :data:`TARGET` % test accuracy is higher with BN, by more than :data:`MIN_LR_STEPS` grid steps
   (the grid's rates are half a decade apart; a network that reaches it at no rate counts as one
   step below the grid).
4. *moving averages match population statistics* (Algorithm 2 and section 3.1): at inference BN
   normalizes with population statistics ``E[x] = E_B[mu_B]``, ``Var[x] = m / (m - 1) E_B[sigma_B^2]``
   over training minibatches (:func:`normlab.recompute_statistics`, batches of 60); section 3.1 uses
   moving averages instead ("we can track the accuracy of a model as it trains"), which presumes they
   serve the same purpose. Checked as an equivalence: at the end of training the test accuracy with
   population statistics minus that with torch's moving averages (momentum 0.1) lies within
   ±:data:`POP_MARGIN` points.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normlab

from ..data import Split, digits, standardize, subset
from ..models import mlp
from ..report import Claim, pyplot
from ..stats import Interval, mean_interval, paired_interval
from ..train import Context, TrainConfig, evaluate, fit
from . import Experiment
from .common import at_chosen, chosen_rate, legend_below, save, save_effects

METHODS = ("none", "BN")
HIDDEN, DEPTH, BATCH = 100, 3, 60  # the paper's MNIST network and minibatch size
MOMENTUM = 0.9
TARGET = 90.0  # test accuracy (%) for "steps to reach" (claim 1) and "still trains" (claim 3)
PERCENTILES = (0.15, 0.50, 0.85)  # Figure 1b, c
MIN_SPEEDUP = 1.5  # claim 1: BN reaches the target in at least 1/1.5 of the steps
MIN_DRIFT_GAP = 0.5  # claim 2: drift without BN minus drift with BN, in sigmoid input units
MIN_LR_STEPS = 1.0  # claim 3: BN's largest trainable rate is more than one grid step higher
POP_MARGIN = 1.0  # claim 4: population statistics vs moving averages, test accuracy points
GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # the learning rates of both networks, half a decade apart


def _lrs(ctx: Context) -> tuple[float, ...]:
    return ctx.pick((0.1, 1.0, 10.0), GRID, GRID)


def _steps(ctx: Context) -> int:
    return ctx.pick(60, 1000, 4000)


def _split(ctx: Context) -> Split:
    split = standardize(digits())
    if ctx.preset == "tiny":
        split = subset(split, 240, 120)
    return Split(split.name, split.x_train.flatten(1), split.y_train, split.x_test.flatten(1), split.y_test)


def sigmoid_mlp(
    in_features: int = 64, hidden: int = HIDDEN, depth: int = DEPTH, num_classes: int = 10
) -> nn.Sequential:
    """``depth`` hidden layers ``Linear -> BatchNorm1d -> Sigmoid`` of ``hidden`` units, then a linear classifier."""
    return mlp(in_features, hidden, depth, num_classes, activation=nn.Sigmoid, flatten=False)


@torch.no_grad()
def sigmoid_input(model: nn.Sequential, x: Tensor) -> Tensor:
    """The input of the last hidden layer's sigmoids on ``x`` (N, units), as training computes it.

    A BatchNorm1d normalizes with the batch statistics of ``x`` itself and applies its affine; no
    running statistic moves.
    """
    h, last = x, x
    for layer in model:
        if isinstance(layer, nn.BatchNorm1d):
            h = F.batch_norm(h, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
        else:
            if isinstance(layer, nn.Sigmoid):
                last = h
            h = layer(h)
    return last


def percentiles(model: nn.Sequential, x: Tensor) -> Tensor:
    """The 15th, 50th and 85th percentiles over ``x`` of each last-layer sigmoid input: (3, units)."""
    z = sigmoid_input(model, x)
    return torch.quantile(z.double(), torch.tensor(PERCENTILES, dtype=torch.float64), dim=0)


def drift(early: Tensor, late: Tensor) -> float:
    """Mean over units and percentiles of ``|late - early|`` (two (3, units) percentile tables)."""
    return float((late - early).abs().mean())


def steps_to(curve: list[float], every: int, target: float, total: int) -> tuple[int, bool]:
    """The first evaluated step at which ``curve`` (one value per ``every`` steps) reaches ``target``.

    ``(total, False)`` when it never does.
    """
    for i, v in enumerate(curve):
        if v >= target:
            return (i + 1) * every, True
    return total, False


def _train(method: str, lr: float, seed: int, split: Split, ctx: Context, steps: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    base = sigmoid_mlp(split.x_train.size(1), num_classes=split.num_classes)
    model = base if method == "BN" else _strip(base)
    every = max(1, steps // 120)
    rec_every = max(1, steps // 20)
    probe_x, probe_y = split.x_test.to(ctx.device), split.y_test.to(ctx.device)
    curve: list[float] = []
    pcts: dict[int, Tensor] = {0: percentiles(model, probe_x)}

    def on_step(step: int, m: nn.Module) -> None:
        if step % every == 0:
            curve.append(100 * evaluate(m, probe_x, probe_y)[0])
        if step % rec_every == 0 or step == steps // 10:
            pcts[step] = percentiles(m, probe_x)

    epochs = math.ceil(steps / (len(split.y_train) // BATCH))
    cfg = TrainConfig(epochs, BATCH, lr, momentum=MOMENTUM, max_steps=steps)
    hist = fit(model, split, cfg, ctx, seed=seed, desc=f"{method} lr {lr:g}", on_step=on_step)
    final_loss = hist.final_loss()
    at, reached = steps_to(curve, every, TARGET, steps)
    early, late = pcts[steps // 10], pcts[steps]
    cell: dict[str, Any] = {
        "final_train_loss": final_loss if math.isfinite(final_loss) else None,
        "test_accuracy": curve[-1],
        "accuracy_curve": curve,
        "steps_to_target": at,
        "reached_target": reached,
        "drift": drift(early, late) if bool(torch.isfinite(late).all() and torch.isfinite(early).all()) else None,
        "percentile_steps": sorted(pcts),
        "unit0_percentiles": [pcts[k][:, 0].tolist() for k in sorted(pcts)],
    }
    if method == "BN":
        cell |= _population_check(model, split, ctx)
    return cell


def _population_check(model: nn.Module, split: Split, ctx: Context) -> dict[str, float]:
    """Test accuracy with the moving averages and with Algorithm 2's population statistics."""
    moving = 100 * evaluate(model, split.x_test, split.y_test)[0]
    pop = copy.deepcopy(model)
    batches = [split.x_train[i : i + BATCH] for i in range(0, len(split.y_train) - BATCH + 1, BATCH)]
    normlab.recompute_statistics(pop, batches, mode="average", device=ctx.device)
    return {
        "moving_average_accuracy": moving,
        "population_accuracy": 100 * evaluate(pop, split.x_test, split.y_test)[0],
    }


def _strip(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[m for m in model if not isinstance(m, nn.BatchNorm1d)])


def seeds(ctx: Context) -> int:
    """Paired repetitions: 2 (tiny), 8 (quick), 16 (full)."""
    return ctx.pick(2, 8, 16)


def job(ctx: Context, s: int) -> dict[str, Any]:
    """Repetition ``s``: both networks at every learning rate of the grid, same initial weights and order."""
    split = _split(ctx)
    seed = ctx.run_seed(s)
    steps = _steps(ctx)
    return {m: {str(lr): _train(m, lr, seed, split, ctx, steps) for lr in _lrs(ctx)} for m in METHODS}


def collect(ctx: Context, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method and learning rate, the per-seed cells (seed order); the settings."""
    split = _split(ctx)
    steps = _steps(ctx)
    cells = {m: {str(lr): [o[m][str(lr)] for o in outputs] for lr in _lrs(ctx)} for m in METHODS}
    settings = {
        "data": f"digits as 64 standardized pixels, {len(split.y_train)} train / {len(split.y_test)} test",
        "model": f"{DEPTH} x {HIDDEN} sigmoid MLP, with / without BatchNorm1d before each sigmoid, torch default init",
        "batch_size": BATCH,
        "steps": steps,
        "optimizer": f"SGD, momentum {MOMENTUM}, constant learning rate",
        "learning_rates": list(_lrs(ctx)),
        "learning_rate_rule": "per network, the rate with the lowest final training loss averaged over seeds",
        "seeds": len(outputs),
        "accuracy_every_steps": max(1, steps // 120),
        "drift": "mean over units and the 15/50/85th percentiles of |p(end) - p(end/10)| of the last hidden "
        "layer's sigmoid inputs over the test images",
        "population_statistics": f"recompute_statistics(mode='average'), training batches of {BATCH}",
        "thresholds": {
            "target_accuracy": TARGET,
            "min_speedup": MIN_SPEEDUP,
            "min_drift_gap": MIN_DRIFT_GAP,
            "min_lr_steps": MIN_LR_STEPS,
            "population_margin_points": POP_MARGIN,
        },
    }
    results: dict[str, Any] = {"settings": settings, "cells": cells, "notes": []}
    chosen = results["settings"]["chosen_learning_rate"] = {}
    for m in METHODS:
        chosen[m], note = chosen_rate(results["cells"][m], "final_train_loss")
        if note:
            results["notes"].append(f"{m}: {note}")
    for m in METHODS:
        top = max_trainable_step(results, m)
        if any(i == len(_lrs(ctx)) - 1 for i in top):
            results["notes"].append(
                f"{m} ends at {TARGET:g} % at the grid's largest rate in some seeds: its "
                "largest trainable rate is a lower bound"
            )
    return results


def _grid(results: dict[str, Any]) -> list[float]:
    return [float(lr) for lr in results["settings"]["learning_rates"]]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)






def max_trainable_step(results: dict[str, Any], method: str) -> list[float]:
    """Per seed, the grid index of the largest rate that ends at the target accuracy (-1: none does)."""
    grid = _grid(results)
    n = len(results["cells"][method][str(grid[0])])
    out = []
    for s in range(n):
        ok = [i for i, lr in enumerate(grid) if results["cells"][method][str(lr)][s]["test_accuracy"] >= TARGET]
        out.append(float(max(ok)) if ok else -1.0)
    return out


def speedup_interval(results: dict[str, Any]) -> Interval:
    """``log2(steps without BN / steps with BN)`` to the target, paired over seeds."""
    none, bn = at_chosen(results, "none"), at_chosen(results, "BN")
    return paired_interval(
        [math.log2(c["steps_to_target"]) for c in none], [math.log2(c["steps_to_target"]) for c in bn]
    )


def drift_interval(results: dict[str, Any]) -> Interval:
    """Drift without BN minus drift with BN, paired over seeds (a diverged run's drift is infinite)."""

    def values(cells: list[dict[str, Any]]) -> list[float]:
        return [c["drift"] if _finite(c["drift"]) else math.inf for c in cells]

    return paired_interval(values(at_chosen(results, "none")), values(at_chosen(results, "BN")))


def lr_interval(results: dict[str, Any]) -> Interval:
    """BN's largest trainable grid index minus the plain network's, paired over seeds."""
    return paired_interval(max_trainable_step(results, "BN"), max_trainable_step(results, "none"))


def population_interval(results: dict[str, Any]) -> Interval:
    """Test accuracy with population statistics minus with moving averages (BN at its rate), paired."""
    cells = at_chosen(results, "BN")
    return paired_interval([c["population_accuracy"] for c in cells], [c["moving_average_accuracy"] for c in cells])


def claims(results: dict[str, Any]) -> list[Claim]:
    """The four claims of the module docstring, from the results alone."""
    fewer = Claim(
        "BN: fewer steps",
        f"with BN the sigmoid MLP reaches {TARGET:g} % test accuracy in fewer steps (section 4.1, Figure 1a); "
        f"claimed here: at least {MIN_SPEEDUP:g}x fewer, each network at its best learning rate",
    )
    steady = Claim(
        "BN: steady sigmoid inputs",
        "with BN the 15/50/85th percentiles of a last-hidden-layer sigmoid's input stay steady over training, "
        f"without BN they drift (Figure 1b, c); claimed here: the drift from a tenth of the run to its end is "
        f"smaller with BN by more than {MIN_DRIFT_GAP:g} (sigmoid input units)",
    )
    higher = Claim(
        "BN: higher learning rates",
        "BN lets the network train at higher learning rates (section 3.3); claimed here: the largest rate of one "
        f"shared grid (half a decade apart) at which the network ends at {TARGET:g} % test accuracy is more "
        f"than {MIN_LR_STEPS:g} grid step(s) higher with BN",
    )
    population = Claim(
        "BN: moving avg = population",
        "at inference BN uses population statistics, Var[x] = m/(m-1) E_B[sigma_B^2] (Algorithm 2); moving "
        "averages serve instead (section 3.1); claimed here: at the end of training the test accuracy with "
        f"population statistics is within ±{POP_MARGIN:g} points of that with moving averages",
    )
    out = [fewer, steady, higher, population]
    chosen = results["settings"].get("chosen_learning_rate", {})
    if chosen.get("none") is None or chosen.get("BN") is None:
        for c in (fewer, steady, population):
            c.missing.append("a network diverged at every learning rate of the grid")
    else:
        speedup = speedup_interval(results)
        fewer.greater("log2(steps to target: none / BN)", speedup, math.log2(MIN_SPEEDUP), "log2 ratio")
        steady.greater("percentile drift: none - BN", drift_interval(results), MIN_DRIFT_GAP, "input units")
        population.equivalent("test accuracy: population - moving averages", population_interval(results), POP_MARGIN)
    higher.greater("largest trainable rate: BN - none", lr_interval(results), MIN_LR_STEPS, "grid steps")
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if _finite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per network and learning rate: final training loss, test accuracy, steps to target, drift."""
    rows = []
    chosen = results["settings"].get("chosen_learning_rate", {})
    for m in METHODS:
        for lr in _grid(results):
            cells = results["cells"][m][str(lr)]
            losses = [c["final_train_loss"] for c in cells]
            loss = "diverged" if not all(_finite(v) for v in losses) else round(_mean(losses), 4)
            acc = mean_interval([c["test_accuracy"] for c in cells])
            reached = sum(c["reached_target"] for c in cells)
            rows.append(
                [
                    m,
                    f"{lr:g}" + (" *" if chosen.get(m) == lr else ""),
                    loss,
                    f"{acc.mean:.1f} ± {(acc.high - acc.mean):.1f}" if math.isfinite(acc.high) else f"{acc.mean:.1f}",
                    f"{_mean([c['steps_to_target'] for c in cells]):.0f} ({reached}/{len(cells)})",
                    round(_mean([c["drift"] for c in cells if c["drift"] is not None]), 3),
                ]
            )
    headers = [
        "network",
        "lr (* chosen)",
        "final train loss",
        "test acc % (95% CI)",
        "steps to target (reached)",
        "percentile drift",
    ]
    return headers, rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Accuracy over steps, unit 0's percentiles, accuracy against the rate, and every claim's effect."""
    plt = pyplot()
    files = []
    chosen = results["settings"].get("chosen_learning_rate", {})
    every = results["settings"]["accuracy_every_steps"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(METHODS):
        cells = at_chosen(results, m)
        if not cells:
            continue
        curves = [c["accuracy_curve"] for c in cells]
        x = [every * (k + 1) for k in range(len(curves[0]))]
        ivs = [mean_interval([c[k] for c in curves]) for k in range(len(x))]
        axes[0].plot(x, [v.mean for v in ivs], color=f"C{i}", label=f"{m} (lr {chosen[m]:g})")
        axes[0].fill_between(x, [v.low for v in ivs], [v.high for v in ivs], color=f"C{i}", alpha=0.25)
    axes[0].axhline(TARGET, color="0.4", linestyle=":", label=f"target {TARGET:g} %")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("step (log scale)")
    axes[0].set_ylabel("test accuracy (%)")
    axes[0].set_title("test accuracy, mean and 95 % CI over seeds")
    axes[0].legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    grid = _grid(results)
    for i, m in enumerate(METHODS):
        ivs = [mean_interval([c["test_accuracy"] for c in results["cells"][m][str(lr)]]) for lr in grid]
        axes[1].errorbar(
            grid,
            [v.mean for v in ivs],
            yerr=[[v.mean - v.low for v in ivs], [v.high - v.mean for v in ivs]],
            marker="o",
            capsize=3,
            color=f"C{i}",
            label=m,
        )
    axes[1].axhline(TARGET, color="0.4", linestyle=":", label=f"target {TARGET:g} %")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("learning rate")
    axes[1].set_ylabel("final test accuracy (%)")
    axes[1].set_title("final test accuracy against the learning rate")
    axes[1].legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, frameon=False)
    for ax in axes:
        ax.grid(alpha=0.3)
    files.append(save(fig, out, "batch_norm_training.png"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, m in zip(axes, METHODS):
        cells = at_chosen(results, m)
        if not cells:
            continue
        x, p = cells[0]["percentile_steps"], cells[0]["unit0_percentiles"]
        for k, q in enumerate(PERCENTILES):
            ax.plot(x, [row[k] for row in p], marker=".", color=f"C{k}", label=f"{round(100 * q)}th percentile")
        ax.axvspan(x[-1] // 10, x[-1], color="0.9", zorder=0, label="span of the drift")
        ax.set_xlabel("step")
        ax.set_title(f"{m}: sigmoid input of unit 0, last hidden layer (repetition 0)")
        ax.set_ylabel("sigmoid input")
        ax.grid(alpha=0.3)
        legend_below(ax)
    files.append(save(fig, out, "batch_norm_percentiles.png"))

    files += save_effects(claims(results), "batch-norm", out)
    return files


EXPERIMENT = Experiment(
    name="batch-norm",
    title="Batch normalization: Ioffe & Szegedy's claims on a sigmoid MLP",
    description=__doc__.split("\n\n", 1)[1].strip(),
    seeds=seeds,
    job=job,
    collect=collect,
    claims=claims,
    table=table,
    plot=plot,
)
