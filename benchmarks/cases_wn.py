"""Mean-only BN against torch's BatchNorm; weight norm and NormProp layers against their torch baselines.

Targets: MeanOnlyBatchNorm <= 1.15x BatchNorm's time and <= 1.1x its peak memory; weight-normalized
layers <= 1.1x the time of torch's ``parametrizations.weight_norm``; NormProp layers <= 1.25x the
time of the plain layer (they normalize the weight every step: one more pass over it each way).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrizations

import normlab

from harness import Case, native_bn, norm_step

BN_SHAPES = [(32, 64, 16, 16), (128, 64, 32, 32), (512, 1024)]
CONV_SHAPE = (32, 64, 16, 16)
LINEAR_SHAPE = (512, 1024)


def _mobn(shape: tuple[int, ...]):
    def make():
        layer = normlab.MeanOnlyBatchNorm(shape[1])
        return norm_step(layer, shape)

    return make


def _conv() -> nn.Conv2d:
    return nn.Conv2d(64, 64, 3, padding=1)


CASES = [
    Case("MeanOnlyBatchNorm", "mobn", s, _mobn(s), lambda s=s: norm_step(native_bn(s), s), 1.15, 1.1) for s in BN_SHAPES
]
CASES += [
    Case(
        "weight_norm",
        "Conv2d 3x3",
        CONV_SHAPE,
        lambda: norm_step(normlab.weight_norm(_conv()), CONV_SHAPE),
        lambda: norm_step(parametrizations.weight_norm(_conv()), CONV_SHAPE),
        1.1,
        None,
        "torch weight_norm",
    ),
    Case(
        "weight_norm",
        "Linear",
        LINEAR_SHAPE,
        lambda: norm_step(normlab.weight_norm(nn.Linear(1024, 1024)), LINEAR_SHAPE),
        lambda: norm_step(parametrizations.weight_norm(nn.Linear(1024, 1024)), LINEAR_SHAPE),
        1.1,
        None,
        "torch weight_norm",
    ),
    Case(
        "NormPropConv2d",
        "3x3",
        CONV_SHAPE,
        lambda: norm_step(normlab.NormPropConv2d(64, 64, 3, padding=1), CONV_SHAPE),
        lambda: norm_step(_conv(), CONV_SHAPE),
        1.25,
        None,
        "Conv2d",
    ),
    Case(
        "NormPropLinear",
        "",
        LINEAR_SHAPE,
        lambda: norm_step(normlab.NormPropLinear(1024, 1024), LINEAR_SHAPE),
        lambda: norm_step(nn.Linear(1024, 1024), LINEAR_SHAPE),
        1.25,
        None,
        "Linear",
    ),
]
