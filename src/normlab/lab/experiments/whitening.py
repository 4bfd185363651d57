"""whitening: training loss and conditioning of an MLP with no normalization, BN and Decorrelated BN
(ZCA, PCA and Newton/IterNorm whitening): the conditioning analysis and the PCA "stochastic axis
swapping" of Huang et al., "Decorrelated Batch Normalization", CVPR 2018, arXiv 1804.08450.

An MLP (3 hidden layers of 64, each Linear -> norm -> ReLU) is trained on MNIST-1D (the package's
offline generator) with the same initial weights, minibatch order and learning rate for every
normalizer.
Every few steps the condition number ``lambda_max / lambda_min`` of the covariance of each
normalization layer's output (:func:`normlab.diagnostics.condition_number`, per group of 16
channels, eval mode, a fixed probe batch of training signals) is measured; the table reports the
mean of ``log10`` over groups and layers. The paper's claims: whitening (ZCA) makes the layer's
output well conditioned and speeds up training compared with BN, while PCA whitening, whose
eigenvector order and signs change from batch to batch, trains worse than ZCA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import mnist1d, subset
from ..models import mlp, with_norm
from ..report import Claim, mean_std, pyplot
from ..train import Context, TrainConfig, count_steps, evaluate, fit
from . import Experiment
from .common import available, kind_note, save

GROUP = 16
VARIANTS = {  # label: (kind, options)
    "none": ("none", {}),
    "BN": ("bn", {}),
    "DBN-zca": ("dbn", {"group_size": GROUP, "method": "zca"}),
    "DBN-pca": ("dbn", {"group_size": GROUP, "method": "pca"}),
    "DBN-newton": ("dbn", {"group_size": GROUP, "method": "newton", "iterations": 5}),
}
COND_FACTOR = 2.0  # DBN-zca's output condition number must be this many times below BN's


def _norm_positions(model: nn.Sequential) -> list[int]:
    # In mlp(): Flatten, then (Linear, norm, ReLU) per hidden layer: the norm (or Identity) follows each Linear.
    return [i + 1 for i, m in enumerate(model[:-1]) if isinstance(m, nn.Linear)]


def log10_condition(z: Tensor, group_size: int = GROUP) -> float:
    """Mean over channel groups of ``log10(lambda_max / lambda_min)`` of the covariance of ``z`` (N, C)."""
    from normlab.diagnostics import condition_number

    return float(condition_number(z, group_size).log10().mean())


@torch.no_grad()
def conditioning(model: nn.Sequential, probe: Tensor) -> float:
    """Mean ``log10`` condition number of the normalization layers' outputs on ``probe`` (eval mode)."""
    was = model.training
    model.eval()
    outs: list[Tensor] = []
    handles = [model[i].register_forward_hook(lambda _m, _i, o: outs.append(o)) for i in _norm_positions(model)]
    try:
        model(probe)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return sum(log10_condition(o) for o in outs) / len(outs)


