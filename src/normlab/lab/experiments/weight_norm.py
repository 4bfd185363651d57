"""weight-norm: Weight Normalization with and without data-dependent initialization, mean-only BN
with weight normalization, BN and a plain network (Salimans & Kingma, "Weight Normalization: A
Simple Reparameterization to Accelerate Training of Deep Neural Networks", NeurIPS 2016,
arXiv 1602.07868, section 5.1).

The digits CNN (:func:`normlab.lab.models.cnn`) with the same initial weights and minibatch order:

* plain: no normalization;
* WN: every conv/linear weight-normalized (:func:`normlab.weight_norm`), ``g = ||w||`` at start;
* WN + init: WN with the data-dependent initialization of section 2.2 (:func:`normlab.init_weight_norm`)
  on one minibatch of 256 training images;
* WN + mean-only BN: WN and, after each hidden conv, mean-only batch normalization (section 3; the
  layer's scale is frozen at one, as in the paper, only its bias learns);
* BN: BatchNorm after each hidden conv.

Recorded: the training loss per step, the test accuracy and the median wall time of a training step.
The paper's claims (its Figure 2 and Table 1): weight normalization, with the initialization or with
mean-only BN, trains faster than the plain parameterization, and WN + mean-only BN reaches the test
accuracy of BN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

import normlab

from ..data import digits, standardize, subset
from ..models import cnn, with_norm
from ..report import Claim, mean_std, pyplot
from ..train import Context, TrainConfig, count_steps, evaluate, fit
from . import Experiment
from .common import available, missing_note, save

VARIANTS = ("plain", "WN", "WN + init", "WN + mean-only BN", "BN")
ACC_TOLERANCE = 1.0  # points WN + mean-only BN may fall short of BN


def _weight_normalize(model: nn.Module, wn: Any) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            wn(m)
    return model


def _build(label: str, width: int, init_batch: torch.Tensor) -> nn.Module:
    from normlab.weight_norm import init_weight_norm, weight_norm

    base = cnn(1, width, 10, dims=2).to(init_batch.device)
    if label == "BN":
        return base
    if label == "WN + mean-only BN":
        model = with_norm(base, "mobn")
        for m in model.modules():
            if isinstance(m, normlab.NormBase) and m.weight is not None:
                m.weight.requires_grad_(False)  # the paper's mean-only layer: a learned bias only
        return _weight_normalize(model, weight_norm)
    model = with_norm(base, "none")
    if label != "plain":
        _weight_normalize(model, weight_norm)
    if label == "WN + init":
        init_weight_norm(model, init_batch)
    return model


def run(ctx: Context) -> dict[str, Any]:
    """Train every variant over the seeds; record loss curves, test accuracy and time per step."""
    try:
        import normlab.weight_norm  # noqa: F401
    except ImportError:
        return {
            "settings": {},
            "curves": {},
            "accuracy": {},
            "step_ms": {},
            "notes": [missing_note("weight normalization", "normlab.weight_norm (weight_norm.py)")],
        }
    variants = list(VARIANTS)
    notes = []
    if not available("mobn"):
        variants.remove("WN + mean-only BN")
        notes.append(missing_note("WN + mean-only BN", "normlab.MeanOnlyBatchNorm (mean_only.py)"))
    split = standardize(digits())
    if ctx.preset == "tiny":
        split = subset(split, 128, 64)
    seeds = ctx.pick(1, 2, 5)
    epochs = ctx.pick(1, 4, 20)
    width = ctx.pick(4, 8, 16)
    batch, lr = 32, 0.003
    cfg = TrainConfig(epochs, batch, lr, optimizer="adam")
    every = max(1, count_steps(split, cfg) // 40)
    curves: dict[str, list[list[float]]] = {v: [] for v in variants}
    acc: dict[str, list[float]] = {v: [] for v in variants}
    step_ms: dict[str, list[float]] = {v: [] for v in variants}
    jobs = [(v, s) for s in range(seeds) for v in variants]
    with ctx.bar(total=len(jobs), desc="weight-norm") as bar:
        for label, s in jobs:
            seed = ctx.seed * 1000 + s
            torch.manual_seed(seed)
            pick = torch.randperm(len(split.y_train), generator=torch.Generator().manual_seed(seed))[:256]
            init_batch = split.x_train[pick].to(ctx.device)
            model = _build(label, width, init_batch)
            hist = fit(model, split, cfg, ctx, seed=seed, desc=label)
            curves[label].append(hist.smoothed(every))
            acc[label].append(100 * evaluate(model, split.x_test, split.y_test)[0])
            step_ms[label].append(1000 * hist.time_per_step())
            bar.update(1)
    settings = {
        "data": f"digits, {len(split.y_train)} train / {len(split.y_test)} test, standardized",
        "model": f"cnn(width={width})",
        "batch_size": batch,
        "epochs": epochs,
        "seeds": seeds,
        "optimizer": f"Adam lr {lr}, betas (0.9, 0.999), as the paper (same for every variant)",
        "init": "init_weight_norm on 256 random training images",
        "loss_window_steps": every,
        "claim_thresholds": {"accuracy_tolerance_points": ACC_TOLERANCE},
    }
    return {"settings": settings, "curves": curves, "accuracy": acc, "step_ms": step_ms, "notes": notes}


def mean_loss(results: dict[str, Any], label: str) -> float:
    """Training loss averaged over the run and the seeds (lower: faster training)."""
    runs = results["curves"].get(label, [])
    return mean_std([sum(c) / len(c) for c in runs if c])[0]


def claim(results: dict[str, Any]) -> Claim:
    """WN + init and WN + mean-only BN train faster than plain; WN + mean-only BN is within ACC_TOLERANCE of BN."""
    c = Claim(
        "weight normalization with data-dependent init, and with mean-only BN, reaches a lower training loss over "
        f"the run than the plain network, and WN + mean-only BN's test accuracy is within {ACC_TOLERANCE:g} point "
        "of BN's or better"
    )
    if not results["curves"].get("plain"):
        c.missing.append("the plain network was not run")
        return c
    for label in ("WN + init", "WN + mean-only BN"):
        if results["curves"].get(label):
            gap = mean_loss(results, "plain") - mean_loss(results, label)
            c.at_least(f"mean training loss plain - {label}", gap, 0)
        else:
            c.missing.append(f"{label} was not run")
    if results["accuracy"].get("WN + mean-only BN") and results["accuracy"].get("BN"):
        diff = mean_std(results["accuracy"]["WN + mean-only BN"])[0] - mean_std(results["accuracy"]["BN"])[0]
        c.at_least("test accuracy WN + mean-only BN - BN (points)", diff, -ACC_TOLERANCE)
    return c


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per variant: mean training loss, test accuracy and milliseconds per training step."""
    rows = []
    for label in results["curves"]:
        am, as_ = mean_std(results["accuracy"][label])
        tm, _ = mean_std(results["step_ms"][label])
        rows.append([label, round(mean_loss(results, label), 4), f"{am:.1f} ± {as_:.1f}", round(tm, 3)])
    return ["variant", "mean train loss", "test accuracy (%)", "ms / step (median)"], rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Training-loss curves (seed 0)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    every = results["settings"].get("loss_window_steps", 1)
    for label, runs in results["curves"].items():
        if runs:
            ax.plot([every * (i + 1) for i in range(len(runs[0]))], runs[0], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title("digits CNN: weight normalization")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [save(fig, out, "weight_norm_loss.png")]


EXPERIMENT = Experiment(
    "weight-norm",
    "Weight normalization: init, mean-only BN, BN and plain",
    __doc__.split("\n\n", 1)[1].strip(),
    run,
    claim,
    table,
    plot,
)
