"""whitening: training loss and conditioning of an MLP with no normalization, BN and Decorrelated BN
(ZCA, PCA and Newton/IterNorm whitening): the MLP experiments of Huang et al., "Decorrelated Batch
Normalization", CVPR 2018, arXiv 1804.08450 (conditioning analysis, training efficiency, and the PCA
"stochastic axis swapping").

Protocol as the paper's MLP runs (its released scripts): ReLU MLP with hidden layers of 128 units
(3 hidden layers, each Linear -> norm -> ReLU), plain SGD without momentum, minibatches of 256,
whitening groups of 16 channels, inputs centred (here standardized), and for every method the best
learning rate of a grid (the paper's is 0.1, 0.2, 0.5, 1, 2; quick runs use 0.1, 0.5, 1), picked
by the lowest final training loss averaged over seeds. Data: MNIST-1D (the package's offline
generator) instead of the paper's YaleB/PIE/MNIST. Every seed shares initial weights and minibatch
order across methods, so per-seed differences are paired.

Every few steps the condition number ``lambda_max / lambda_min`` of the covariance of each
normalization layer's output (:func:`normlab.diagnostics.condition_number`, per group of 16
channels, eval mode, a fixed probe batch of training signals) is measured; the table reports the
mean of ``log10`` over groups and layers.

Claim check, fixed before looking at any numbers: (1) DBN-zca's outputs are better conditioned than
BN's by a factor of 2 or more; (2) "DBN converges faster than BN", read off the paper's training-loss figures
as DBN's curve lying below BN's: the training loss averaged over the run (the area under the
curve, each method at its best learning rate) is lower for DBN-zca, by more than 2 standard errors
of the paired per-seed differences (more than 0 with one seed); (3) PCA whitening trains worse than
ZCA (stochastic axis swapping), by the same rule.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import mnist1d, standardize, subset
from ..models import mlp, run_with_hooks, with_norm
from ..report import Claim, mean_std, pyplot
from ..train import Context, TrainConfig, count_steps, evaluate, fit
from . import Experiment
from .common import curve_means, exceeds, paired_difference, save

GROUP = 16
HIDDEN = 128
VARIANTS = {  # label: (kind, options)
    "none": ("none", {}),
    "BN": ("bn", {}),
    "DBN-zca": ("dbn", {"group_size": GROUP, "method": "zca"}),
    "DBN-pca": ("dbn", {"group_size": GROUP, "method": "pca"}),
    "DBN-newton": ("dbn", {"group_size": GROUP, "method": "newton", "iterations": 5}),
}
COND_FACTOR = 2.0  # DBN-zca's output condition number must be this many times below BN's
NOISE_SE = 2.0  # a training-speed difference must exceed this many standard errors of the paired differences


class _Diverged(Exception):
    pass


def _norm_positions(model: nn.Sequential) -> list[int]:
    # In mlp(): Flatten, then (Linear, norm, ReLU) per hidden layer: the norm (or Identity) follows each Linear.
    return [i + 1 for i, m in enumerate(model[:-1]) if isinstance(m, nn.Linear)]


def log10_condition(z: Tensor, group_size: int = GROUP) -> float:
    """Mean over channel groups of ``log10(lambda_max / lambda_min)`` of the covariance of ``z`` (N, C)."""
    from normlab.diagnostics import condition_number

    if not bool(torch.isfinite(z).all()):
        return float("nan")
    return float(condition_number(z, group_size).log10().mean())


@torch.no_grad()
def conditioning(model: nn.Sequential, probe: Tensor) -> float:
    """Mean ``log10`` condition number of the normalization layers' outputs on ``probe`` (eval mode)."""
    was = model.training
    model.eval()
    outs: list[Tensor] = []
    try:
        run_with_hooks(model, probe, [model[i] for i in _norm_positions(model)], lambda _m, _i, o: outs.append(o))
    finally:
        model.train(was)
    return sum(log10_condition(o) for o in outs) / len(outs)


def _train(
    label: str,
    variants: dict,
    lr: float,
    seed: int,
    split: Any,
    cfg: TrainConfig,
    ctx: Context,
    probe: Tensor,
    every: int,
) -> dict[str, Any] | None:
    """One run; ``None`` when it diverges (non-finite parameters or a failed eigendecomposition)."""
    kind, options = variants[label]
    torch.manual_seed(seed)
    model = with_norm(mlp(40, HIDDEN, 3, 10), kind, **options).to(ctx.device)
    conds: list[float] = [conditioning(model, probe)]

    def record(step: int, m: nn.Module) -> None:
        if not all(bool(torch.isfinite(p).all()) for p in m.parameters()):
            raise _Diverged
        if step % every == 0:
            conds.append(conditioning(m, probe))

    try:
        hist = fit(model, split, cfg, ctx, seed=seed, desc=f"{label} lr {lr:g}", on_step=record)
    except (_Diverged, torch.linalg.LinAlgError):
        return None
    curve = hist.smoothed(every)
    if not all(math.isfinite(v) for v in curve):
        return None
    return {
        "curve": curve,
        "cond_curve": conds,
        "final_cond": conditioning(model, probe),
        "test_acc": 100 * evaluate(model, split.x_test, split.y_test)[0],
    }


