"""Helpers shared by the test modules: the normalization kinds, one layer factory and a small ResNet.

Test modules import these by name (``from _shared import make_norm``): pytest puts ``tests/`` on
``sys.path`` (the default ``prepend`` import mode; ``tests/`` is not a package). ``conftest.py``
turns them into fixtures.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

import normlab
from normlab.surgery import common_settings, replace_module, transfer_state

__all__ = [
    "KIND_OPTIONS",
    "STAT_KINDS",
    "BasicBlock",
    "ResNet",
    "compiled_matches_eager",
    "make_norm",
    "resnet",
    "to_kind",
]

# Settings the tests give each kind unless they pass their own: DecorrelatedBatchNorm whitens groups
# of 4 channels (so 6 channels are a group of 4 and a padded group of 2), CrossIterationBatchNorm
# pools a window of 3 iterations, GhostBatchNorm normalizes ghost batches of 4 samples and
# BatchKalmanNorm micro-batches of 4 (linked where convert finds a chain), GroupNorm has 2 groups
# (its default, 32, divides no width here).
KIND_OPTIONS: dict[str, dict[str, Any]] = {
    "dbn": {"group_size": 4},
    "cbn": {"window": 3},
    "ghost": {"virtual_batch_size": 4},
    "bkn": {"micro_batch": 4},
    "gn": {"num_groups": 2},
}

_TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

# A lone layer converted to "cbn" has no producer to pair with: convert says so, and it is expected here.
_UNPAIRED = r"find_pairs: cannot trace|convert: \d+ CrossIterationBatchNorm layer\(s\) could not be paired"


def _convert_layer(layer: nn.Module, kind: str, **kwargs: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UNPAIRED, category=UserWarning)
        return normlab.convert(layer, kind, **(KIND_OPTIONS.get(kind, {}) | kwargs))


def _keeps_running_stats(kind: str) -> bool:
    return normlab.is_stat_norm(_convert_layer(nn.BatchNorm2d(8), kind))


# "torch" is torch's own nn.BatchNorm1d/2d/3d; then every registered kind whose layers keep running
# statistics (GroupNorm, for one, does not).
STAT_KINDS: list[str] = ["torch", *(kind for kind in normlab.kinds() if _keeps_running_stats(kind))]


def make_norm(kind: str, num_features: int, *, dims: int = 2, **kwargs: Any) -> nn.Module:
    """A fresh normalization layer of ``kind`` with ``num_features`` channels.

    ``"torch"`` is torch's ``nn.BatchNorm1d``/``2d``/``3d`` (by ``dims``, the input's spatial rank
    plus one for ``(N, C)`` inputs), ``"bn"`` is :class:`normlab.BatchNorm` (any rank); every other
    kind is built by :func:`normlab.convert` from a fresh torch BatchNorm, with ``KIND_OPTIONS[kind]``
    updated by ``kwargs``. ``kwargs`` go to the layer (``eps``, ``momentum``, ``dtype``, ...).
    """
    if kind == "torch":
        return _TORCH_BN[dims](num_features, **kwargs)
    if kind == "bn":
        return normlab.BatchNorm(num_features, **kwargs)
    return _convert_layer(_TORCH_BN[dims](num_features), kind, **kwargs)


def to_kind(model: nn.Module, kind: str, **kwargs: Any) -> nn.Module:
    """``model``, built with torch BatchNorm layers, with those layers made of ``kind`` (in place).

    ``"torch"`` leaves them; ``"bn"`` swaps in :class:`normlab.BatchNorm` with the same settings and
    state; every other kind goes through :func:`normlab.convert` with ``KIND_OPTIONS[kind]`` updated
    by ``kwargs``, warnings included (a CrossIterationBatchNorm without a producer warns). Returns
    the model (the new layer when ``model`` is a normalization layer itself).
    """
    if kind == "torch":
        return model
    if kind == "bn":
        for name, layer in list(model.named_modules()):
            if type(layer) in _TORCH_BN.values():
                new = normlab.BatchNorm(**(common_settings(layer) | {"momentum": layer.momentum} | kwargs))
                transfer_state(layer, new)
                new.train(layer.training)
                model = replace_module(model, name, new)
        return model
    return normlab.convert(model, kind, inplace=True, **(KIND_OPTIONS.get(kind, {}) | kwargs))


# ----------------------------------------------------------------------------- a ResNet
def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: conv3x3-bn-relu-conv3x3-bn, ``out += identity``, relu.

    ``inplace=False`` adds the shortcut and applies the ReLUs out of place (the same function), for
    tests that compare the two forms.
    """

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, inplace: bool = True
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        if self.inplace:
            out += identity
        else:
            out = out + identity
        return self.relu(out)


class ResNet(nn.Module):
    """A small ResNet: a 3x3 stem (``conv1``, ``bn1``, ``relu``), one stage ``layer<i>`` of
    ``blocks`` basic blocks per width (the first stage at stride 1, the others at stride 2 with a
    1x1 conv + bn ``downsample``), global average pooling and a Linear ``fc``.

    ``head_norm``: ``None``; ``"pre"``, a BatchNorm1d on the pooled features before ``fc`` (no
    conv or linear feeds it directly); or ``"post"``, a BatchNorm1d on ``fc``'s output.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (8, 16),
        in_channels: int = 3,
        num_classes: int = 10,
        blocks: int = 1,
        head_norm: str | None = None,
        stem_bias: bool = False,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        if head_norm not in (None, "pre", "post"):
            raise ValueError(f"head_norm: expected None, 'pre' or 'post', got {head_norm!r}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=stem_bias)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=inplace)
        inplanes = widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            layers = [BasicBlock(inplanes, planes, stride, downsample, inplace)]
            layers += [BasicBlock(planes, planes, inplace=inplace) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            inplanes = planes
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head_norm_at = head_norm
        if head_norm is not None:
            self.head_norm = nn.BatchNorm1d(widths[-1] if head_norm == "pre" else num_classes)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        if self.head_norm_at == "pre":
            x = self.head_norm(x)
        x = self.fc(x)
        if self.head_norm_at == "post":
            x = self.head_norm(x)
        return x


def resnet(**kwargs: Any) -> ResNet:
    """A :class:`ResNet` (keywords as its constructor's), with torch's nn.BatchNorm2d/1d layers
    for tests to convert; with the defaults it takes ``(N, 3, 8, 8)`` inputs and has six
    BatchNorm2d layers: the stem's, ``layer1.0``'s two and ``layer2.0``'s three."""
    return ResNet(**kwargs)


def compiled_matches_eager(
    eager: nn.Module,
    shape: tuple[int, ...],
    buffers: tuple[str, ...],
    steps: int = 3,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> nn.Module:
    """Train a copy of ``eager`` under ``torch.compile(fullgraph=True)`` beside it for ``steps`` steps,
    on inputs in ``memory_format``.

    Outputs, input and weight gradients and the named ``buffers`` must agree. Returns the copy.
    """
    import copy

    torch._dynamo.reset()
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    for step in range(steps):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step)) * 1.5 + 0.3
        x = x.to(memory_format=memory_format)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = eager(x1), compiled(x2)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(eager.weight.grad, compiled_layer.weight.grad, rtol=1e-4, atol=1e-4)
        for name in buffers:
            torch.testing.assert_close(getattr(eager, name), getattr(compiled_layer, name))
    return compiled_layer
