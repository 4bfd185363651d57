"""small-batch: test accuracy against the batch size per step, per normalizer (the shape of the CBN
paper's Table 1: Yao et al., "Cross-Iteration Batch Normalization", CVPR 2021, arXiv 2002.05712).

The same small CNN (:func:`normlab.lab.models.cnn`) on scikit-learn's digits is trained with
BatchNorm, Batch Renormalization, Cross-Iteration BN, GroupNorm and Decorrelated BN at batch sizes
32 .. 2, with the learning rate scaled linearly with the batch size and the same number of epochs,
over several seeds; the test accuracy is measured in eval mode (running statistics for the
batch-statistics layers). The last conv layer outputs 1x1 maps, so at batch 2 its batch statistics
come from 2 values per channel: the regime where the paper reports BN failing.

The claim check measures each normalizer's drop from its best batch size to the smallest and compares
it with GroupNorm's: GN does not depend on the batch, so its drop is what small batches cost the
optimizer alone in a short run (the paper's long ImageNet schedule hides that cost).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data import digits, standardize, subset
from ..models import cnn, with_norm
from ..report import Claim, mean_std, pyplot
from ..train import Context, TrainConfig, count_steps, evaluate, fit
from . import Experiment
from .common import NORM_OPTION_NOTES, norm_options, save

NORMS = ("bn", "brn", "cbn", "gn", "dbn")
LABELS = {"bn": "BN", "brn": "BRN", "cbn": "CBN", "gn": "GN", "dbn": "DBN"}
BN_EXCESS_MIN = 5.0  # points BN must lose beyond GN's loss from its best batch size to the smallest
CBN_EXCESS_MAX = 5.0  # points CBN may lose beyond GN's


def run(ctx: Context) -> dict[str, Any]:
    """Train every (normalizer, batch size, seed) and record the test accuracy."""
    split = standardize(digits())
    if ctx.preset == "tiny":
        split = subset(split, 64, 64)
    batches = ctx.pick([8, 2], [32, 16, 8, 4, 2], [32, 16, 8, 4, 2])
    seeds = ctx.pick(1, 2, 5)
    epochs = ctx.pick(1, 2, 6)
    width = ctx.pick(4, 8, 16)
    base_lr = 0.2
    norms = list(NORMS)
    notes: list[str] = []
    acc: dict[str, dict[str, list[float]]] = {k: {str(b): [] for b in batches} for k in norms}
    steps_of: dict[str, int] = {}
    jobs = [(k, b, s) for s in range(seeds) for b in batches for k in norms]
    with ctx.bar(total=len(jobs), desc="small-batch") as bar:
        for kind, b, s in jobs:
            seed = ctx.run_seed(s)
            cfg = TrainConfig(epochs=epochs, batch_size=b, lr=base_lr * b / 32)
            steps = count_steps(split, cfg)
            model = with_norm(_model(seed, width), kind, **norm_options(kind, steps))
            fit(model, split, cfg, ctx, seed=seed, desc=f"{kind} b={b}")
            acc[kind][str(b)].append(100 * evaluate(model, split.x_test, split.y_test)[0])
            steps_of[str(b)] = steps
            bar.update(1)
    settings = {
        "data": f"digits, {len(split.y_train)} train / {len(split.y_test)} test, standardized",
        "model": f"cnn(width={width}): 3 conv+norm+ReLU, global pool, linear",
        "batch_sizes": batches,
        "seeds": seeds,
        "epochs": epochs,
        "optimizer": f"SGD momentum 0.9, lr = {base_lr} * batch / 32",
        "steps_per_batch_size": steps_of,
        "options": {k: NORM_OPTION_NOTES[k] for k in norms},
        "claim_thresholds": {"bn_excess_min_points": BN_EXCESS_MIN, "cbn_excess_max_points": CBN_EXCESS_MAX},
    }
    return {"settings": settings, "accuracy": acc, "notes": notes}


def _model(seed: int, width: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return cnn(1, width, 10, dims=2)


def drops(results: dict[str, Any]) -> dict[str, float]:
    """Per normalizer: its best mean accuracy over the batch sizes minus its mean accuracy at the smallest.

    The best rather than the largest batch is the reference because with the same number of epochs the
    largest batches take the fewest steps, and a short run leaves them undertrained.
    """
    out = {}
    for kind, by_batch in results["accuracy"].items():
        sizes = sorted((b for b in by_batch if by_batch[b]), key=int)
        if len(sizes) >= 2:
            out[kind] = max(mean_std(by_batch[b])[0] for b in sizes) - mean_std(by_batch[sizes[0]])[0]
    return out


def claim(results: dict[str, Any]) -> Claim:
    """The paper's Figure 1 / Table 1 shape, with GN as the control for the optimizer's own small-batch effect.

    GN's statistics do not depend on the batch, so its drop (best batch size to smallest) is what small
    batches cost the optimization alone in this short run (the paper's long ImageNet schedule has no such
    cost). Criteria: BN's drop exceeds GN's by at least BN_EXCESS_MIN points; CBN's exceeds GN's by at
    most CBN_EXCESS_MAX; BRN drops less than BN ("stabilizes BN a little but still suffers").
    """
    c = Claim(
        f"at the smallest batch BN loses >= {BN_EXCESS_MIN:g} points more than GN (the batch-independent control), "
        f"CBN at most {CBN_EXCESS_MAX:g} points more than GN, and BRN less than BN"
    )
    d = drops(results)
    for k in ("bn", "gn"):
        if k not in d:
            c.missing.append(f"{LABELS[k]} was not run")
    if c.missing:
        return c
    c.at_least("BN drop - GN drop (points)", d["bn"] - d["gn"], BN_EXCESS_MIN)
    if "cbn" in d:
        c.at_most("CBN drop - GN drop (points)", d["cbn"] - d["gn"], CBN_EXCESS_MAX)
    else:
        c.missing.append("CBN was not run")
    if "brn" in d:
        c.at_least("BN drop - BRN drop (points)", d["bn"] - d["brn"], 0.0)
    else:
        c.missing.append("BRN was not run")
    return c


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per normalizer: mean ± std accuracy (%) per batch size and the drop."""
    acc = results["accuracy"]
    sizes = sorted(next(iter(acc.values())), key=int, reverse=True) if acc else []
    d = drops(results)
    rows = []
    for kind, by_batch in acc.items():
        cells = []
        for b in sizes:
            m, s = mean_std(by_batch[b])
            cells.append(f"{m:.1f} ± {s:.1f}")
        rows.append([LABELS[kind], *cells, round(d.get(kind, float("nan")), 2)])
    return ["norm", *[f"batch {b}" for b in sizes], "drop best -> smallest (points)"], rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Accuracy against batch size (log scale), mean ± std over seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, by_batch in results["accuracy"].items():
        sizes = sorted(by_batch, key=int)
        stats = [mean_std(by_batch[b]) for b in sizes]
        ax.errorbar(
            [int(b) for b in sizes],
            [m for m, _ in stats],
            yerr=[s for _, s in stats],
            label=LABELS[kind],
            marker="o",
            capsize=3,
        )
    ax.set_xscale("log", base=2)
    ticks = sorted({int(b) for by_batch in results["accuracy"].values() for b in by_batch})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("batch size per step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits CNN: accuracy vs batch size")
    ax.grid(alpha=0.3)
    ax.legend()
    return [save(fig, out, "accuracy_vs_batch.png")]


EXPERIMENT = Experiment(
    "small-batch",
    "Test accuracy vs batch size: BN, BRN, CBN, GN, DBN",
    __doc__.split("\n\n", 1)[1].strip(),
    run,
    claim,
    table,
    plot,
)
