"""Whole models, as users run them: a training step (forward, loss, backward) of a ResNet-18 written
to torchvision's structure (in-place residual add and ReLU, 7x7 stem, max pool, [2, 2, 2, 2] basic
blocks of 64..512 channels) at 16x3x64x64, and of a 4-layer MLP with BatchNorm1d at 512x1024; each
kind converted from the same model against the model with torch's BatchNorm, in the same run.

The label carries the state dict's size against BatchNorm's (what a checkpoint costs). Targets (time):
brn and mobn <= 1.05x, dbn (group size 16) <= 1.3x, cbn (window 8) <= 1.5x, ghost and bkn <= 1.1x (ghost
batches and micro-batches of 4 in the ResNet's batch of 16, of 32 in the MLP's 512). A "floor of cbn" row
times the BatchNorm model plus the one computation every exact CBN step adds to it (the derivatives of
each normalized input's statistics with respect to its producer's weights), so that the cbn row can be
read against what is unavoidable; a "floor of exact cbn" row adds the reading of a full window that
the paper's exact per-slot pooling needs at every step (every slot's dmu/dW and dnu/dW times the
current weights, and this step's stored in the oldest slot), and a "floor of aggregated cbn" row instead
the least that an approximate window pooled from the sums of its slots would add (keeping those sums,
and their products with the weights).
A "floor of bkn" row times ghost BN (BKN's micro-batches) plus the products every linked BKN layer adds:
its prediction through the producer's weights and that product's backward.
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn

import normlab
from normlab.cross_iteration import COMPENSATED, producer_derivatives

from harness import Case, Step

RESNET_INPUT = (16, 3, 64, 64)
MLP_INPUT = (512, 1024)
# kind -> (convert options, time target)
KINDS = {
    "brn": ({}, 1.05),
    "mobn": ({}, 1.05),
    "dbn": ({"group_size": 16}, 1.3),
    "cbn": ({"window": 8}, 1.5),
    "ghost": ({}, 1.1),
    "bkn": ({}, 1.1),
}
# Ghost batches (and BKN's micro-batches) of a quarter of the ResNet's batch of 16 and a sixteenth
# of the MLP's batch of 512.
GHOST = {"resnet18": 4, "mlp4": 32}


class BasicBlock(nn.Module):
    """torchvision's basic block: conv3x3-bn-relu-conv3x3-bn, ``out += identity``, relu (in place)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet18(num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    inplanes = 64
    for i, planes in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        layers += [BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)]
        inplanes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def mlp(width: int = 1024, depth: int = 4) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _train_step(model: nn.Module, shape: tuple[int, ...]) -> Step:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    return step


def _state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def _options(name: str, kind: str) -> dict:
    groups = {"ghost": {"virtual_batch_size": GHOST[name]}, "bkn": {"micro_batch": GHOST[name]}}
    return KINDS[kind][0] | groups.get(kind, {})


