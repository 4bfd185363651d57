"""The hand-written training steps as torch.library custom ops: torch's own checks (opcheck).

``opcheck`` runs each op under torch's schema check, fake tensors (the shape function against the
real kernel), the autograd registration and AOT dispatch, which is what ``torch.compile`` relies on.
"""

from __future__ import annotations

import pytest
import torch

from normlab.batch_renorm import _STEP as BRN
from normlab.cross_iteration import _POOLED as CBN
from normlab.decorrelated import _STEP as DBN
from normlab.mean_only import _STEP as MOBN


def _inputs(shape):
    c = shape[1]
    x = torch.randn(shape, requires_grad=True)
    return x, torch.rand(c, requires_grad=True) + 0.5, torch.randn(c, requires_grad=True)


def _const(v: float) -> torch.Tensor:
    return torch.tensor(v)


CASES = {
    "brn": lambda x, w, b: (
        BRN,
        (
            x,
            w,
            b,
            torch.zeros(x.size(1)),
            torch.ones(x.size(1)),
            _const(1 / 3),
            _const(3.0),
            _const(-5.0),
            _const(5.0),
            1e-5,
        ),
    ),
    "mobn": lambda x, w, b: (MOBN, (x, w, b)),
    "cbn": lambda x, w, b: (
        CBN,
        (x, w, b, torch.randn(3, x.size(1)) * 0.1, torch.ones(3, x.size(1)), torch.tensor([True, False, True]), 1e-5),
    ),
    "dbn-zca": lambda x, w, b: (DBN, (x, w, b, 2, 4, 1e-5, "zca", 5)),
    "dbn-newton": lambda x, w, b: (DBN, (x, w, b, 2, 4, 1e-5, "newton", 3)),
}


@pytest.mark.parametrize("shape", [(12, 6), (4, 8, 3, 3), (4, 6, 2, 3)])
@pytest.mark.parametrize("kind", list(CASES))
def test_opcheck(kind, shape):
    torch.manual_seed(0)
    step, args = CASES[kind](*_inputs(shape))
    torch.library.opcheck(step._op, args)
