"""Synchronized statistics (normlab.sync) against the unsynchronized layer on the whole batch.

The distributed checks run in 2 and 3 spawned gloo processes (a ``file://`` rendezvous in a
temporary folder, so no ports), started once per world size: every check runs inside them, each
rank writes its results, and one test per (world size, check) reports them. Each check splits one
global float64 batch unevenly (one process holds a single sample or none) and compares, with the
layer applied to the whole batch in one process: outputs, input gradients, parameter gradients
summed over the processes, running statistics after two steps, and eval outputs.
"""

from __future__ import annotations

import copy
import importlib
import json
import pickle
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import normlab
from normlab.comm import global_sum
from normlab.distributed import GroupRef, init_from_env, is_synced, rank, shard, unsync, world_size
from normlab.kernels import channel_moments

WORLDS = (2, 3)
# Per world size, the split of the global batch for each of the two training steps.
SPLITS = {2: ([7, 1], [2, 6]), 3: ([5, 0, 3], [1, 4, 3])}
C = 4
TIMEOUT_S = 180  # per world size; a crashed check costs the other processes one collective timeout (45 s)


def _optional(module: str, name: str) -> type | None:
    """A variant written in another file, if that file exists in this tree."""
    try:
        return getattr(importlib.import_module(f"normlab.{module}"), name)
    except (ImportError, AttributeError):
        return None


DecorrelatedBatchNorm = _optional("decorrelated", "DecorrelatedBatchNorm")
CrossIterationBatchNorm = _optional("cross_iteration", "CrossIterationBatchNorm")
MeanOnlyBatchNorm = _optional("mean_only", "MeanOnlyBatchNorm")


def _brn() -> nn.Module:
    layer = normlab.BatchRenorm(C, momentum=0.1, r_max=1.5, d_max=0.5, dtype=torch.float64)
    # Running statistics away from the batch ones, so that r and d are neither 1/0 nor all clipped.
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        layer.running_var.copy_(torch.tensor([0.8, 1.3, 1.1, 2.0]))
    return layer


# name -> (reference layer, layer that normlab.sync converts); both float64, same state.
VARIANTS: dict[str, Callable[[], tuple[nn.Module, nn.Module]]] = {
    "bn": lambda: _same(normlab.BatchNorm(C, dtype=torch.float64)),
    "bn-cma-nonaffine": lambda: _same(normlab.BatchNorm(C, momentum=None, affine=False, dtype=torch.float64)),
    "bn-no-running-stats": lambda: _same(normlab.BatchNorm(C, track_running_stats=False, dtype=torch.float64)),
    "torch-bn2d": lambda: _same(nn.BatchNorm2d(C, momentum=0.3, dtype=torch.float64)),
    "torch-syncbn": lambda: _torch_syncbn(),
    "brn": lambda: _same(_brn()),
}
if MeanOnlyBatchNorm is not None:
    VARIANTS["mean-only"] = lambda: _same(MeanOnlyBatchNorm(C, dtype=torch.float64))
CORE_VARIANTS = list(VARIANTS)
if CrossIterationBatchNorm is not None:
    # Unpaired, so that the window pools the stored (global) statistics of the earlier step as they are.
    VARIANTS["cbn"] = lambda: _same(CrossIterationBatchNorm(C, window=3, dtype=torch.float64))
if DecorrelatedBatchNorm is not None:
    VARIANTS["dbn-zca"] = lambda: _same(DecorrelatedBatchNorm(C, group_size=3, dtype=torch.float64))
    VARIANTS["dbn-newton"] = lambda: _same(
        DecorrelatedBatchNorm(C, group_size=4, method="newton", momentum=None, dtype=torch.float64)
    )
FOUR_D_ONLY = {"torch-bn2d", "torch-syncbn"}  # torch's 2-D layers check the input rank


def _same(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.linspace(0.5, 1.5, p.numel(), dtype=p.dtype))
    return layer, copy.deepcopy(layer)


def _torch_syncbn() -> tuple[nn.Module, nn.Module]:
    ref = nn.BatchNorm2d(C, momentum=0.2, dtype=torch.float64)
    src = nn.SyncBatchNorm(C, momentum=0.2, dtype=torch.float64)
    src.load_state_dict(ref.state_dict())
    return ref, src


def _inputs(step: int, four_d: bool) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(10 * step + four_d)
    shape = (8, C, 2, 3) if four_d else (8, C)
    x = (
        torch.randn(shape, generator=g, dtype=torch.float64)
        * torch.tensor([1.0, 2.0, 0.5, 3.0]).reshape((1, C) + (1,) * (len(shape) - 2))
        + 0.7
    )
    return x, torch.randn(shape, generator=g, dtype=torch.float64)


