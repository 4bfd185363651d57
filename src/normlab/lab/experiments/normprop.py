"""normprop: Normalization Propagation (Arpit et al., "Normalization Propagation: A Parametric
Technique for Removing Internal Covariate Shift in Deep Networks", ICML 2016, arXiv 1603.01431):
each hidden layer's pre-activation mean and variance over training for NormProp, BN and no
normalization (the paper's Figure 1 view), plus NormProp trained with batch size 1.

Three MLPs of 3 hidden layers (64 units) on scikit-learn's digits (64 pixels), each behind the same
per-pixel standardization with dataset statistics (:class:`normlab.normprop.Standardize`, the
paper's input step): NormProp (``NormPropLinear -> NormPropReLU``), BN (``Linear -> BatchNorm1d ->
ReLU``) and plain (``Linear -> ReLU``). Every few steps, the per-unit mean and variance of each hidden
layer's pre-activation (NormPropLinear's, BN's or Linear's output) on a fixed probe batch are
recorded in training mode, averaged over units. NormProp normalizes with the weights alone, so it
needs no batch statistics: it also trains at batch size 1, where BN cannot normalize (one value per
unit). Two things move NormProp's pre-activations away from N(0, 1) by design: the learned gains and
biases (``u = gamma * (...) + beta``), and input correlations (the closed form assumes a layer's
input covariance is close to the identity; digits' pixels are strongly correlated).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Split, digits, subset
from ..models import mlp, output_moments, with_norm
from ..report import Claim, mean_std, pyplot
from ..train import Context, TrainConfig, count_steps, evaluate, fit
from . import Experiment
from .common import missing_note, save

VARIANTS = ("NormProp", "BN", "none")
DRIFT_MAX = 0.5  # NormProp's mean |mean| + |log(var)| over layers and training must stay below this
BATCH1_MIN = 80.0  # test accuracy (%) NormProp must reach when trained with batch size 1
HIDDEN, DEPTH = 64, 3


def _normprop_net(np_mod: Any, std: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = [std, nn.Flatten()]
    width = 64
    for _ in range(DEPTH):
        layers += [np_mod.NormPropLinear(width, HIDDEN), np_mod.NormPropReLU()]
        width = HIDDEN
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def _build(label: str, np_mod: Any, std: nn.Module) -> tuple[nn.Sequential, list[nn.Module]]:
    """The network and its hidden layers' pre-activation modules."""
    if label == "NormProp":
        net = _normprop_net(np_mod, std)
        return net, [m for m in net if isinstance(m, np_mod.NormPropLinear)]
    base = nn.Sequential(std, mlp(64, HIDDEN, DEPTH, 10))
    net = with_norm(base, "bn" if label == "BN" else "none")
    body = list(net[1])
    # mlp(): Flatten, then (Linear, norm, ReLU) per hidden layer: the pre-activation is the norm's output.
    pre = [body[i + 1] if label == "BN" else body[i] for i, m in enumerate(body[:-1]) if isinstance(m, nn.Linear)]
    return net, pre


