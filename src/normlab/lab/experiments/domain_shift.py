"""domain-shift: AdaBN (Li et al., "Revisiting Batch Normalization For Practical Domain
Adaptation", ICLR workshop 2017, arXiv 1603.04779): train on a source domain, then re-estimate every
BN layer's statistics on the unlabeled target domain (:func:`normlab.adapt`) and compare accuracy.

Source: scikit-learn's digits. Targets: the same digits (train images for adaptation, test images for
evaluation) after a change of appearance: lower contrast with a brighter background, additive
Gaussian noise, a small affine change (shift by one pixel and 10 % zoom), and inversion. Every domain
is standardized with the *source* statistics, as a deployed model would be. Each seed trains one
source model (its own initial weights and minibatch order); source-only and AdaBN accuracies on a
shift come from the same model, so the gain is paired by seed.

The paper's claim, per shift: replacing the source statistics by target statistics raises target
accuracy, with no labels and no change of weights. Each shift is its own claim: the paired gain
(AdaBN minus source-only, points) must exceed ``GAIN_MIN`` with its 95 % interval; there is no
average over shifts, which would hide a shift where AdaBN hurts.

Inversion is the negative control: ``1 - x`` flips the sign of the first layer's pre-activations,
which a per-channel re-standardization cannot undo (it restores the mean and variance, not the
sign), so AdaBN is expected to leave the (below-chance) accuracy where it is: the control's claim is
that the paired change lies within ``±CONTROL_MARGIN`` points (an equivalence), and REPRODUCED means
the control behaved as expected. (Testing the paper's "gain > 1 point" on it instead gave a verdict
that changed with the base seed: a true effect near 0 sits within one interval half-width of 1.)
The per-layer statistic shift (:func:`normlab.statistic_shift`) is reported before and after
adaptation as a description only: that adaptation removes it is what ``adapt`` does by construction,
so it is no evidence for the claim.
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

from ..data import Split, digits, subset
from ..models import cnn
from ..report import Claim, mean_std, pyplot
from ..stats import Interval, mean_interval, paired_interval
from ..train import Context, TrainConfig, evaluate, fit
from . import Experiment
from .common import effects_figure, save

GAIN_MIN = 1.0  # points: the smallest AdaBN gain over source-only that counts as an improvement
CONTROL = "inversion"
CONTROL_MARGIN = 2.0  # points: the negative control holds when AdaBN changes its accuracy by less than this


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
    "noise": _noise,
    "affine": _affine,
    CONTROL: _invert,
}
SHIFT_NOTES = {
    "contrast": "0.4 x + 0.5",
    "noise": "x + N(0, 0.3^2)",
    "affine": "translate 1 pixel right and down, zoom 1.1",
    CONTROL: "1 - x (negative control)",
}
MODE = "layerwise"
BATCH, LR = 32, 0.1


def _settings(ctx: Context) -> dict[str, Any]:
    return {"epochs": ctx.pick(2, 12, 30), "width": ctx.pick(4, 8, 16)}


def _raw(ctx: Context) -> Split:
    raw = digits()
    return subset(raw, 128, 64) if ctx.preset == "tiny" else raw


def seeds(ctx: Context) -> int:
    """Paired repetitions: one source model per seed."""
    # A seed costs about 1.4 core-seconds. With 10 seeds the noise shift's gain (+1.9 [+0.6, +3.2]) straddled
    # the minimum effect and its verdict changed with the base seed; with 30 the affine shift's low end
    # (+1.3) still lay within reach of it: 60 seeds narrow the intervals to about ±1.1 points there.
    return ctx.pick(2, 60, 120)


def job(ctx: Context, s: int) -> dict[str, Any]:
    """Train a source model with seed ``ctx.run_seed(s)``; per shift, its accuracy before and after AdaBN."""
    seed = ctx.run_seed(s)
    opts = _settings(ctx)
    raw = _raw(ctx)
    mean, std = raw.x_train.mean(), raw.x_train.std()
    src = Split(raw.name, (raw.x_train - mean) / std, raw.y_train, (raw.x_test - mean) / std, raw.y_test)
    torch.manual_seed(seed)
    model = cnn(1, opts["width"], 10, dims=2).to(ctx.device)
    hist = fit(model, src, TrainConfig(opts["epochs"], BATCH, LR), ctx, seed=seed, desc="source")
    model.eval()
    out: dict[str, Any] = {
        "final_train_loss": hist.final_loss(),
        "steps": hist.steps,
        "source_accuracy": 100 * evaluate(model, src.x_test, src.y_test)[0],
        "shifts": {},
    }
    for name, f in SHIFTS.items():
        g = torch.Generator().manual_seed(seed + 7)
        target_train = (f(raw.x_train, g) - mean) / std
        target_test = (f(raw.x_test, g) - mean) / std
        # Adapt on the target's training images; measure on its held-out test images.
        adapted = normlab.adapt(copy.deepcopy(model), list(target_train.split(128)), mode=MODE, device=ctx.device)
        test_batches = list(target_test.split(128))
        before = normlab.statistic_shift(model, None, test_batches, device=ctx.device)
        after = normlab.statistic_shift(adapted, None, test_batches, device=ctx.device)
        out["shifts"][name] = {
            "source_only": 100 * evaluate(model, target_test, raw.y_test)[0],
            "adabn": 100 * evaluate(adapted, target_test, raw.y_test)[0],
            "shift_before": list(before.values()),
            "shift_after": [after[k] for k in before],
        }
    return out


def collect(ctx: Context, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per shift and seed: source-only and AdaBN accuracy, the per-layer statistic shift; per seed the source run."""
    opts = _settings(ctx)
    raw = _raw(ctx)
    names = list(SHIFTS)
    settings = {
        "data": f"digits, {len(raw.y_train)} train / {len(raw.y_test)} test, standardized with source statistics",
        "shifts": SHIFT_NOTES,
        "model": f"cnn(width={opts['width']}) with BatchNorm",
        "epochs": opts["epochs"],
        "steps": outputs[0]["steps"] if outputs else 0,
        "batch_size": BATCH,
        "optimizer": f"SGD lr {LR} momentum 0.9",
        "adapt": f"normlab.adapt(mode={MODE!r}) on the target's unlabeled training images",
        "gain_min_points": GAIN_MIN,
        "negative_control": CONTROL,
        "control_margin_points": CONTROL_MARGIN,
    }
    return {
        "settings": settings,
        "source": {
            "accuracy": [o["source_accuracy"] for o in outputs],
            "final_train_loss": [o["final_train_loss"] for o in outputs],
        },
        "accuracy": {
            n: {
                "source-only": [o["shifts"][n]["source_only"] for o in outputs],
                "AdaBN": [o["shifts"][n]["adabn"] for o in outputs],
            }
            for n in names
        },
        "shift": {n: {k: [o["shifts"][n][f"shift_{k}"] for o in outputs] for k in ("before", "after")} for n in names},
        "notes": [],
    }