class Mismatch(AssertionError):
    """Values differ, found after every collective of the check ran: the next checks can still run."""


class Comparisons:
    """Collects mismatches (rather than raising at once, which would leave the other processes
    waiting in a collective) and raises them together at the end of a check."""

    def __init__(self, rtol: float = 1e-10, atol: float = 1e-12) -> None:
        self.errors: list[str] = []
        self.rtol, self.atol = rtol, atol

    def close(self, actual: Tensor, expected: Tensor, what: str) -> None:
        try:
            torch.testing.assert_close(actual, expected, rtol=self.rtol, atol=self.atol)
        except AssertionError as err:
            self.errors.append(f"{what}: {err}")

    def check(self) -> None:
        if self.errors:
            raise Mismatch("\n".join(self.errors))


def _summed_grads(module: nn.Module) -> dict[str, Tensor]:
    out = {}
    for name, p in module.named_parameters():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad)
        out[name] = grad
    return out


def _state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------ checks (in workers)
def _check_variant(name: str, r: int, world: int) -> None:
    cmp = Comparisons()
    for four_d in (True,) if name in FOUR_D_ONLY else (False, True):
        ref, src = VARIANTS[name]()
        layer = normlab.sync(src)
        assert layer.sync_group() is not None
        for step, sizes in enumerate(SPLITS[world]):
            x, g = _inputs(step, four_d)
            lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
            ref.zero_grad()
            xr = x.clone().requires_grad_(True)
            y_ref = ref(xr)
            y_ref.backward(g)
            layer.zero_grad()
            xl = x[lo:hi].clone().requires_grad_(True)
            y = layer(xl)
            y.backward(g[lo:hi])
            grads = _summed_grads(layer)
            for what, a, b in [("output", y.detach(), y_ref.detach()[lo:hi]), ("input grad", xl.grad, xr.grad[lo:hi])]:
                cmp.close(a, b, f"{name} 4d={four_d} step {step} {what}")
            ref_grads = dict(ref.named_parameters())
            for pname, grad in grads.items():
                cmp.close(grad, ref_grads[pname].grad, f"{name} 4d={four_d} step {step} grad of {pname}")
            ref_state = ref.state_dict()
            for key, value in layer.state_dict().items():
                cmp.close(value, ref_state[key], f"{name} 4d={four_d} step {step} {key}")
        ref.eval()
        layer.eval()
        x, _ = _inputs(5, four_d)
        lo, hi = sum(SPLITS[world][0][:r]), sum(SPLITS[world][0][: r + 1])
        with torch.no_grad():
            cmp.close(layer(x[lo:hi]), ref(x)[lo:hi], f"{name} 4d={four_d} eval output")
    cmp.check()


def _check_single_process_groups(r: int, world: int) -> None:
    # A group of one process: exactly the unsynchronized layer (same code path, bitwise equal).
    groups = [dist.new_group([i]) for i in range(world)]
    for make in (VARIANTS["torch-bn2d"], VARIANTS["brn"]):
        ref, src = make()
        layer = normlab.sync(src, groups[r])
        assert layer.sync_group() is None
        x, g = _inputs(r, True)
        y_ref, y = ref(x), layer(x)
        assert torch.equal(y, y_ref)
        assert all(torch.equal(a, b) for a, b in zip(_state(layer).values(), _state(ref).values()))


def _check_global_count(r: int, world: int) -> None:
    # One value per channel over the whole group: every process raises, no state moves.
    layer = normlab.sync(normlab.BatchNorm(C, dtype=torch.float64))
    before = _state(layer)
    x = torch.randn(1 if r == 0 else 0, C, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"BatchNorm: expected more than 1 value per channel over the process group"):
        layer(x)
    assert all(torch.equal(a, b) for a, b in zip(_state(layer).values(), before.values()))


def _check_gradcheck(r: int, world: int) -> None:
    # Every process runs gradcheck in lockstep on same-shaped inputs, perturbing the same element
    # everywhere at once. A sum over processes is linear, so any inputs do; for the (nonlinear)
    # moments the inputs are the same on every process, so that the numerical derivative (the sum
    # of the per-process effects) equals the backward, the all_reduce of the gradients.
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(r)
    a = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tuple(global_sum([a, b], group)), (a, b))
    assert torch.autograd.gradgradcheck(lambda a, b: tuple(global_sum([a, b], group)), (a, b))
    x = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: channel_moments(x, group)[:2], (x,))