def run(ctx: Context) -> dict[str, Any]:
    """Train the MLP with every variant and learning rate; keep each variant's best rate's runs."""
    split = standardize(mnist1d(num_samples=ctx.pick(1000, 5000, 5000)))
    if ctx.preset == "tiny":
        split = subset(split, 256, 100)
    seeds = ctx.pick(1, 2, 5)
    epochs = ctx.pick(1, 40, 100)
    batch = ctx.pick(64, 256, 256)
    lrs = ctx.pick((0.5,), (0.1, 0.5, 1.0), (0.1, 0.2, 0.5, 1.0, 2.0))
    variants = dict(VARIANTS)
    notes: list[str] = []
    steps = count_steps(split, TrainConfig(epochs, batch, lrs[0]))
    every = max(1, steps // 20)
    probe = split.x_train[:512].to(ctx.device)
    runs: dict[str, dict[float, list[dict[str, Any] | None]]] = {k: {lr: [] for lr in lrs} for k in variants}
    jobs = [(label, lr, s) for s in range(seeds) for label in variants for lr in lrs]
    with ctx.bar(total=len(jobs), desc="whitening") as bar:
        for label, lr, s in jobs:
            cfg = TrainConfig(epochs, batch, lr, momentum=0.0)
            runs[label][lr].append(_train(label, variants, lr, ctx.run_seed(s), split, cfg, ctx, probe, every))
            bar.update(1)
    curves: dict[str, list[list[float]]] = {}
    cond_curves: dict[str, list[list[float]]] = {}
    final_cond: dict[str, list[float]] = {}
    test_acc: dict[str, list[float]] = {}
    chosen: dict[str, float | None] = {}
    search: dict[str, dict[str, float | None]] = {}
    for label in variants:
        # A rate counts only if every seed trained to the end; the best has the lowest mean final loss.
        final = {
            lr: mean_std([r["curve"][-1] for r in rs])[0] if rs and all(r is not None for r in rs) else None
            for lr, rs in runs[label].items()
        }
        search[label] = {str(lr): v for lr, v in final.items()}
        ok = [lr for lr, v in final.items() if v is not None]
        best = min(ok, key=lambda lr: final[lr]) if ok else None
        chosen[label] = best
        kept = runs[label][best] if best is not None else []
        curves[label] = [r["curve"] for r in kept]
        cond_curves[label] = [r["cond_curve"] for r in kept]
        final_cond[label] = [r["final_cond"] for r in kept]
        test_acc[label] = [r["test_acc"] for r in kept]
        if best is None:
            notes.append(f"{label} diverged at every learning rate of {list(lrs)}")
    settings = {
        "data": f"MNIST-1D (offline generator), {len(split.y_train)} train / {len(split.y_test)} test, standardized",
        "model": f"mlp(40, hidden={HIDDEN}, depth=3), ReLU",
        "batch_size": batch,
        "epochs": epochs,
        "steps": steps,
        "seeds": seeds,
        "optimizer": "SGD without momentum (as the paper's MLP runs)",
        "learning_rates": list(lrs),
        "chosen_learning_rate": chosen,
        "final_train_loss_per_learning_rate": search,
        "dbn_group_size": GROUP,
        "record_every_steps": every,
        "claim_thresholds": {"condition_factor": COND_FACTOR, "speed_min_standard_errors": NOISE_SE},
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
    return mean_std(_run_means(results, label))[0]


def final_loss(results: dict[str, Any], label: str) -> float:
    """The last recorded (window-averaged) training loss, averaged over seeds."""
    return mean_std([c[-1] for c in results["loss_curves"].get(label, []) if c])[0]


def _run_means(results: dict[str, Any], label: str) -> list[float]:
    return curve_means(results["loss_curves"].get(label, []))


def claim(results: dict[str, Any]) -> Claim:
    """ZCA output is better conditioned than BN's by COND_FACTOR; ZCA trains faster than BN; PCA slower than ZCA."""
    c = Claim(
        f"DBN-zca's normalized outputs are >= {COND_FACTOR:g}x better conditioned than BN's, DBN-zca's training "
        f"loss averaged over the run is below BN's and DBN-pca's above DBN-zca's (by > {NOISE_SE:g} standard "
        "errors of the paired seed differences; each method at its best learning rate)"
    )
    cond = results["final_log10_condition"]
    if not cond.get("DBN-zca") or not cond.get("BN"):
        c.missing.append("DBN or BN was not run (or diverged)")
        return c
    gap = mean_std(cond["BN"])[0] - mean_std(cond["DBN-zca"])[0]
    c.at_least("log10 cond(BN) - log10 cond(DBN-zca)", gap, math.log10(COND_FACTOR))
    diff, se = paired_difference(_run_means(results, "BN"), _run_means(results, "DBN-zca"))
    exceeds(c, "mean training loss BN - DBN-zca", diff, NOISE_SE * se)
    if "DBN-pca" in cond:
        diff, se = paired_difference(_run_means(results, "DBN-pca"), _run_means(results, "DBN-zca"))
        exceeds(c, "mean training loss DBN-pca - DBN-zca", diff, NOISE_SE * se)
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
                results["settings"].get("chosen_learning_rate", {}).get(label, "-"),
                round(mean_loss(results, label), 4),
                round(final_loss(results, label), 4),
                f"{cm:.2f} ± {cs:.2f}",
                f"{am:.1f} ± {as_:.1f}",
            ]
        )
    return ["norm", "best lr", "mean train loss", "final train loss", "log10 cond (output)", "test accuracy (%)"], rows


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