def _gain(acc: dict[str, list[float]]) -> Interval:
    return paired_interval(acc["AdaBN"], acc["source-only"])


def claims(results: dict[str, Any]) -> list[Claim]:
    """Per shift: AdaBN's paired gain over source-only exceeds GAIN_MIN (the control: lies within ±CONTROL_MARGIN)."""
    out = []
    for name, acc in results["accuracy"].items():
        shift = f"On digits under the '{name}' shift ({SHIFT_NOTES.get(name, name)})"
        if name == CONTROL:
            c = Claim(
                f"AdaBN: {name} (control)",
                f"{shift}, a negative control: re-estimated per-channel statistics cannot undo a sign inversion, so "
                f"AdaBN changes target test accuracy by less than {CONTROL_MARGIN:g} points either way. REPRODUCED: "
                "the control behaved as expected; a gain beyond the margin would question the setup.",
            )
        else:
            c = Claim(
                f"AdaBN: {name}",
                f"{shift}, AdaBN (target statistics, same weights) raises target test accuracy over the "
                f"source-only model by more than {GAIN_MIN:g} point (Li et al. 2017).",
            )
        if not (acc.get("AdaBN") and acc.get("source-only")):
            c.missing.append("AdaBN was not run")
        elif name == CONTROL:
            c.equivalent(
                "AdaBN - source-only accuracy", paired_interval(acc["AdaBN"], acc["source-only"]), CONTROL_MARGIN
            )
        else:
            c.greater("AdaBN - source-only accuracy", paired_interval(acc["AdaBN"], acc["source-only"]), GAIN_MIN)
        out.append(c)
    return out


