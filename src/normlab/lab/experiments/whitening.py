"""whitening: Decorrelated Batch Normalization against BN, PCA against ZCA whitening, and DBN's group
size (Huang et al., "Decorrelated Batch Normalization", CVPR 2018, arXiv 1804.08450: its MLP
conditioning analysis, training efficiency, "stochastic axis swapping" and group-size ablation).

A ReLU MLP of 3 hidden layers of 64 units (``Linear -> norm -> ReLU``) on scikit-learn's digits
(64 standardized pixels), plain SGD without momentum as the paper's MLP runs, minibatches of 128.
Variants: BN; DBN with ZCA whitening in groups of 4, 16 and 64 channels (64: the whole layer, full
whitening); DBN with PCA whitening in groups of 16. Every variant gets the same learning-rate grid
:data:`LRS`; its rate is the one with the lowest training loss averaged over the run and the seeds
(an optimum on the grid's edge is flagged). Every seed gives all variants the same initial weights
and minibatch order.

Conditioning is measured where it matters for the optimization: at the input of the *next* linear
layer (after the normalization's affine and the ReLU), not at the whitening layer's own output
(which is white by construction). The network runs in training mode (batch statistics, a copy, so
no running statistic moves) on four training-size batches of training images; the next layers'
inputs are pooled and ``log10(lambda_max / lambda_min)`` of their covariance over all 64 channels
is averaged over the three hidden layers (units dead on the probe, with no variance, are left out).

Test accuracy is reported with the layers' running statistics (for DBN the moving average of the batch
whitening matrices, the paper's Algorithm 1) and with population statistics recomputed over the training
batches (:func:`normlab.recompute_statistics`, the whitening matrix of the average batch covariance); the
two part ways where batch whitening matrices are far from the population's (full whitening of 64
channels from batches of 128).

Claims (paired over seeds, 95 % Student-t intervals, thresholds fixed here):

1. *DBN conditions better than BN*: ``log10 cond`` of the next layer's input, BN minus DBN-zca16,
   exceeds ``log10(COND_FACTOR)``.
2. *DBN trains faster than BN*: ``100 (1 - loss(DBN-zca16) / loss(BN))`` of the run-averaged training
   losses exceeds :data:`MIN_FASTER` %.
3. *PCA whitening trains slower than ZCA* (stochastic axis swapping): ``100 (1 - loss(zca16) /
   loss(pca16))`` exceeds :data:`MIN_FASTER` %.
4. *larger groups condition better* (the group-size ablation): ``log10 cond``, DBN-zca4 minus
   DBN-zca64, exceeds ``log10(COND_FACTOR)``.
5. *groups train better than full whitening* (the ablation's trade-off): ``100 (1 - loss(zca16) /
   loss(zca64))`` exceeds :data:`MIN_FASTER` %.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import normlab

from ..data import Split, digits, standardize, subset
from ..models import mlp, with_norm
from ..report import Claim, pyplot
from ..stats import Interval, mean_interval, paired_interval
from ..train import Context, TrainConfig, count_steps, evaluate, fit
from . import Experiment
from .common import at_chosen, chosen_rate, legend_below, save, save_effects

HIDDEN, DEPTH, BATCH = 64, 3, 128
VARIANTS = {  # label: (kind, options)
    "BN": ("bn", {}),
    "DBN-zca4": ("dbn", {"group_size": 4, "method": "zca"}),
    "DBN-zca16": ("dbn", {"group_size": 16, "method": "zca"}),
    "DBN-zca64": ("dbn", {"group_size": 64, "method": "zca"}),
    "DBN-pca16": ("dbn", {"group_size": 16, "method": "pca"}),
}
LRS = (0.3, 1.0, 3.0)  # SGD rates of every variant, half a decade apart
PROBE_BATCHES = 4  # training-size batches of training images for the conditioning
COND_FACTOR = 2.0  # claims 1, 4: condition number lower by at least this factor
MIN_FASTER = 10.0  # claims 2, 3, 5: run-averaged training loss at least this many percent lower


def _split(ctx: Context) -> Split:
    split = standardize(digits())
    if ctx.preset == "tiny":
        split = subset(split, 256, 100)
    return Split(split.name, split.x_train.flatten(1), split.y_train, split.x_test.flatten(1), split.y_test)


def _lrs(ctx: Context) -> tuple[float, ...]:
    return ctx.pick((1.0,), LRS, LRS)


def _epochs(ctx: Context) -> int:
    return ctx.pick(2, 30, 80)


def _batch(ctx: Context) -> int:
    return ctx.pick(32, BATCH, BATCH)


def log10_condition(x: Tensor) -> float:
    """``log10(lambda_max / lambda_min)`` of the covariance of ``x`` (N, C) over its channels with variance.

    A channel with no variance over ``x`` (a dead ReLU) carries no signal and is left out; ``nan`` for a
    non-finite ``x``.
    """
    from normlab.diagnostics import condition_number

    x = x.double()
    if not bool(torch.isfinite(x).all()):
        return math.nan
    var = x.var(0)
    keep = var > 1e-10 * var.mean().clamp_min(1e-300)
    if int(keep.sum()) < 2:
        return math.nan
    return float(condition_number(x[:, keep]).log10())


@torch.no_grad()
def next_layer_conditioning(model: nn.Sequential, probe: Tensor, batch: int) -> float:
    """Mean over hidden layers of :func:`log10_condition` of the next linear layer's input, in training mode.

    ``probe`` runs through a copy of ``model`` (so no running statistic moves) in batches of ``batch``;
    each layer's inputs are pooled over the batches.
    """
    net = copy.deepcopy(model).train()
    following = [m for m in net if isinstance(m, nn.Linear)][1:]  # every Linear after a hidden layer
    seen: list[list[Tensor]] = [[] for _ in following]
    handles = [m.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0])) for i, m in enumerate(following)]
    try:
        for start in range(0, len(probe) - batch + 1, batch):
            net(probe[start : start + batch])
    finally:
        for h in handles:
            h.remove()
    values = [log10_condition(torch.cat(xs)) for xs in seen]
    return sum(values) / len(values)


def _train(label: str, lr: float, seed: int, split: Split, ctx: Context, probe: Tensor) -> dict[str, Any]:
    kind, options = VARIANTS[label]
    torch.manual_seed(seed)
    model = with_norm(mlp(split.x_train.size(1), HIDDEN, DEPTH, split.num_classes), kind, **options).to(ctx.device)
    batch = _batch(ctx)
    cfg = TrainConfig(_epochs(ctx), batch, lr, momentum=0.0)
    every = max(1, count_steps(split, cfg) // 10)
    cond = [next_layer_conditioning(model, probe, batch)]

    def record(step: int, m: nn.Module) -> None:
        if step % every == 0:
            cond.append(next_layer_conditioning(m, probe, batch))

    try:
        hist = fit(model, split, cfg, ctx, seed=seed, desc=f"{label} lr {lr:g}", on_step=record)
    except torch.linalg.LinAlgError:
        return {
            "diverged": True,
            "population_test_accuracy": None,
            "mean_train_loss": None,
            "final_train_loss": None,
            "curve": [],
            "cond_curve": cond,
            "final_cond": None,
            "test_accuracy": None,
        }
    mean_loss = sum(hist.losses) / len(hist.losses)
    ok = math.isfinite(mean_loss) and math.isfinite(hist.final_loss())
    return {
        "population_test_accuracy": _population_accuracy(model, split, batch) if ok else None,
        "diverged": not ok,
        "mean_train_loss": mean_loss if ok else None,
        "final_train_loss": hist.final_loss() if ok else None,
        "curve": hist.smoothed(every) if ok else [],
        "cond_curve": cond,
        "final_cond": cond[-1] if ok and math.isfinite(cond[-1]) else None,
        "test_accuracy": 100 * evaluate(model, split.x_test, split.y_test)[0] if ok else None,
    }


def _population_accuracy(model: nn.Module, split: Split, batch: int) -> float | None:
    """Test accuracy (%) with Algorithm 2's population statistics over the training batches, on a copy.

    DBN's eval uses the moving average of the batch whitening matrices (the paper's Algorithm 1); this is the
    same network with the whitening matrix of the average batch covariance instead.
    """
    pop = copy.deepcopy(model)
    batches = [split.x_train[i : i + batch] for i in range(0, len(split.y_train) - batch + 1, batch)]
    try:
        normlab.recompute_statistics(pop, batches, mode="average")
    except (ValueError, torch.linalg.LinAlgError):
        return None
    return 100 * evaluate(pop, split.x_test, split.y_test)[0]


def seeds(ctx: Context) -> int:
    """Paired repetitions: 2 (tiny), 8 (quick), 12 (full)."""
    return ctx.pick(2, 8, 12)


def job(ctx: Context, s: int) -> dict[str, Any]:
    """Repetition ``s``: every variant at every rate of the grid, same initial weights and minibatch order."""
    split = _split(ctx)
    probe = split.x_train[: PROBE_BATCHES * _batch(ctx)].to(ctx.device)
    seed = ctx.run_seed(s)
    return {v: {str(lr): _train(v, lr, seed, split, ctx, probe) for lr in _lrs(ctx)} for v in VARIANTS}


def collect(ctx: Context, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and rate the per-seed cells (seed order); each variant's chosen rate; the settings."""
    split = _split(ctx)
    cfg = TrainConfig(_epochs(ctx), _batch(ctx), 0.0)
    settings = {
        "data": f"digits as 64 standardized pixels, {len(split.y_train)} train / {len(split.y_test)} test",
        "model": f"mlp(64, hidden={HIDDEN}, depth={DEPTH}), ReLU",
        "variants": {k: f"{kind} {opts}" for k, (kind, opts) in VARIANTS.items()},
        "batch_size": _batch(ctx),
        "epochs": _epochs(ctx),
        "steps": count_steps(split, cfg),
        "optimizer": "SGD without momentum (as the paper's MLP runs), constant rate",
        "learning_rates": list(_lrs(ctx)),
        "learning_rate_rule": "per variant, the rate with the lowest training loss averaged over the run and seeds",
        "conditioning": f"log10 cond of the next linear layer's input, training mode, {PROBE_BATCHES} batches of "
        f"{_batch(ctx)} training images pooled, mean over the 3 hidden layers",
        "record_every_steps": max(1, count_steps(split, cfg) // 10),
        "thresholds": {"condition_factor": COND_FACTOR, "min_faster_percent": MIN_FASTER},
    }
    cells = {v: {str(lr): [o[v][str(lr)] for o in outputs] for lr in _lrs(ctx)} for v in VARIANTS}
    results: dict[str, Any] = {"settings": settings, "cells": cells, "notes": []}
    chosen = settings["chosen_learning_rate"] = {}
    for v in VARIANTS:
        chosen[v], note = chosen_rate(results["cells"][v], "mean_train_loss")
        if note:
            results["notes"].append(f"{v}: {note}")
    return results






def cond_gap(results: dict[str, Any], worse: str, better: str) -> Interval:
    """``log10 cond`` of ``worse`` minus ``better`` at the end of training, paired over seeds."""

    def values(v: str) -> list[float]:
        return [math.nan if c["final_cond"] is None else c["final_cond"] for c in at_chosen(results, v)]

    return paired_interval(values(worse), values(better))


def faster(results: dict[str, Any], slow: str, fast: str) -> Interval:
    """Per seed ``100 (1 - loss(fast) / loss(slow))`` of the run-averaged training losses."""
    a, b = at_chosen(results, slow), at_chosen(results, fast)
    return mean_interval([100 * (1 - f["mean_train_loss"] / s["mean_train_loss"]) for s, f in zip(a, b)])


CLAIMS = (  # name, statement, kind, (worse/slow, better/fast)
    (
        "DBN: better conditioned",
        "DBN-zca's whitening conditions the next layer's input better than BN's standardization",
        "cond",
        ("BN", "DBN-zca16"),
    ),
    (
        "DBN: faster than BN",
        "DBN converges faster than BN (its MLP training-loss figures)",
        "speed",
        ("BN", "DBN-zca16"),
    ),
    (
        "DBN: PCA slower than ZCA",
        "PCA whitening trains worse than ZCA (stochastic axis swapping)",
        "speed",
        ("DBN-pca16", "DBN-zca16"),
    ),
    (
        "DBN: larger groups condition",
        "whitening larger groups of channels conditions the next layer's input better (the group-size ablation)",
        "cond",
        ("DBN-zca4", "DBN-zca64"),
    ),
    (
        "DBN: groups beat full",
        "whitening in groups trains better than whitening the whole layer (the ablation's trade-off)",
        "speed",
        ("DBN-zca64", "DBN-zca16"),
    ),
)


def claims(results: dict[str, Any]) -> list[Claim]:
    """The five claims of the module docstring, from the results alone."""
    out = []
    for name, statement, kind, (a, b) in CLAIMS:
        if kind == "cond":
            text = (
                f"{statement}; claimed here: log10 cond of the next layer's input, {a} minus {b}, exceeds "
                f"log10({COND_FACTOR:g})"
            )
        else:
            text = (
                f"{statement}; claimed here: {b}'s training loss averaged over the run is more than "
                f"{MIN_FASTER:g} % below {a}'s, each at its best rate of the same grid"
            )
        c = Claim(name, text)
        if not at_chosen(results, a) or not at_chosen(results, b):
            c.missing.append(f"{a} or {b} diverged at every learning rate")
        elif kind == "cond":
            c.greater(f"log10 cond: {a} - {b}", cond_gap(results, a, b), math.log10(COND_FACTOR), "log10")
        else:
            c.greater(f"run-averaged training loss, {b} below {a}", faster(results, a, b), MIN_FASTER, "%")
        out.append(c)
    return out


def _mean(values: list[Any]) -> float:
    return sum(values) / len(values) if values and all(v is not None for v in values) else math.nan


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per variant and rate: run-averaged and final training loss, next-layer log10 cond, test accuracy."""
    rows = []
    chosen = results["settings"]["chosen_learning_rate"]
    for v in VARIANTS:
        for lr, cells in results["cells"][v].items():
            diverged = sum(c["diverged"] for c in cells)
            rows.append(
                [
                    v,
                    lr + (" *" if chosen.get(v) == float(lr) else ""),
                    round(_mean([c["mean_train_loss"] for c in cells]), 4),
                    round(_mean([c["final_train_loss"] for c in cells]), 4),
                    round(_mean([c["final_cond"] for c in cells]), 2),
                    round(_mean([c["test_accuracy"] for c in cells]), 1),
                    round(_mean([c.get("population_test_accuracy") for c in cells]), 1),
                    f"{diverged}/{len(cells)}",
                ]
            )
    headers = [
        "variant",
        "lr (* chosen)",
        "mean train loss",
        "final train loss",
        "log10 cond (next input)",
        "test accuracy (%)",
        "test accuracy, population stats (%)",
        "diverged",
    ]
    return headers, rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Training loss and next-layer conditioning over training at the chosen rates, and every claim's effect."""
    plt = pyplot()
    every = results["settings"]["record_every_steps"]
    chosen = results["settings"]["chosen_learning_rate"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, v in enumerate(VARIANTS):
        cells = [c for c in at_chosen(results, v) if not c["diverged"]]
        if not cells:
            continue
        label = f"{v} (lr {chosen[v]:g})"
        loss = [mean_interval(col) for col in zip(*[c["curve"] for c in cells])]
        x = [every * (k + 1) for k in range(len(loss))]
        ax1.plot(x, [iv.mean for iv in loss], color=f"C{i}", label=label)
        cond = [mean_interval(col) for col in zip(*[c["cond_curve"] for c in cells])]
        ax2.plot([every * k for k in range(len(cond))], [iv.mean for iv in cond], color=f"C{i}", label=label)
        if all(math.isfinite(iv.low) for iv in cond):
            ax2.fill_between(
                [every * k for k in range(len(cond))],
                [iv.low for iv in cond],
                [iv.high for iv in cond],
                color=f"C{i}",
                alpha=0.2,
            )
    ax1.set_yscale("log")
    ax1.set_ylabel("training loss, mean over seeds (log)")
    ax1.set_title("training loss at each variant's chosen rate")
    ax2.set_ylabel("log10 condition number (95 % band)")
    ax2.set_title("conditioning of the next layer's input")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        legend_below(ax)
    files = [save(fig, out, "whitening.png")]
    files += save_effects(claims(results), "whitening", out)
    return files


EXPERIMENT = Experiment(
    name="whitening",
    title="Whitening: DBN against BN, PCA against ZCA, and DBN's group size",
    description=__doc__.split("\n\n", 1)[1].strip(),
    seeds=seeds,
    job=job,
    collect=collect,
    claims=claims,
    table=table,
    plot=plot,
)
