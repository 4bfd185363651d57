"""Whole models under ``torch.compile``: the models and kinds of ``cases_model.py``, each kind's model
compiled against the compiled model with torch's BatchNorm, in the same run.

Not part of the default run (``python benchmarks/run.py --only model_compiled``): compiling a
ResNet-18's training step takes about a minute per model on a 2-core CPU (C++ kernels built by
inductor; later runs reuse inductor's on-disk cache), twelve models in all. The compilation happens
in the harness's warm-up and is not timed. No targets: the issue's targets are for eager steps.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch._dynamo
from torch import nn

from cases_model import GHOST, KINDS, MLP_INPUT, RESNET_INPUT, _converted, _options, _train_step, mlp, resnet18

from harness import Case, Step

#: Not in the default run (see the module docstring).
DEFAULT = False

# Every model is a new set of code-object guards (the same nn.Sequential.forward for all twelve):
# above dynamo's default cache size of 8 the later ones would silently run eagerly.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)


def _compiled_step(model: nn.Module, shape: tuple[int, ...]) -> Step:
    return _train_step(torch.compile(model), shape)


@functools.cache
def _baseline(name: str) -> Step:
    # One compiled BatchNorm model per architecture, shared by that architecture's cases.
    build, shape = MODELS[name]
    torch.manual_seed(0)
    return _compiled_step(copy.deepcopy(build()), shape)


def _cases(name: str) -> list[Case]:
    build, shape = MODELS[name]
    cases = []
    for kind in KINDS:
        settings = ", ".join(f"{k}={v}" for k, v in _options(name, kind).items())
        cases.append(
            Case(
                f"model (compiled): {name}",
                f"{kind}{f' ({settings})' if settings else ''}",
                shape,
                lambda kind=kind: _compiled_step(_converted(name, build, kind, shape), shape),
                functools.partial(_baseline, name),
                baseline_label="BatchNorm (whole model, compiled)",
            )
        )
    return cases


MODELS = {"resnet18": (resnet18, RESNET_INPUT), "mlp4": (mlp, MLP_INPUT)}
assert set(MODELS) == set(GHOST)
CASES = [*_cases("resnet18"), *_cases("mlp4")]
