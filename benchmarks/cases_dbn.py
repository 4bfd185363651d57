"""DecorrelatedBatchNorm against torch's BatchNorm and against a plain autograd-through-eigh layer.

Targets (issue 3): zca <= 2.0x native BatchNorm and >= 1.3x faster than autograd through ``eigh``
(time ratio <= 1/1.3); newton <= 1.8x native BatchNorm. Forward+backward, train mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import normlab

from harness import Case, native_bn, norm_step

SHAPES = [(32, 64, 16, 16), (512, 1024)]
GROUP_SIZES = [16, 64]


class EighAutogradDBN(nn.Module):
    """Reference ZCA decorrelated batch normalization: plain ops, autograd through ``torch.linalg.eigh``.

    ``C`` must be a multiple of ``group_size``. The straightforward implementation: centre, covariance,
    ``D Lambda^{-1/2} D^T``, whiten, affine, every op differentiated by autograd.
    """

    def __init__(self, num_features: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.g = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        groups = c // self.g
        xg = x.transpose(0, 1).reshape(groups, self.g, -1)  # (G, g, m)
        xc = xg - xg.mean(-1, keepdim=True)
        sigma = xc @ xc.mT / xc.size(-1) + self.eps * torch.eye(self.g)
        lam, d = torch.linalg.eigh(sigma)
        w = d @ torch.diag_embed(lam.rsqrt()) @ d.mT
        y = (w @ xc).reshape(c, n, *x.shape[2:]).transpose(0, 1)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


def _dbn(shape: tuple[int, ...], group_size: int, method: str):
    return lambda: norm_step(normlab.DecorrelatedBatchNorm(shape[1], group_size=group_size, method=method), shape)


def _eigh_autograd(shape: tuple[int, ...], group_size: int):
    return lambda: norm_step(EighAutogradDBN(shape[1], group_size), shape)


def _bn(shape: tuple[int, ...]):
    return lambda: norm_step(native_bn(shape), shape)


CASES = []
for _s in SHAPES:
    for _g in GROUP_SIZES:
        CASES += [
            Case("DecorrelatedBatchNorm", f"zca g={_g}", _s, _dbn(_s, _g, "zca"), _bn(_s), 2.0),
            Case(
                "DecorrelatedBatchNorm",
                f"zca g={_g}",
                _s,
                _dbn(_s, _g, "zca"),
                _eigh_autograd(_s, _g),
                round(1 / 1.3, 3),  # at least 1.3x faster
                baseline_label="autograd through eigh",
            ),
            Case("DecorrelatedBatchNorm", f"newton g={_g}", _s, _dbn(_s, _g, "newton"), _bn(_s), 1.8),
        ]