def run(ctx: Context) -> dict[str, Any]:
    """Train the three networks, recording each hidden layer's pre-activation moments; then NormProp at batch 1."""
    try:
        from normlab import normprop as np_mod
    except ImportError:
        return {
            "settings": {},
            "moments": {},
            "accuracy": {},
            "batch1": {},
            "notes": [missing_note("NormProp", "normlab.NormPropLinear (normprop.py)")],
        }
    split = digits()
    if ctx.preset == "tiny":
        split = subset(split, 128, 64)
    split = Split(split.name, split.x_train.flatten(1), split.y_train, split.x_test.flatten(1), split.y_test)
    mean, sd = np_mod.dataset_statistics([split.x_train])
    seeds = ctx.pick(1, 2, 5)
    epochs = ctx.pick(1, 6, 20)
    epochs1 = ctx.pick(1, 1, 3)
    batch, lr = 32, 0.05
    cfg = TrainConfig(epochs, batch, lr)
    every = max(1, count_steps(split, cfg) // 25)
    probe = split.x_train[:512].to(ctx.device)
    moments: dict[str, list[dict[str, list[list[float]]]]] = {v: [] for v in VARIANTS}
    acc: dict[str, list[float]] = {v: [] for v in VARIANTS}
    batch1: dict[str, Any] = {}
    total = seeds * len(VARIANTS) + 2
    with ctx.bar(total=total, desc="normprop") as bar:
        for s in range(seeds):
            seed = ctx.seed * 1000 + s
            for label in VARIANTS:
                torch.manual_seed(seed)
                model, pre = _build(label, np_mod, np_mod.Standardize(mean, sd, dim=1))
                model.to(ctx.device)
                rec: dict[str, list[list[float]]] = {"step": [], "mean": [], "var": []}

                def record(step: int, m: nn.Module, rec: dict = rec, pre: list = pre) -> None:
                    if step % every == 0:
                        _record(rec, step, m, pre, probe)

                _record(rec, 0, model, pre, probe)
                fit(model, split, cfg, ctx, seed=seed, desc=label, on_step=record)
                moments[label].append(rec)
                acc[label].append(100 * evaluate(model, split.x_test, split.y_test)[0])
                bar.update(1)
        # Batch size 1: NormProp trains; BN cannot normalize a single value per unit.
        seed = ctx.seed * 1000
        cfg1 = TrainConfig(epochs1, 1, lr / 32)
        torch.manual_seed(seed)
        model, _ = _build("NormProp", np_mod, np_mod.Standardize(mean, sd, dim=1))
        hist = fit(model, split, cfg1, ctx, seed=seed, desc="NormProp batch 1")
        batch1["NormProp"] = {
            "test_accuracy": 100 * evaluate(model, split.x_test, split.y_test)[0],
            "steps": hist.steps,
            "final_loss": sum(hist.losses[-100:]) / len(hist.losses[-100:]),
        }
        bar.update(1)
        torch.manual_seed(seed)
        model, _ = _build("BN", np_mod, np_mod.Standardize(mean, sd, dim=1))
        try:
            fit(model, split, TrainConfig(1, 1, lr / 32, max_steps=1), ctx, seed=seed, desc="BN batch 1")
            batch1["BN"] = {"error": None}
        except ValueError as err:
            batch1["BN"] = {"error": str(err)}
        bar.update(1)
    settings = {
        "data": f"digits as 64 pixels, {len(split.y_train)} train / {len(split.y_test)} test, per-pixel "
        "standardization with dataset statistics",
        "models": f"MLP {DEPTH} x {HIDDEN}: NormPropLinear+NormPropReLU / Linear+BN+ReLU / Linear+ReLU",
        "batch_size": batch,
        "epochs": epochs,
        "seeds": seeds,
        "optimizer": f"SGD lr {lr} momentum 0.9; batch 1: lr {lr / 32:g}, {epochs1} epoch(s)",
        "record_every_steps": every,
        "moments": "per-unit mean and biased variance of each hidden pre-activation on 512 training images "
        "(training mode: BN with the probe's batch statistics), averaged over units",
        "claim_thresholds": {"drift_max": DRIFT_MAX, "batch1_accuracy_min": BATCH1_MIN},
    }
    return {"settings": settings, "moments": moments, "accuracy": acc, "batch1": batch1, "notes": []}


def _record(rec: dict[str, list], step: int, model: nn.Module, pre: list[nn.Module], probe: torch.Tensor) -> None:
    # What the network computes in training (BN with batch statistics), on a copy so that the probe
    # leaves BN's running statistics alone.
    index = {id(m): i for i, m in enumerate(model.modules())}
    twin = copy.deepcopy(model).train()
    modules = list(twin.modules())
    stats = output_moments(twin, probe, [modules[index[id(m)]] for m in pre])
    rec["step"].append(step)
    rec["mean"].append([m for m, _ in stats])
    rec["var"].append([v for _, v in stats])


def drift(results: dict[str, Any], label: str) -> float:
    """``|mean| + |log var|`` of the pre-activations, averaged over layers, recorded steps and seeds."""
    runs = results["moments"].get(label, [])
    values = []
    for rec in runs:
        for means, vars_ in zip(rec["mean"], rec["var"]):
            values += [abs(m) + abs(math.log(max(v, 1e-12))) for m, v in zip(means, vars_)]
    return sum(values) / len(values) if values else float("nan")


def claim(results: dict[str, Any]) -> Claim:
    """NormProp's pre-activations stay near N(0, 1) (drift <= DRIFT_MAX) and drift less than the plain network's;
    NormProp trains at batch size 1 to BATCH1_MIN % test accuracy."""
    c = Claim(
        f"NormProp keeps the hidden pre-activations near zero mean and unit variance throughout training "
        f"(mean |mean| + |log var| <= {DRIFT_MAX:g}, and below the plain network's), and trains at batch size 1 "
        f"(test accuracy >= {BATCH1_MIN:g} %)"
    )
    if not results["moments"].get("NormProp"):
        c.missing.append("NormProp was not run")
        return c
    c.at_most("NormProp drift", drift(results, "NormProp"), DRIFT_MAX)
    c.at_least("plain drift - NormProp drift", drift(results, "none") - drift(results, "NormProp"), 0.0)
    b1 = results["batch1"].get("NormProp", {}).get("test_accuracy", float("nan"))
    c.at_least("NormProp batch-1 test accuracy (%)", b1, BATCH1_MIN)
    return c


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per network: test accuracy, drift, and the last recorded layer-averaged mean and variance."""
    rows = []
    for label, runs in results["moments"].items():
        if not runs:
            continue
        am, as_ = mean_std(results["accuracy"][label])
        last = runs[0]
        rows.append(
            [
                label,
                32,
                f"{am:.1f} ± {as_:.1f}",
                round(drift(results, label), 3),
                " / ".join(f"{m:.2f}" for m in last["mean"][-1]),
                " / ".join(f"{v:.2f}" for v in last["var"][-1]),
            ]
        )
    b1 = results["batch1"]
    if "NormProp" in b1:
        rows.append(["NormProp", 1, f"{b1['NormProp']['test_accuracy']:.1f}", "-", "-", "-"])
    if "BN" in b1:
        rows.append(["BN", 1, "cannot train" if b1["BN"]["error"] else "trained", "-", "-", "-"])
    return ["network", "batch", "test accuracy (%)", "drift", "final mean per layer", "final var per layer"], rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Per hidden layer: pre-activation mean and variance against the step, one color per network (seed 0)."""
    if not any(results["moments"].values()):
        return []
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", ":"]
    for i, (label, runs) in enumerate(results["moments"].items()):
        if not runs:
            continue
        rec = runs[0]
        for layer in range(len(rec["mean"][0])):
            kw = {"color": f"C{i}", "linestyle": styles[layer % 3], "label": f"{label} layer {layer + 1}"}
            ax1.plot(rec["step"], [m[layer] for m in rec["mean"]], **kw)
            ax2.plot(rec["step"], [v[layer] for v in rec["var"]], **kw)
    ax1.set_ylabel("mean over units of the pre-activation mean")
    ax2.set_ylabel("mean over units of the pre-activation variance")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=6, ncol=1)
    return [save(fig, out, "normprop_moments.png")]


EXPERIMENT = Experiment(
    "normprop",
    "NormProp: hidden-layer moments over training, and batch size 1",
    __doc__.split("\n\n", 1)[1].strip(),
    run,
    claim,
    table,
    plot,
)