def _check_float32_offset(r: int, world: int) -> None:
    # float32 inputs far from zero: the global variance must not be lost to cancellation between
    # the summed squares and the squared mean (float32 sums alone are off by ~25% here).
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2 + 8 * (world - 1), 3, 8, 8, generator=g, dtype=torch.float64) + 1000).float().double()
    sizes = [2] + [8] * (world - 1)
    lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
    mean, var, count = channel_moments(x[lo:hi].float(), dist.group.WORLD)
    assert mean.dtype == var.dtype == torch.float32 and int(count) == x.numel() // 3
    torch.testing.assert_close(var.double(), x.var([0, 2, 3], correction=0), rtol=1e-5, atol=0)
    torch.testing.assert_close(mean.double(), x.mean([0, 2, 3]), rtol=1e-6, atol=0)


def _check_copy_and_pickle(r: int, world: int) -> None:
    model = nn.Sequential(nn.Linear(3, C), nn.BatchNorm1d(C), normlab.BatchRenorm(C))
    synced = normlab.sync(model, dist.group.WORLD)
    assert synced[1].process_group == GroupRef() and synced[2].process_group == GroupRef()
    clone = copy.deepcopy(synced)
    assert clone[1].process_group is synced[1].process_group
    loaded = pickle.loads(pickle.dumps(synced))
    assert loaded[1].sync_group() is dist.group.WORLD and loaded[2].sync_group() is dist.group.WORLD
    sub = dist.new_group(list(range(world)))
    synced_sub = normlab.sync(model, sub)
    assert copy.deepcopy(synced_sub)[2].sync_group() is sub
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(synced_sub)
    assert set(synced_sub.state_dict()) == set(model.state_dict())
    # A raw torch ProcessGroup (as nn.SyncBatchNorm holds) does not deep-copy; sync() copes.
    raw = nn.Sequential(nn.SyncBatchNorm(C, process_group=sub))
    assert type(normlab.sync(raw)[0]) is normlab.BatchNorm


def _check_ddp(r: int, world: int, other: type | None = None) -> None:
    # A few DDP steps with synchronized normalization equal full-batch training in one process.
    # DDP averages the gradients over the processes, so each process's loss is scaled by world / N.
    torch.manual_seed(0)
    norms: list[nn.Module] = [nn.BatchNorm1d(6), normlab.BatchRenorm(6, momentum=0.2, r_max=2.0, d_max=1.0)]
    if other is not None:
        norms = [other(6), other(6)]
    layers: list[nn.Module] = [nn.Linear(5, 6)]
    for norm in norms:
        if CrossIterationBatchNorm is not None and isinstance(norm, CrossIterationBatchNorm):
            norm.attach(layers[-1])  # compensated window over the linear layer in front
        layers += [norm, nn.Tanh(), nn.Linear(6, 6)]
    ref = nn.Sequential(*layers, nn.Linear(6, 3)).double()
    model = nn.parallel.DistributedDataParallel(normlab.sync(ref))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    splits = {2: [[8, 4], [3, 9], [12, 0]], 3: [[6, 0, 6], [2, 5, 5], [4, 4, 4]]}[world]
    g = torch.Generator().manual_seed(1)
    # Whitening 6 channels from 12 samples: the synchronized path's covariance (sums of x x^T) and
    # the reference's (centred products) differ by rounding, which the inverse square root amplifies
    # by the covariance's condition number; after three SGD steps the whitening matrices differ by up
    # to ~3e-10 relative on some CPUs (a wrong reduction would differ by orders of magnitude more).
    cmp = Comparisons(rtol=1e-8, atol=1e-10) if other is DecorrelatedBatchNorm else Comparisons()
    for step, sizes in enumerate(splits):
        x = torch.randn(12, 5, generator=g, dtype=torch.float64)
        t = torch.randn(12, 3, generator=g, dtype=torch.float64)
        lo, hi = sum(sizes[:r]), sum(sizes[: r + 1])
        opt_ref.zero_grad()
        ((ref(x) - t) ** 2).sum().div(12).backward()
        opt_ref.step()
        opt.zero_grad()
        ((model(x[lo:hi]) - t[lo:hi]) ** 2).sum().mul(world / 12).backward()
        opt.step()
        ref_state = ref.state_dict()
        for key, value in model.module.state_dict().items():
            cmp.close(value, ref_state[key], f"DDP step {step} {key}")
    cmp.check()


