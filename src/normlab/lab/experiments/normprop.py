"""normprop: Normalization Propagation (Arpit et al., "Normalization Propagation: A Parametric
Technique for Removing Internal Covariate Shift in Deep Networks", ICML 2016, arXiv 1603.01431):
the distribution of each hidden layer's normalized input over training, for NormProp and BN (the
paper's figure on the evolution of the hidden-layer input mean), plus NormProp trained with batch
size 1.

What the paper tracks: the mean, over the validation set, of the hidden layers' normalized input
(the quantity each method claims is zero-mean and unit-variance) at every epoch, for NormProp and
BN; its statement is that NormProp's is both steadier and closer to zero mean than BN's, whose
validation-time estimates (moving averages of minibatch statistics) lag the shifting parameters,
especially early in training. Like with like, here:

* NormProp: ``z = W_i . x / (c ||W_i||)``, the pre-activation *before* the learned gain and bias
  (``u = gamma z + beta``; ``gamma, beta`` move by design and are not part of the normalization);
* BN: ``x_hat = (t - running_mean) / sqrt(running_var + eps)`` in eval mode, also before BN's affine.

Both are measured in eval mode on the held-out test images (the validation set), every few steps
from initialization on, per unit; the table and claim use the mean over units of ``|unit mean|``
(the paper plots one random unit per layer; the average over units is the same quantity with less
noise) and, for steadiness, each unit's standard deviation over the recorded steps.

Networks: MLPs of 3 hidden layers (64 units) on scikit-learn's digits (64 pixels), both behind the
same per-pixel standardization with dataset statistics (:class:`normlab.normprop.Standardize`, the
paper's input step): NormProp (``NormPropLinear -> NormPropReLU``) and BN (``Linear -> BatchNorm1d
-> ReLU``), same SGD settings. NormProp needs no batch statistics, so it also trains at batch size 1,
where BN cannot normalize (one value per unit).

Claim check: NormProp's mean ``|unit mean|`` over layers, steps and seeds is at most BN's (closer
to zero mean), its per-unit standard deviation over training is at most BN's (steadier), and
NormProp trains at batch size 1 to 80 % test accuracy (a fixed floor, well above the 10 % of chance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab import normprop

from ..data import Split, digits, subset
from ..models import mlp, run_with_hooks, with_norm
from ..report import Claim, mean_std, pyplot
from ..train import Context, TrainConfig, count_steps, evaluate, fit
from . import Experiment
from .common import save

VARIANTS = ("NormProp", "BN")
BATCH1_MIN = 80.0  # test accuracy (%) NormProp must reach when trained with batch size 1
HIDDEN, DEPTH = 64, 3


def _normprop_net(std: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = [std, nn.Flatten()]
    width = 64
    for _ in range(DEPTH):
        layers += [normprop.NormPropLinear(width, HIDDEN), normprop.NormPropReLU()]
        width = HIDDEN
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def _build(label: str, std: nn.Module) -> tuple[nn.Sequential, list[nn.Module]]:
    """The network and its normalizing modules (NormPropLinear or BatchNorm1d), in order."""
    if label == "NormProp":
        net = _normprop_net(std)
        return net, [m for m in net if isinstance(m, normprop.NormPropLinear)]
    net = with_norm(nn.Sequential(std, mlp(64, HIDDEN, DEPTH, 10)), "bn")
    return net, [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]


def normalized_input(module: nn.Module, x: Tensor) -> Tensor:
    """The normalized pre-activation a layer computes from its input ``x``, before its learned affine.

    NormPropLinear: ``W_i . x / (c ||W_i||)``; BatchNorm1d (eval): ``(x - running_mean) / sqrt(running_var + eps)``.
    """
    if isinstance(module, nn.BatchNorm1d):
        return (x - module.running_mean) / torch.sqrt(module.running_var + module.eps)
    w = module.weight
    return F.linear(x, w / (module.factor * w.norm(dim=1, keepdim=True).clamp_min(module.eps)))


@torch.no_grad()
def unit_means(model: nn.Module, layers: list[nn.Module], x: Tensor) -> tuple[list[list[float]], list[float]]:
    """Per layer: each unit's mean of the normalized input over ``x`` (eval mode), and the mean unit variance."""
    was = model.training
    model.eval()
    means: list[list[float]] = []
    variances: list[float] = []

    def hook(m: nn.Module, args: tuple[Tensor, ...], _out: Tensor) -> None:
        var, mean = torch.var_mean(normalized_input(m, args[0]).double(), dim=0, correction=0)
        means.append(mean.tolist())
        variances.append(float(var.mean()))

    try:
        run_with_hooks(model, x, layers, hook)
    finally:
        model.train(was)
    return means, variances


