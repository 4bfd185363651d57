"""Shared fixtures; the helpers behind them are in ``_shared.py``.

* ``stat_kind``: a test that takes it runs once per kind in ``_shared.STAT_KINDS`` (torch's own
  BatchNorm and every registered kind that keeps running statistics). A test can narrow it with its
  own ``@pytest.mark.parametrize("stat_kind", [...])``.
* ``resnet_model``: a fresh :func:`_shared.resnet` with the default sizes, built after
  ``torch.manual_seed(0)``.
"""

from __future__ import annotations

import pytest
import torch

from _shared import STAT_KINDS, ResNet, resnet


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "stat_kind" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        names = marker.args[0]
        if "stat_kind" in (names.replace(" ", "").split(",") if isinstance(names, str) else names):
            return  # the test chose its own kinds
    metafunc.parametrize("stat_kind", STAT_KINDS)


@pytest.fixture
def resnet_model() -> ResNet:
    torch.manual_seed(0)
    return resnet()