# Variants from the other layer files come last: a crash stops the remaining checks of a run.
CHECKS: dict[str, Callable[[int, int], None]] = {
    "single-process-groups": _check_single_process_groups,
    "global-count": _check_global_count,
    "gradcheck": _check_gradcheck,
    "float32-offset": _check_float32_offset,
    "copy-and-pickle": _check_copy_and_pickle,
    **{f"variant-{name}": (lambda r, w, name=name: _check_variant(name, r, w)) for name in CORE_VARIANTS},
    "ddp": _check_ddp,
}
for _name, _cls in (("cbn", CrossIterationBatchNorm), ("dbn", DecorrelatedBatchNorm)):
    if _cls is not None:
        for _variant in VARIANTS:
            if _variant.startswith(_name):
                CHECKS[f"variant-{_variant}"] = lambda r, w, name=_variant: _check_variant(name, r, w)
        CHECKS[f"ddp-{_name}"] = lambda r, w, cls=_cls: _check_ddp(r, w, cls)


def _worker(r: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=r, world_size=world, timeout=timedelta(seconds=45)
    )
    results: dict[str, str] = {}
    failed = None
    for name, check in CHECKS.items():
        if failed is not None:
            # The processes may no longer agree on the order of collectives: stop here.
            results[name] = f"not run: check {failed!r} failed before it"
            continue
        try:
            check(r, world)
            results[name] = "ok"
        except Mismatch:
            results[name] = traceback.format_exc()
        except Exception:
            results[name] = traceback.format_exc()
            failed = name
    Path(folder, f"rank{r}.json").write_text(json.dumps(results))
    if failed is None:
        dist.destroy_process_group()


def _launch(world: int, folder: Path) -> dict[int, dict[str, str]]:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(folder)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = {}
    for r in range(world):
        path = folder / f"rank{r}.json"
        results[r] = json.loads(path.read_text()) if path.exists() else {}
    return results


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], dict[int, dict[str, str]]]:
    cache: dict[int, dict[int, dict[str, str]]] = {}

    def get(world: int) -> dict[int, dict[str, str]]:
        if world not in cache:
            cache[world] = _launch(world, tmp_path_factory.mktemp(f"world{world}"))
        return cache[world]

    return get


# The processes run every check at once, in the first test of each world size; the others read the results.
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("world", WORLDS)
def test_distributed(distributed_results: Callable[[int], dict[int, dict[str, str]]], world: int, check: str) -> None:
    results = distributed_results(world)
    outcomes = {r: results[r].get(check, "no result (the process crashed or timed out)") for r in range(world)}
    failures = [f"rank {r} of {world}:\n{outcome}" for r, outcome in outcomes.items() if outcome != "ok"]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------ single process
def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, C, 1), nn.BatchNorm2d(C, momentum=0.3, eps=1e-3), normlab.BatchRenorm(C))
    model[1].running_mean.fill_(0.2)
    model[1].num_batches_tracked.fill_(4)
    return model


def test_sync_copies_and_carries_state() -> None:
    model = _model()
    synced = normlab.sync(model)
    assert type(model[1]) is nn.BatchNorm2d and model[2].process_group is None  # untouched
    bn = synced[1]
    assert type(bn) is normlab.BatchNorm and bn.process_group == GroupRef() == synced[2].process_group
    assert (bn.momentum, bn.eps, bn.affine, bn.track_running_stats) == (0.3, 1e-3, True, True)
    assert bn.weight is not model[1].weight
    for key, value in model.state_dict().items():
        assert torch.equal(synced.state_dict()[key], value), key
    assert is_synced(synced) and not is_synced(model)


def test_sync_inplace_keeps_the_tensors() -> None:
    model = _model()
    weight, running_mean = model[1].weight, model[1].running_mean
    model.eval()
    out = normlab.sync(model, inplace=True)
    assert out is model and type(model[1]) is normlab.BatchNorm and not model[1].training
    assert model[1].weight is weight and model[1].running_mean is running_mean
    assert model[1].weight in set(model.parameters())


def test_sync_replaces_a_shared_layer_once() -> None:
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(bn, nn.Linear(3, 3), bn)
    synced = normlab.sync(model)
    assert type(synced[0]) is normlab.BatchNorm and synced[0] is synced[2]
    back = unsync(synced)
    assert type(back[0]) is nn.BatchNorm1d and back[0] is back[2]


def test_sync_of_a_bare_layer_returns_the_new_layer() -> None:
    layer = normlab.sync(nn.BatchNorm1d(3), inplace=True)
    assert type(layer) is normlab.BatchNorm and layer.process_group == GroupRef()