def _layer_means(per_seed: list[list[float]]) -> list[float]:
    return [sum(v) / len(v) for v in zip(*per_seed)] if per_seed else []


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per domain: source-only and AdaBN accuracy, the paired gain and the mean statistic shift before/after."""
    src = results["source"]
    rows: list[list[Any]] = [
        ["source (no shift)", "{:.1f} ± {:.1f}".format(*mean_std(src["accuracy"])), "-", "-", "-", "-"]
    ]
    for name, a in results["accuracy"].items():
        sh = results["shift"][name]
        before, after = _layer_means(sh["before"]), _layer_means(sh["after"])
        rows.append(
            [
                name + (" (control)" if name == CONTROL else ""),
                "{:.1f} ± {:.1f}".format(*mean_std(a["source-only"])),
                "{:.1f} ± {:.1f}".format(*mean_std(a["AdaBN"])),
                paired_interval(a["AdaBN"], a["source-only"]).text(),
                f"{sum(before) / len(before):.3g}" if before else "-",
                f"{sum(after) / len(after):.3g}" if after else "-",
            ]
        )
    loss = mean_interval(src["final_train_loss"])
    rows.append(["source final training loss", f"{loss.mean:.3g} (max {max(src['final_train_loss']):.3g})"] + ["-"] * 4)
    headers = ["target domain", "source-only acc (%)", "AdaBN acc (%)", "AdaBN gain, 95 % CI", "shift before", "after"]
    return headers, rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """The paired AdaBN gain per shift with its interval, and the per-layer statistic shift (mean over seeds)."""
    title = "domain-shift: AdaBN gain over source-only, paired, 95 % intervals"
    title += f" (dashed: min. effect {GAIN_MIN:g}; band: control's ±{CONTROL_MARGIN:g})"
    pngs = [save(effects_figure(claims(results), title), out, "domain_shift_effects.png")]
    fig, ax2 = pyplot().subplots(figsize=(8, 4.2))
    for i, name in enumerate(results["shift"]):
        before = _layer_means(results["shift"][name]["before"])
        after = _layer_means(results["shift"][name]["after"])
        layers = range(1, len(before) + 1)
        # A shift is a divergence (>= 0); the floor keeps an exact 0 on the log axis.
        ax2.plot(layers, [max(v, 1e-6) for v in before], marker="o", color=f"C{i}", label=f"{name}: before")
        ax2.plot(layers, [max(v, 1e-6) for v in after], marker="x", ls="--", color=f"C{i}", label=f"{name}: after")
        ax2.set_xticks(list(layers))
    ax2.set_yscale("log")
    ax2.set_xlabel("normalization layer (forward order)")
    ax2.set_ylabel("statistic shift (sym. KL)")
    ax2.set_title("per-layer statistic shift (by construction after AdaBN)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    pngs.append(save(fig, out, "domain_shift.png"))
    return pngs


EXPERIMENT = Experiment(
    "domain-shift",
    "Domain shift: source-only vs AdaBN, per shift",
    __doc__.split("\n\n", 1)[1].strip(),
    seeds,
    job,
    collect,
    claims,
    table,
    plot,
)
