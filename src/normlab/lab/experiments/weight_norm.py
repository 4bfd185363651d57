"""weight-norm: Weight Normalization with and without data-dependent initialization, mean-only BN
with weight normalization, BN and a plain network (Salimans & Kingma, "Weight Normalization: A
Simple Reparameterization to Accelerate Training of Deep Neural Networks", NeurIPS 2016,
arXiv 1602.07868, section 5.1).

The digits CNN (:func:`normlab.lab.models.cnn`) with the same initial directions and minibatch order:

* plain: no normalization (the paper's "normal parameterization");
* WN: every conv/linear weight-normalized (:func:`normlab.weight_norm`), ``g = ||w||`` at start;
* WN + init: WN with the data-dependent initialization of section 2.2 (:func:`normlab.init_weight_norm`):
  on one minibatch of 256 training images, ``g = 1 / sigma[t]`` and ``b = -mu[t] / sigma[t]`` per unit;
* WN + mean-only BN: WN and, on each hidden conv's pre-activation ``t`` (before the ReLU), mean-only
  batch normalization ``t - mu_B[t] + b`` (section 3). The layer has no learned scale (the scale is
  WN's ``g``; its weight is frozen at one, only its bias learns), and ``g`` gets the same
  data-dependent initialization, which with the batch mean removed makes each pre-activation start
  at unit variance (the initialization runs in eval mode, so no running statistic moves);
* BN: BatchNorm after each hidden conv.

Protocol as the paper's CIFAR-10 runs (its Figure 2): Adam, ``beta1 = 0.9``, learning rate 0.003
for WN, BN and mean-only BN, and the learning rate decayed linearly to zero over the second half of
training. The paper gives the normal parameterization its own learning rate, the one "which works
best in this case" (0.0003 there); here the plain network's is likewise picked per run length from
0.003, 0.001 and 0.0003, by the lowest training loss averaged over the run and the seeds (the
metric of the claim, so the pick can only favour the plain network).

Recorded: the training loss per step, the test accuracy and the median wall time of a training step.
Claim check: WN with the initialization, and WN with mean-only BN, train faster than the plain
parameterization (lower training loss averaged over the run, Figure 2), and WN + mean-only BN's test
accuracy is at least BN's (Table 1: 7.31 % vs 8.05 % test error on CIFAR-10).
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
from .common import curve_means, save

VARIANTS = ("plain", "WN", "WN + init", "WN + mean-only BN", "BN")
LR = 0.003  # Adam, WN / BN / mean-only BN (the paper's Figure 2)
PLAIN_LRS = (0.003, 0.001, 0.0003)  # the plain network gets the best of these (the paper: its own best lr)
DECAY_FROM = 0.5  # the paper decays the learning rate linearly to zero over the last 100 of 200 epochs


def _weight_normalize(model: nn.Module, wn: Any) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            wn(m)
    return model


@torch.no_grad()
def _data_dependent_init(model: nn.Module, init_batch: torch.Tensor) -> None:
    from normlab.weight_norm import init_weight_norm

    # Eval mode: mean-only BN subtracts its (zero) running mean and records nothing during the init pass.
    was = model.training
    model.eval()
    try:
        init_weight_norm(model, init_batch)
    finally:
        model.train(was)


def _build(label: str, width: int, init_batch: torch.Tensor) -> nn.Module:
    from normlab.weight_norm import weight_norm

    base = cnn(1, width, 10, dims=2).to(init_batch.device)
    if label == "BN":
        return base
    if label == "WN + mean-only BN":
        model = with_norm(base, "mobn")
        for m in model.modules():
            if isinstance(m, normlab.NormBase) and m.weight is not None:
                m.weight.requires_grad_(False)  # the paper's mean-only layer: a learned bias only
        _weight_normalize(model, weight_norm)
        _data_dependent_init(model, init_batch)
        return model
    model = with_norm(base, "none")
    if label != "plain":
        _weight_normalize(model, weight_norm)
    if label == "WN + init":
        _data_dependent_init(model, init_batch)
    return model


def run(ctx: Context) -> dict[str, Any]:
    """Train every variant over the seeds; record loss curves, test accuracy and time per step."""
    variants = list(VARIANTS)
    notes: list[str] = []
    split = standardize(digits())
    if ctx.preset == "tiny":
        split = subset(split, 128, 64)
    seeds = ctx.pick(1, 2, 5)
    epochs = ctx.pick(1, 4, 20)
    width = ctx.pick(4, 8, 16)
    batch = 32
    every = max(1, count_steps(split, TrainConfig(epochs, batch, LR)) // 40)
    curves: dict[str, list[list[float]]] = {v: [] for v in variants}
    acc: dict[str, list[float]] = {v: [] for v in variants}
    step_ms: dict[str, list[float]] = {v: [] for v in variants}
    # Every run of the plain network at every candidate rate, then the best rate's runs are kept.
    jobs = [(v, lr, s) for s in range(seeds) for v in variants for lr in (PLAIN_LRS if v == "plain" else (LR,))]
    plain: dict[float, dict[str, list]] = {lr: {"curves": [], "acc": [], "ms": []} for lr in PLAIN_LRS}
    with ctx.bar(total=len(jobs), desc="weight-norm") as bar:
        for label, lr, s in jobs:
            seed = ctx.run_seed(s)
            cfg = TrainConfig(epochs, batch, lr, optimizer="adam", decay_from=DECAY_FROM)
            torch.manual_seed(seed)
            pick = torch.randperm(len(split.y_train), generator=torch.Generator().manual_seed(seed))[:256]
            init_batch = split.x_train[pick].to(ctx.device)
            model = _build(label, width, init_batch)
            hist = fit(model, split, cfg, ctx, seed=seed, desc=f"{label} lr {lr:g}")
            out = plain[lr] if label == "plain" else {"curves": curves[label], "acc": acc[label], "ms": step_ms[label]}
            out["curves"].append(hist.smoothed(every))
            out["acc"].append(100 * evaluate(model, split.x_test, split.y_test)[0])
            out["ms"].append(1000 * hist.time_per_step())
            bar.update(1)
    plain_search = {str(lr): _run_mean(r["curves"]) for lr, r in plain.items()}
    best = min(PLAIN_LRS, key=lambda lr: _run_mean(plain[lr]["curves"]))
    curves["plain"], acc["plain"], step_ms["plain"] = plain[best]["curves"], plain[best]["acc"], plain[best]["ms"]
    settings = {
        "data": f"digits, {len(split.y_train)} train / {len(split.y_test)} test, standardized",
        "model": f"cnn(width={width}); mean-only BN on the hidden convs' pre-activations",
        "batch_size": batch,
        "epochs": epochs,
        "seeds": seeds,
        "optimizer": f"Adam betas (0.9, 0.999); lr {LR} (plain: best of {list(PLAIN_LRS)}, here {best:g}), "
        f"linear decay to 0 from {DECAY_FROM:.0%} of the steps",
        "plain_lr_search_mean_train_loss": plain_search,
        "init": "data-dependent init (WN + init, WN + mean-only BN) on 256 random training images",
        "loss_window_steps": every,
    }
    return {"settings": settings, "curves": curves, "accuracy": acc, "step_ms": step_ms, "notes": notes}


def _run_mean(runs: list[list[float]]) -> float:
    value = mean_std(curve_means(runs))[0]
    return value if value == value else float("inf")  # a diverged (nan) run never counts as the best


def mean_loss(results: dict[str, Any], label: str) -> float:
    """Training loss averaged over the run and the seeds (lower: faster training)."""
    return mean_std(curve_means(results["curves"].get(label, [])))[0]


def claim(results: dict[str, Any]) -> Claim:
    """WN + init and WN + mean-only BN train faster than plain; WN + mean-only BN's test accuracy is at least BN's."""
    c = Claim(
        "weight normalization with data-dependent init, and with mean-only BN, reaches a lower training loss over "
        "the run than the plain network, and WN + mean-only BN's test accuracy is at least BN's"
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
        c.at_least("test accuracy WN + mean-only BN - BN (points)", diff, 0.0)
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
