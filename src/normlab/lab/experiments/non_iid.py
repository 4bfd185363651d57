"""non-iid: BatchNorm vs Batch Renormalization on minibatches drawn from a few classes at a time
(the non-i.i.d. setting of Ioffe, "Batch Renormalization", NeurIPS 2017, arXiv 1702.03275, Sec. 4.3).

The digits CNN is trained with minibatches of 32 that each hold only 4 of the 10 classes (8 examples
of each), and, for reference, with shuffled i.i.d. minibatches; the test set is evaluated i.i.d. in eval
mode. The paper's explanation: BN's training-time output of an example depends on the other
examples of its (biased) minibatch, so the model fits minibatch statistics that the population
statistics used at inference do not reproduce; Batch Renorm's corrections ``r, d`` tie training to
the moving statistics and remove that dependence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import normlab

from ..data import digits, standardize, subset
from ..models import cnn, with_norm
from ..report import Claim, mean_std, pyplot
from ..train import Context, TrainConfig, count_steps, evaluate, fit
from . import Experiment
from .common import save

NORMS = ("bn", "brn")
LABELS = {"bn": "BN", "brn": "BRN"}
ORDERS = ("iid", "non-iid")
GAIN_MIN = 3.0  # points BRN must gain over BN with non-i.i.d. minibatches
BN_LOSS_MIN = 3.0  # points BN must lose from i.i.d. to non-i.i.d. minibatches


def run(ctx: Context) -> dict[str, Any]:
    """Train BN and BRN with i.i.d. and with few-class minibatches; record test accuracy and loss curves."""
    split = standardize(digits())
    if ctx.preset == "tiny":
        split = subset(split, 128, 64)
    seeds = ctx.pick(1, 3, 5)
    epochs = ctx.pick(1, 6, 20)
    width = ctx.pick(4, 8, 16)
    batch, classes_per_batch, lr = 32, 4, 0.1
    acc: dict[str, dict[str, list[float]]] = {k: {o: [] for o in ORDERS} for k in NORMS}
    train_acc: dict[str, dict[str, list[float]]] = {k: {o: [] for o in ORDERS} for k in NORMS}
    curves: dict[str, list[float]] = {}
    steps = count_steps(split, TrainConfig(epochs, batch, lr))
    jobs = [(k, o, s) for s in range(seeds) for o in ORDERS for k in NORMS]
    with ctx.bar(total=len(jobs), desc="non-iid") as bar:
        for kind, order, s in jobs:
            seed = ctx.seed * 1000 + s
            cfg = TrainConfig(epochs, batch, lr, classes_per_batch=classes_per_batch if order == "non-iid" else None)
            torch.manual_seed(seed)
            model = with_norm(cnn(1, width, 10, dims=2), kind, **_options(kind, steps))
            hist = fit(model, split, cfg, ctx, seed=seed, desc=f"{kind} {order}")
            acc[kind][order].append(100 * evaluate(model, split.x_test, split.y_test)[0])
            train_acc[kind][order].append(100 * evaluate(model, split.x_train, split.y_train)[0])
            if s == 0:
                curves[f"{LABELS[kind]} {order}"] = hist.smoothed(max(1, hist.steps // 50))
            bar.update(1)
    settings = {
        "data": f"digits, {len(split.y_train)} train / {len(split.y_test)} test, standardized",
        "model": f"cnn(width={width})",
        "batch_size": batch,
        "classes_per_batch": classes_per_batch,
        "epochs": epochs,
        "seeds": seeds,
        "optimizer": f"SGD lr {lr} momentum 0.9",
        "brn": "momentum 0.1, paper_schedule scaled to the run's steps",
        "claim_thresholds": {"brn_gain_min_points": GAIN_MIN, "bn_loss_min_points": BN_LOSS_MIN},
    }
    return {"settings": settings, "accuracy": acc, "train_accuracy": train_acc, "curves": curves, "notes": []}


def _options(kind: str, steps: int) -> dict[str, Any]:
    if kind == "brn":
        return {"momentum": 0.1, **normlab.paper_schedule(steps / 130_000)}
    return {}


def _mean(results: dict[str, Any], kind: str, order: str) -> float:
    return mean_std(results["accuracy"].get(kind, {}).get(order, []))[0]


def claim(results: dict[str, Any]) -> Claim:
    """With non-i.i.d. minibatches BRN beats BN by GAIN_MIN points, and BN loses BN_LOSS_MIN points
    against its i.i.d. training."""
    c = Claim(
        f"with few-class minibatches BRN's test accuracy exceeds BN's by >= {GAIN_MIN:g} points, and BN "
        f"loses >= {BN_LOSS_MIN:g} points against i.i.d. minibatches"
    )
    c.at_least(
        "BRN - BN, non-i.i.d. (points)", _mean(results, "brn", "non-iid") - _mean(results, "bn", "non-iid"), GAIN_MIN
    )
    c.at_least(
        "BN i.i.d. - BN non-i.i.d. (points)", _mean(results, "bn", "iid") - _mean(results, "bn", "non-iid"), BN_LOSS_MIN
    )
    return c


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Test and training accuracy (eval mode, %) per normalizer and minibatch order."""
    rows = []
    for kind in results["accuracy"]:
        for order in ORDERS:
            m, s = mean_std(results["accuracy"][kind][order])
            tm, ts = mean_std(results["train_accuracy"][kind][order])
            rows.append([LABELS[kind], order, f"{m:.1f} ± {s:.1f}", f"{tm:.1f} ± {ts:.1f}"])
    return ["norm", "minibatches", "test accuracy (%)", "train accuracy, eval mode (%)"], rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Training-loss curves (seed 0) and a bar chart of test accuracy."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, ys in results["curves"].items():
        ax1.plot(ys, label=label)
    ax1.set_xlabel("training progress (windows of steps)")
    ax1.set_ylabel("training loss (train mode)")
    ax1.set_title("training loss")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    labels, means, stds = [], [], []
    for kind in results["accuracy"]:
        for order in ORDERS:
            m, s = mean_std(results["accuracy"][kind][order])
            labels.append(f"{LABELS[kind]}\n{order}")
            means.append(m)
            stds.append(s)
    ax2.bar(labels, means, yerr=stds, capsize=4, color=["C0", "C1", "C2", "C3"][: len(labels)])
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("test accuracy (eval mode)")
    ax2.grid(alpha=0.3, axis="y")
    return [save(fig, out, "non_iid.png")]


EXPERIMENT = Experiment(
    "non-iid",
    "Non-i.i.d. minibatches: BN vs Batch Renorm",
    __doc__.split("\n\n", 1)[1].strip(),
    run,
    claim,
    table,
    plot,
)