def run(ctx: Context) -> dict[str, Any]:
    """Train NormProp and BN, recording the hidden layers' normalized inputs on the test set; then batch 1."""
    split = digits()
    if ctx.preset == "tiny":
        split = subset(split, 128, 64)
    split = Split(split.name, split.x_train.flatten(1), split.y_train, split.x_test.flatten(1), split.y_test)
    mean, sd = normprop.dataset_statistics([split.x_train])
    seeds = ctx.pick(1, 2, 5)
    epochs = ctx.pick(1, 6, 20)
    epochs1 = ctx.pick(1, 1, 3)
    batch, lr = 32, 0.05
    cfg = TrainConfig(epochs, batch, lr)
    every = max(1, count_steps(split, cfg) // 25)
    probe = split.x_test.to(ctx.device)
    moments: dict[str, list[dict[str, list]]] = {v: [] for v in VARIANTS}
    acc: dict[str, list[float]] = {v: [] for v in VARIANTS}
    batch1: dict[str, Any] = {}
    total = seeds * len(VARIANTS) + 2
    with ctx.bar(total=total, desc="normprop") as bar:
        for s in range(seeds):
            seed = ctx.run_seed(s)
            for label in VARIANTS:
                torch.manual_seed(seed)
                model, layers = _build(label, normprop.Standardize(mean, sd, dim=1))
                model.to(ctx.device)
                rec: dict[str, list] = {"step": [], "unit_mean": [], "var": []}

                def record(step: int, m: nn.Module, rec: dict = rec, layers: list = layers) -> None:
                    if step % every == 0:
                        _record(rec, step, m, layers, probe)

                _record(rec, 0, model, layers, probe)
                fit(model, split, cfg, ctx, seed=seed, desc=label, on_step=record)
                moments[label].append(rec)
                acc[label].append(100 * evaluate(model, split.x_test, split.y_test)[0])
                bar.update(1)
        # Batch size 1: NormProp trains; BN cannot normalize a single value per unit.
        seed = ctx.run_seed(0)
        cfg1 = TrainConfig(epochs1, 1, lr / 32)
        torch.manual_seed(seed)
        model, _ = _build("NormProp", normprop.Standardize(mean, sd, dim=1))
        hist = fit(model, split, cfg1, ctx, seed=seed, desc="NormProp batch 1")
        batch1["NormProp"] = {
            "test_accuracy": 100 * evaluate(model, split.x_test, split.y_test)[0],
            "steps": hist.steps,
            "final_loss": sum(hist.losses[-100:]) / len(hist.losses[-100:]),
        }
        bar.update(1)
        torch.manual_seed(seed)
        model, _ = _build("BN", normprop.Standardize(mean, sd, dim=1))
        try:
            fit(model, split, TrainConfig(1, 1, lr / 32, max_steps=1), ctx, seed=seed, desc="BN batch 1")
            batch1["BN"] = {"error": None}
        except ValueError as err:
            batch1["BN"] = {"error": str(err)}
        bar.update(1)
    settings = {
        "data": f"digits as 64 pixels, {len(split.y_train)} train / {len(split.y_test)} test, per-pixel "
        "standardization with dataset statistics",
        "models": f"MLP {DEPTH} x {HIDDEN}: NormPropLinear+NormPropReLU / Linear+BN+ReLU",
        "batch_size": batch,
        "epochs": epochs,
        "seeds": seeds,
        "optimizer": f"SGD lr {lr} momentum 0.9; batch 1: lr {lr / 32:g}, {epochs1} epoch(s)",
        "record_every_steps": every,
        "measured": "per unit, over the test images in eval mode: the mean of the normalized hidden-layer input "
        "before the learned affine (NormProp: W.x / (c ||W||); BN: (t - running_mean) / sqrt(running_var + eps))",
        "claim_thresholds": {"batch1_accuracy_min": BATCH1_MIN},
    }
    return {"settings": settings, "moments": moments, "accuracy": acc, "batch1": batch1, "notes": []}


def _record(rec: dict[str, list], step: int, model: nn.Module, layers: list[nn.Module], probe: Tensor) -> None:
    means, variances = unit_means(model, layers, probe)
    rec["step"].append(step)
    rec["unit_mean"].append(means)
    rec["var"].append(variances)


def distance_from_zero(results: dict[str, Any], label: str) -> float:
    """Mean over units of ``|unit mean|``, averaged over layers, recorded steps and seeds."""
    values = [
        sum(abs(u) for u in layer) / len(layer)
        for rec in results["moments"].get(label, [])
        for record in rec["unit_mean"]
        for layer in record
        if layer
    ]
    return sum(values) / len(values) if values else float("nan")


def unsteadiness(results: dict[str, Any], label: str) -> float:
    """Each unit's standard deviation of its mean over the recorded steps, averaged over units, layers, seeds."""
    values = []
    for rec in results["moments"].get(label, []):
        records = rec["unit_mean"]
        if len(records) < 2:
            continue
        for layer in range(len(records[0])):
            for unit in range(len(records[0][layer])):
                values.append(mean_std([r[layer][unit] for r in records])[1])
    return sum(values) / len(values) if values else float("nan")


def claim(results: dict[str, Any]) -> Claim:
    """NormProp's normalized hidden inputs are closer to zero mean and steadier than BN's; it trains at batch 1."""
    c = Claim(
        "on validation data, NormProp's normalized hidden-layer inputs (before the learned affine) stay closer to "
        "zero mean and steadier over training than BN's, and NormProp trains at batch size 1 "
        f"(test accuracy >= {BATCH1_MIN:g} %)"
    )
    if not results["moments"].get("NormProp") or not results["moments"].get("BN"):
        c.missing.append("NormProp or BN was not run")
        return c
    c.at_least(
        "mean |unit mean|: BN - NormProp",
        distance_from_zero(results, "BN") - distance_from_zero(results, "NormProp"),
        0.0,
    )
    c.at_least(
        "unit mean's std over training: BN - NormProp",
        unsteadiness(results, "BN") - unsteadiness(results, "NormProp"),
        0.0,
    )
    b1 = results["batch1"].get("NormProp", {}).get("test_accuracy", float("nan"))
    c.at_least("NormProp batch-1 test accuracy (%)", b1, BATCH1_MIN)
    return c


def _abs_mean(record: list[list[float]]) -> list[float]:
    return [sum(abs(u) for u in layer) / len(layer) for layer in record]


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Per network: test accuracy, distance from zero mean, unsteadiness, and the last recorded moments (seed 0)."""
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
                round(distance_from_zero(results, label), 4),
                round(unsteadiness(results, label), 4),
                " / ".join(f"{m:.3f}" for m in _abs_mean(last["unit_mean"][-1])),
                " / ".join(f"{v:.2f}" for v in last["var"][-1]),
            ]
        )
    b1 = results["batch1"]
    if "NormProp" in b1:
        rows.append(["NormProp", 1, f"{b1['NormProp']['test_accuracy']:.1f}", "-", "-", "-", "-"])
    if "BN" in b1:
        rows.append(["BN", 1, "cannot train" if b1["BN"]["error"] else "trained", "-", "-", "-", "-"])
    headers = [
        "network",
        "batch",
        "test accuracy (%)",
        "mean |unit mean|",
        "unit mean's std over training",
        "final |unit mean| per layer",
        "final unit variance per layer",
    ]
    return headers, rows


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """Per hidden layer, against the step (seed 0): mean |unit mean| and mean unit variance of the normalized input."""
    if not any(results["moments"].values()):
        return []
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["-", "--", ":"]
    for i, (label, runs) in enumerate(results["moments"].items()):
        if not runs:
            continue
        rec = runs[0]
        for layer in range(len(rec["unit_mean"][0])):
            kw = {"color": f"C{i}", "linestyle": styles[layer % 3], "label": f"{label} layer {layer + 1}"}
            ax1.plot(rec["step"], [_abs_mean(r)[layer] for r in rec["unit_mean"]], **kw)
            ax2.plot(rec["step"], [v[layer] for v in rec["var"]], **kw)
    ax1.set_ylabel("mean over units of |unit mean|")
    ax2.set_ylabel("mean over units of the variance")
    ax1.set_title("normalized hidden input on validation data")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=6, ncol=1)
    return [save(fig, out, "normprop_moments.png")]


EXPERIMENT = Experiment(
    "normprop",
    "NormProp: normalized hidden-layer inputs over training, and batch size 1",
    __doc__.split("\n\n", 1)[1].strip(),
    run,
    claim,
    table,
    plot,
)
