"""Benchmark harness: forward+backward time and peak memory of a layer against native BatchNorm.

A *case* builds two training steps on the same shape, the candidate and its torch baseline. The
harness runs them interleaved (so both see the same machine load), takes the median of repeated
timings, measures the peak memory allocated by one step with the torch profiler, and reports the
ratios candidate / baseline with the case's targets. Cases live in ``benchmarks/cases_*.py``, each
defining ``CASES: list[Case]``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile, record_function

Step = Callable[[], None]


@dataclass
class Case:
    """One comparison: ``candidate()`` and ``baseline()`` each return a zero-argument training step."""

    group: str  # what is compared, e.g. "BatchRenorm"
    label: str  # the candidate's settings, e.g. "brn"
    shape: tuple[int, ...]
    candidate: Callable[[], Step]
    baseline: Callable[[], Step]
    max_time_ratio: float | None = None
    max_memory_ratio: float | None = None
    baseline_label: str = "BatchNorm"


def norm_step(layer: nn.Module, shape: tuple[int, ...], seed: int = 0) -> Step:
    """A forward+backward step of ``layer`` on a fixed random input of ``shape`` (train mode)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    grad = torch.randn(shape, generator=g)
    layer.train()

    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return step


def native_bn(shape: tuple[int, ...]) -> nn.Module:
    """torch's BatchNorm for an input of ``shape``."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    return cls(shape[1])


def peak_memory(step: Step) -> int:
    """Peak bytes allocated on the CPU during one ``step`` (above what was live before it)."""
    # Two steps under the profiler, the second measured: whatever the measured step frees (the
    # previous step's gradients) was then allocated while profiling, so its release is recorded too.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function("measured_step"):
            step()
    events = list(prof.profiler.kineto_results.events())
    mark = min(e.start_ns() for e in events if e.name() == "measured_step")
    memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = before = sum(n for t, n in memory if t < mark)
    peak = live
    for t, nbytes in memory:
        if t >= mark:
            live += nbytes
            peak = max(peak, live)
    return peak - before


def time_pair(a: Step, b: Step, repeats: int, min_time: float = 0.05) -> tuple[float, float]:
    """Median seconds per call of ``a`` and ``b``, measured interleaved."""
    # Warm-up (allocator, lazily built kernels, CPU frequency): at least 3 calls each and 0.5 s.
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < 0.5:
        a()
        b()
        calls += 1
    t0 = time.perf_counter()
    a()
    once = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, int(min_time / once))
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) / inner)
    return statistics.median(ta), statistics.median(tb)


@dataclass
class Result:
    case: Case
    time: float
    base_time: float
    memory: int
    base_memory: int

    @property
    def time_ratio(self) -> float:
        return self.time / self.base_time

    @property
    def memory_ratio(self) -> float:
        return self.memory / max(self.base_memory, 1)

    @property
    def ok(self) -> bool:
        c = self.case
        return (c.max_time_ratio is None or self.time_ratio <= c.max_time_ratio) and (
            c.max_memory_ratio is None or self.memory_ratio <= c.max_memory_ratio
        )


def run_case(case: Case, repeats: int) -> Result:
    """Time and measure one case."""
    cand, base = case.candidate(), case.baseline()
    t_c, t_b = time_pair(cand, base, repeats)
    return Result(case, t_c, t_b, peak_memory(cand), peak_memory(base))


def _target(v: float | None) -> str:
    return "-" if v is None else f"<= {v:g}x"


def markdown(results: list[Result]) -> str:
    """The results as a Markdown table."""
    rows = [
        "| layer | settings | shape | ms (layer) | ms (baseline) | time ratio | target | peak MiB (layer) "
        "| peak MiB (baseline) | memory ratio | target | met |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for r in results:
        c = r.case
        rows.append(
            f"| {c.group} | {c.label} vs {c.baseline_label} | {'x'.join(map(str, c.shape))} | {r.time * 1e3:.3f} "
            f"| {r.base_time * 1e3:.3f} | {r.time_ratio:.2f} | {_target(c.max_time_ratio)} "
            f"| {r.memory / 2**20:.2f} | {r.base_memory / 2**20:.2f} | {r.memory_ratio:.2f} "
            f"| {_target(c.max_memory_ratio)} | {'yes' if r.ok else 'NO'} |"
        )
    return "\n".join(rows)


def as_tensor_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


__all__ = ["Case", "Result", "Step", "norm_step", "native_bn", "peak_memory", "run_case", "markdown", "Tensor"]