def _converted(name: str, build, kind: str, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = normlab.convert(build(), kind, **_options(name, kind))
    model.train()(torch.randn(shape))  # one step: CBN's window starts to fill, its state is sized
    return model


def _cases(name: str, build, shape: tuple[int, ...]) -> list[Case]:
    torch.manual_seed(0)
    base_state = _state_bytes(build())
    cases = []
    for kind, (_, target) in KINDS.items():
        settings = ", ".join(f"{k}={v}" for k, v in _options(name, kind).items())
        state = _state_bytes(_converted(name, build, kind, shape)) / base_state
        cases.append(
            Case(
                f"model: {name}",
                f"{kind}{f' ({settings})' if settings else ''}, state dict {state:.2f}x",
                shape,
                lambda kind=kind: _train_step(_converted(name, build, kind, shape), shape),
                lambda: _train_step(copy.deepcopy(build()), shape),
                target,
                baseline_label="BatchNorm (whole model)",
            )
        )
    window = KINDS["cbn"][0]["window"]
    for label, slots, aggregated in (
        ("floor of cbn: BatchNorm + dmu/dW, dnu/dW", 0, False),
        (
            f"floor of exact cbn (window={window}): BatchNorm + dmu/dW, dnu/dW + {window - 1} slots' products "
            "with W + this step's stored",
            window - 1,
            False,
        ),
        (
            f"floor of aggregated cbn (window={window}): BatchNorm + dmu/dW, dnu/dW + the slots' running sums "
            "and their products with W",
            window - 1,
            True,
        ),
    ):
        cases.append(
            Case(
                f"model: {name}",
                label,
                shape,
                lambda slots=slots, aggregated=aggregated: _train_step(
                    _with_derivatives(build(), slots, aggregated), shape
                ),
                lambda: _train_step(copy.deepcopy(build()), shape),
                baseline_label="BatchNorm (whole model)",
            )
        )
    cases.append(
        Case(
            f"model: {name}",
            f"floor of bkn (micro_batch={GHOST[name]}): ghost BN + the transitions' products",
            shape,
            lambda: _train_step(_with_transitions(name, build), shape),
            lambda: _train_step(copy.deepcopy(build()), shape),
            baseline_label="BatchNorm (whole model)",
        )
    )
    return cases


def _with_transitions(name: str, build) -> nn.Module:
    """The ghost-BN model (BKN's micro-batches without predictions) computing, in each training step, what
    every linked BKN layer adds to it: its prediction through the producer's weights (the taps' sums of W
    and W^2 against each micro-batch's moments) and that product's backward (the moments' gradients and
    the weights' gradient a + 2 b W, added to a gradient buffer). No rectified-Gaussian moments, no
    posterior, no autograd: the products any implementation of the paper's transition computes."""
    torch.manual_seed(0)
    model = normlab.convert(build(), "ghost", virtual_batch_size=GHOST[name])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = normlab.convert(build(), "bkn", **_options(name, "bkn"))
    names = {id(m): n for n, m in probe.named_modules()}
    linked = [names[id(m.link[1])] for m in probe.modules() if isinstance(m, normlab.BatchKalmanNorm) and m.link]
    modules = dict(model.named_modules())

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not module.training:
            return
        groups = out.size(0) // GHOST[name]
        w = module.weight.detach()
        taps = w.reshape(w.size(0), w.size(1), -1)
        ones = torch.ones(taps.size(-1))
        w1 = taps.reshape(-1, taps.size(-1)) @ ones
        w2 = taps.square().reshape(-1, taps.size(-1)) @ ones
        w1, w2 = w1.view(taps.shape[:2]), w2.view(taps.shape[:2])
        e, d = torch.rand(2, groups, w.size(1))
        g_mu, g_var = e @ w1.t(), d @ w2.t()  # the prediction, standing in for its incoming gradients
        g_mu @ w1, g_var @ w2  # noqa: B018  the moments' gradients
        a, b = g_mu.t() @ e, g_var.t() @ d
        buffers[module].add_(torch.addcmul(a.unsqueeze(-1), taps, b.unsqueeze(-1), value=2).view_as(w))

    buffers = {}
    for n in linked:
        buffers[modules[n]] = torch.zeros_like(modules[n].weight)
        modules[n].register_forward_hook(hook)
    return model


def _with_derivatives(model: nn.Module, slots: int = 0, aggregated: bool = False) -> nn.Module:
    """The BatchNorm model computing, in each training step, what any exact CBN step must add to it: the
    closed-form derivatives of each BatchNorm input's mean and mean square with respect to the weights of
    the layer that produced it (one weight gradient of that layer per step). With ``slots``, also the
    reading of a full window that the paper's per-slot max(nu, mu^2) needs at every step (it is not
    linear, so the slots cannot be summed beforehand): each stored iteration's mean and mean square moved
    to the current weights, that is each slot's dmu/dW (one row per slot, the same for all output
    channels) times the current weights, in one matrix product, and each slot's dnu/dW (weight-sized)
    dotted with them, per channel; then this step's derivatives stored in the place of the oldest. No
    pooling.

    ``aggregated``: instead, the least an approximate window pooled after summing its slots must do: keep
    the sums of the last ``slots`` dmu/dW and dnu/dW (add this step's, subtract the one that leaves the
    window, store this step's in its place) and take each sum's product with the current weights."""
    producers = [m for m in model.modules() if isinstance(m, COMPENSATED)][:-1]  # not the classifier
    window = {p: torch.randn(slots, *p.weight.shape) for p in producers}
    total = {p: window[p].sum(0) for p in producers}
    mean_rows = {p: torch.randn(slots, p.weight[0].numel()) for p in producers}
    mean_total = {p: mean_rows[p].sum(0) for p in producers}
    steps = dict.fromkeys(producers, 0)

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not module.training:
            return
        count = torch.tensor(float(out.numel() // out.size(1)))
        dmu, dsq = producer_derivatives(module, args[0].detach(), out.detach(), count)
        if not slots:
            return
        weight = module.weight.detach().flatten(1)
        j = steps[module] % slots  # the oldest slot, which this step's derivatives replace
        steps[module] += 1
        leaving, leaving_mean = window[module][j], mean_rows[module][j]
        if aggregated:
            total[module].add_(dsq).sub_(leaving)
            mean_total[module].add_(dmu.flatten()).sub_(leaving_mean)
            torch.mv(weight, mean_total[module])
            torch.linalg.vecdot(total[module].flatten(1), weight)
        else:
            torch.mm(mean_rows[module], weight.t())
            for slot in window[module]:  # slot by slot, as the layer reads large windows
                torch.linalg.vecdot(slot.flatten(1), weight)
        leaving.copy_(dsq)
        leaving_mean.copy_(dmu.flatten())

    for producer in producers:
        producer.register_forward_hook(hook)
    return model


CASES = [*_cases("resnet18", resnet18, RESNET_INPUT), *_cases("mlp4", mlp, MLP_INPUT)]