def test_outside_a_process_group_synced_layers_are_unsynchronized() -> None:
    assert not dist.is_initialized()
    model = _model()
    synced = normlab.sync(model)
    x = torch.randn(5, 2, 3, 3)
    torch.testing.assert_close(synced(x), model(x), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(synced.state_dict()[key], value), key
    assert synced[1].sync_group() is None and synced[2].sync_group() is None


def test_unsync_restores_torch_classes() -> None:
    model = _model()
    back = unsync(normlab.sync(model))
    assert type(back[1]) is nn.BatchNorm2d and back[2].process_group is None and not is_synced(back)
    assert back[1].momentum == 0.3
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    sbn = unsync(normlab.sync(nn.SyncBatchNorm(3)))
    assert type(sbn) is nn.SyncBatchNorm and sbn.process_group is None


def test_convert_keeps_the_synchronization() -> None:
    converted = normlab.convert(normlab.sync(_model()), "brn")
    assert all(type(m) is normlab.BatchRenorm and m.process_group == GroupRef() for m in converted[1:])
    # Back to "bn": the torch class that sync() replaced (which has no process_group), and a
    # synchronized normlab.BatchNorm for the layer that was a BatchRenorm.
    back = normlab.convert(converted, "bn")
    assert type(back[1]) is nn.BatchNorm2d and not hasattr(back[1], "process_group")
    assert type(back[2]) is normlab.BatchNorm and back[2].process_group == GroupRef()


def test_synced_model_deep_copies_and_pickles() -> None:
    synced = normlab.sync(_model())
    clone = copy.deepcopy(synced)
    assert clone[2].process_group is synced[2].process_group
    loaded = pickle.loads(pickle.dumps(synced))
    assert loaded[1].process_group == GroupRef() and is_synced(loaded)
    # The state dict is torch's: it loads into the unsynchronized model.
    _model().load_state_dict(synced.state_dict())


def test_sync_rejects_subclasses_and_lazy_layers_without_changing_the_model() -> None:
    class Custom(nn.BatchNorm2d):
        pass

    model = nn.Sequential(nn.BatchNorm2d(3), Custom(3))
    with pytest.raises(ValueError, match=r"normlab.sync: cannot synchronize 1 \(Custom\)"):
        normlab.sync(model, inplace=True)
    assert type(model[0]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match=r"LazyBatchNorm1d\) is uninitialized"):
        normlab.sync(nn.Sequential(nn.LazyBatchNorm1d()))
    with pytest.raises(ValueError, match="expected process_group to be None"):
        normlab.sync(model, process_group="world")


def test_batchnorm_takes_an_empty_training_batch_as_torch_does() -> None:
    # Drop-in for torch's layer: an empty output, and the state torch's layer is left with.
    layer, ref = normlab.BatchNorm(3), nn.BatchNorm1d(3)
    assert layer(torch.empty(0, 3)).shape == ref(torch.empty(0, 3)).shape == (0, 3)
    for key, value in ref.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    assert layer.eval()(torch.empty(0, 3)).shape == (0, 3)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 5), (3, 2, 3, 2), (2, 2, 2, 2, 3)])
def test_channel_moments_gradients(shape: tuple[int, ...]) -> None:
    # The local statistics (torch's batch-norm statistics kernel with its own backward) against
    # the definition, and their first and second derivatives.
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mean, var, count = channel_moments(x)
    dims = [0, *range(2, len(shape))]
    m = x.numel() // shape[1]
    ref_mean = x.detach().sum(dims) / m
    ref_var = ((x.detach() - ref_mean.reshape((1, -1) + (1,) * (len(shape) - 2))) ** 2).sum(dims) / m
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-14)
    assert int(count) == m
    assert torch.autograd.gradcheck(lambda x: channel_moments(x)[:2], (x,))
    assert torch.autograd.gradgradcheck(lambda x: channel_moments(x)[:2], (x,))
    if len(shape) == 4:
        xc = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: channel_moments(x)[:2], (xc,))


def test_helpers_outside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_env() is False and not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() is False and not dist.is_initialized()
    assert rank() == 0 and world_size() == 1
    x = torch.arange(5)
    assert torch.equal(shard(x), x)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), world=st.integers(1, 9))
def test_shard_partitions_the_batch(n: int, world: int) -> None:
    x = torch.arange(n)
    y = torch.arange(n) * 10
    parts = [shard((x, y), r, world) for r in range(world)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert all(torch.equal(p[1], p[0] * 10) for p in parts)
    sizes = [len(p[0]) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="expected 0 <= rank < world"):
        shard(torch.zeros(4), 2, 2)
    with pytest.raises(ValueError, match="one batch size"):
        shard((torch.zeros(4), torch.zeros(3)), 0, 2)
    with pytest.raises(ValueError, match="expected a tensor"):
        shard({"x": torch.zeros(4)}, 0, 2)