def run(ctx: Context) -> dict[str, Any]:
    """Train the MLP with every variant; record loss curves and the conditioning over training."""
    split = mnist1d(num_samples=ctx.pick(1000, 4000, 5000))
    if ctx.preset == "tiny":
        split = subset(split, 256, 100)
    seeds = ctx.pick(1, 2, 5)
    epochs = ctx.pick(1, 6, 30)
    hidden, batch, lr = 64, 64, 0.05
    variants = {k: v for k, v in VARIANTS.items() if available(v[0])}
    notes = sorted({kind_note(v[0]) for v in VARIANTS.values() if not available(v[0])})
    cfg = TrainConfig(epochs, batch, lr)
    steps = count_steps(split, cfg)
    every = max(1, steps // 20)
    probe = split.x_train[:512].to(ctx.device)
    curves: dict[str, list[list[float]]] = {k: [] for k in variants}
    cond_curves: dict[str, list[list[float]]] = {k: [] for k in variants}
    final_cond: dict[str, list[float]] = {k: [] for k in variants}
    test_acc: dict[str, list[float]] = {k: [] for k in variants}
    jobs = [(label, s) for s in range(seeds) for label in variants]
    with ctx.bar(total=len(jobs), desc="whitening") as bar:
        for label, s in jobs:
            seed = ctx.seed * 1000 + s
            kind, options = variants[label]
            torch.manual_seed(seed)
            model = with_norm(mlp(40, hidden, 3, 10), kind, **options).to(ctx.device)
            conds: list[float] = [conditioning(model, probe)]

            def record(step: int, m: nn.Module, conds: list[float] = conds) -> None:
                if step % every == 0:
                    conds.append(conditioning(m, probe))

            hist = fit(model, split, cfg, ctx, seed=seed, desc=label, on_step=record)
            curves[label].append(hist.smoothed(every))
            cond_curves[label].append(conds)
            final_cond[label].append(conditioning(model, probe))
            test_acc[label].append(100 * evaluate(model, split.x_test, split.y_test)[0])
            bar.update(1)
    settings = {
        "data": f"MNIST-1D (offline generator), {len(split.y_train)} train / {len(split.y_test)} test",
        "model": f"mlp(40, hidden={hidden}, depth=3)",
        "batch_size": batch,
        "epochs": epochs,
        "steps": steps,
        "seeds": seeds,
        "optimizer": f"SGD lr {lr} momentum 0.9",
        "dbn_group_size": GROUP,
        "record_every_steps": every,
        "claim_thresholds": {"condition_factor": COND_FACTOR},
    }
    return {
        "settings": settings,
        "loss_curves": curves,
        "condition_curves": cond_curves,
        "final_log10_condition": final_cond,
        "test_accuracy": test_acc,
        "notes": notes,
    }


def mean_loss(results: dict[str, Any], label: str) -> float:
    """Training loss averaged over the run and the seeds (the area under the curve: lower is faster)."""
    runs = results["loss_curves"].get(label, [])
    return mean_std([sum(c) / len(c) for c in runs if c])[0]


def final_loss(results: dict[str, Any], label: str) -> float:
    """The last recorded (window-averaged) training loss, averaged over seeds."""
    return mean_std([c[-1] for c in results["loss_curves"].get(label, []) if c])[0]


def claim(results: dict[str, Any]) -> Claim:
    """ZCA output is better conditioned than BN's by COND_FACTOR; ZCA trains faster than BN; PCA slower than ZCA."""
    c = Claim(
        f"DBN-zca's normalized outputs are >= {COND_FACTOR:g}x better conditioned than BN's, DBN-zca reaches a "
        "lower training loss than BN over the run, and DBN-pca a higher one than DBN-zca"
    )
    cond = results["final_log10_condition"]
    if "DBN-zca" not in cond or "BN" not in cond:
        c.missing.append("DBN or BN was not run")
        return c
    gap = mean_std(cond["BN"])[0] - mean_std(cond["DBN-zca"])[0]
    c.at_least("log10 cond(BN) - log10 cond(DBN-zca)", gap, math.log10(COND_FACTOR))
    c.at_least("mean training loss BN - DBN-zca", mean_loss(results, "BN") - mean_loss(results, "DBN-zca"), 0.0)
    if "DBN-pca" in cond:
        c.at_least(
            "mean training loss DBN-pca - DBN-zca", mean_loss(results, "DBN-pca") - mean_loss(results, "DBN-zca"), 0.0
        )
    return c


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per variant: mean and final training loss, log10 condition number, test accuracy."""
    rows = []
    for label in results["loss_curves"]:
        cm, cs = mean_std(results["final_log10_condition"][label])
        am, as_ = mean_std(results["test_accuracy"][label])
        rows.append(
            [
                label,
                round(mean_loss(results, label), 4),
                round(final_loss(results, label), 4),
                f"{cm:.2f} ± {cs:.2f}",
                f"{am:.1f} ± {as_:.1f}",
            ]
        )
    return ["norm", "mean train loss", "final train loss", "log10 cond (output)", "test accuracy (%)"], rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Training-loss curves and log10 condition number over training (seed 0)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    every = results["settings"]["record_every_steps"]
    for label, runs in results["loss_curves"].items():
        if runs:
            ax1.plot([every * (i + 1) for i in range(len(runs[0]))], runs[0], label=label)
    for label, runs in results["condition_curves"].items():
        if runs:
            ax2.plot([every * i for i in range(len(runs[0]))], runs[0], label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax1.set_title("MNIST-1D MLP: training loss")
    ax2.set_xlabel("step")
    ax2.set_ylabel("mean log10 condition number")
    ax2.set_title("conditioning of the normalized outputs")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [save(fig, out, "whitening.png")]


EXPERIMENT = Experiment(
    "whitening",
    "Whitening: loss curves and conditioning for none, BN, DBN-zca/pca/newton",
    __doc__.split("\n\n", 1)[1].strip(),
    run,
    claim,
    table,
    plot,
)
