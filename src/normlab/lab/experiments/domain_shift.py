"""domain-shift: AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain
Adaptation", ICLR workshop 2017, arXiv 1603.04779): train on a source domain, then re-estimate every
BN layer's statistics on the unlabeled target domain (:func:`normlab.adapt`) and compare accuracy.

Source: scikit-learn's digits. Targets: the same digits (train images for adaptation, test images for
evaluation) after a change of appearance: lower contrast with a brighter background, inversion,
additive Gaussian noise, and a small affine change (shift by one pixel and 10 % zoom). Every domain is
standardized with the *source* statistics, as a deployed model would be. The per-layer statistic
shift (:func:`normlab.statistic_shift`: mean symmetric KL divergence between each layer's
stored statistics and its input statistics on the held-out target test images) is measured before
and after adaptation.
The paper's claim: replacing the source statistics by target statistics raises target accuracy,
with no labels and no change of weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import normlab

from ..data import digits, subset
from ..models import cnn
from ..report import Claim, mean_std, pyplot
from ..train import Context, TrainConfig, evaluate, fit
from . import Experiment
from .common import save

GAIN_MIN = 3.0  # points AdaBN must gain over the source-only model, averaged over the shifts
SHIFT_DROP = 0.5  # the mean statistic shift must fall by at least this fraction


def _contrast(x: Tensor, g: torch.Generator) -> Tensor:
    return 0.4 * x + 0.5


def _invert(x: Tensor, g: torch.Generator) -> Tensor:
    return 1.0 - x


def _noise(x: Tensor, g: torch.Generator) -> Tensor:
    return x + 0.3 * torch.randn(x.shape, generator=g)


def _affine(x: Tensor, g: torch.Generator) -> Tensor:
    theta = torch.tensor([[1 / 1.1, 0.0, 0.25], [0.0, 1 / 1.1, 0.25]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


SHIFTS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "contrast": _contrast,
    "inversion": _invert,
    "noise": _noise,
    "affine": _affine,
}


def _batches(x: Tensor, size: int = 128) -> list[Tensor]:
    return list(x.split(size))


def run(ctx: Context) -> dict[str, Any]:
    """Train source models; per shift, evaluate before and after AdaBN and measure the statistic shift."""
    raw = digits()
    if ctx.preset == "tiny":
        raw = subset(raw, 128, 64)
    mean, std = raw.x_train.mean(), raw.x_train.std()
    seeds = ctx.pick(1, 2, 5)
    epochs = ctx.pick(1, 6, 20)
    width = ctx.pick(4, 8, 16)
    batch, lr, mode = 32, 0.1, "layerwise"
    acc: dict[str, dict[str, list[float]]] = {}
    shift: dict[str, dict[str, list[float]]] = {}
    per_layer: dict[str, dict[str, list[float]]] = {}
    with ctx.bar(total=seeds * (1 + len(SHIFTS)), desc="domain-shift") as bar:
        for s in range(seeds):
            seed = ctx.run_seed(s)
            torch.manual_seed(seed)
            src = type(raw)(raw.name, (raw.x_train - mean) / std, raw.y_train, (raw.x_test - mean) / std, raw.y_test)
            model = cnn(1, width, 10, dims=2).to(ctx.device)
            fit(model, src, TrainConfig(epochs, batch, lr), ctx, seed=seed, desc="source")
            model.eval()
            acc.setdefault("source (no shift)", {}).setdefault("source-only", []).append(
                100 * evaluate(model, src.x_test, src.y_test)[0]
            )
            bar.update(1)
            for name, f in SHIFTS.items():
                g = torch.Generator().manual_seed(seed + 7)
                target_train = (f(raw.x_train, g) - mean) / std
                target_test = (f(raw.x_test, g) - mean) / std
                # Adapt on the target's training images; measure the shift on its held-out test images.
                before = normlab.statistic_shift(model, None, _batches(target_test), device=ctx.device)
                adapted = normlab.adapt(copy.deepcopy(model), _batches(target_train), mode=mode, device=ctx.device)
                after = normlab.statistic_shift(adapted, None, _batches(target_test), device=ctx.device)
                a = acc.setdefault(name, {})
                a.setdefault("source-only", []).append(100 * evaluate(model, target_test, raw.y_test)[0])
                a.setdefault("AdaBN", []).append(100 * evaluate(adapted, target_test, raw.y_test)[0])
                sh = shift.setdefault(name, {})
                sh.setdefault("before", []).append(sum(before.values()) / len(before))
                sh.setdefault("after", []).append(sum(after.values()) / len(after))
                if s == 0:
                    per_layer[name] = {
                        "layers": list(before),
                        "before": list(before.values()),
                        "after": [after[k] for k in before],
                    }
                bar.update(1)
    settings = {
        "data": f"digits, {len(raw.y_train)} train / {len(raw.y_test)} test, standardized with source statistics",
        "shifts": {
            "contrast": "0.4 x + 0.5",
            "inversion": "1 - x",
            "noise": "x + N(0, 0.3^2)",
            "affine": "translate 1 pixel right and down, zoom 1.1",
        },
        "model": f"cnn(width={width}) with BatchNorm",
        "epochs": epochs,
        "batch_size": batch,
        "seeds": seeds,
        "optimizer": f"SGD lr {lr} momentum 0.9",
        "adapt": f"normlab.adapt(mode={mode!r}) on the target's unlabeled training images",
        "claim_thresholds": {"gain_min_points": GAIN_MIN, "shift_drop_fraction": SHIFT_DROP},
    }
    return {"settings": settings, "accuracy": acc, "shift": shift, "per_layer_shift": per_layer, "notes": []}


def gains(results: dict[str, Any]) -> dict[str, float]:
    """Per shift: mean AdaBN accuracy minus mean source-only accuracy (points)."""
    return {
        name: mean_std(a["AdaBN"])[0] - mean_std(a["source-only"])[0]
        for name, a in results["accuracy"].items()
        if "AdaBN" in a
    }


def claim(results: dict[str, Any]) -> Claim:
    """AdaBN gains GAIN_MIN points on average over the shifts and cuts the statistic shift by SHIFT_DROP."""
    c = Claim(
        f"AdaBN raises target accuracy by >= {GAIN_MIN:g} points on average over the shifts, and reduces the "
        f"mean per-layer statistic shift by >= {100 * SHIFT_DROP:g} %"
    )
    g = gains(results)
    if not g:
        c.missing.append("AdaBN was not run")
        return c
    c.at_least("mean accuracy gain over shifts (points)", sum(g.values()) / len(g), GAIN_MIN)
    before = mean_std([mean_std(v["before"])[0] for v in results["shift"].values()])[0]
    after = mean_std([mean_std(v["after"])[0] for v in results["shift"].values()])[0]
    c.at_least("fraction of statistic shift removed", 1 - after / before if before > 0 else float("nan"), SHIFT_DROP)
    return c


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per domain: source-only and AdaBN accuracy, and the statistic shift before and after."""
    rows = []
    for name, a in results["accuracy"].items():
        so = "{:.1f} ± {:.1f}".format(*mean_std(a["source-only"]))
        ad = "{:.1f} ± {:.1f}".format(*mean_std(a["AdaBN"])) if "AdaBN" in a else "-"
        sh = results["shift"].get(name)
        b = f"{mean_std(sh['before'])[0]:.3g}" if sh else "-"
        af = f"{mean_std(sh['after'])[0]:.3g}" if sh else "-"
        rows.append([name, so, ad, b, af])
    return ["target domain", "source-only acc (%)", "AdaBN acc (%)", "stat. shift before", "stat. shift after"], rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Accuracy per shift (source-only vs AdaBN) and the per-layer statistic shift (seed 0)."""
    if not results["shift"]:
        return []
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(results["shift"])
    xs = range(len(names))
    for off, key in ((-0.2, "source-only"), (0.2, "AdaBN")):
        means = [mean_std(results["accuracy"][n][key])[0] for n in names]
        ax1.bar([x + off for x in xs], means, width=0.4, label=key)
    ax1.set_xticks(list(xs), names)
    ax1.set_ylabel("target test accuracy (%)")
    ax1.set_title("source-only vs AdaBN")
    ax1.legend()
    for i, (name, layer) in enumerate(results["per_layer_shift"].items()):
        ax2.plot(layer["before"], marker="o", color=f"C{i}", label=f"{name} before")
        ax2.plot(layer["after"], marker="x", linestyle="--", color=f"C{i}", label=f"{name} after")
    ax2.set_yscale("symlog", linthresh=1e-3)
    ax2.set_xlabel("normalization layer (forward order)")
    ax2.set_ylabel("statistic shift (sym. KL)")
    ax2.set_title("per-layer statistic shift")
    ax2.legend(fontsize=7)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return [save(fig, out, "domain_shift.png")]


EXPERIMENT = Experiment(
    "domain-shift",
    "Domain shift: source-only vs AdaBN",
    __doc__.split("\n\n", 1)[1].strip(),
    run,
    claim,
    table,
    plot,
)
