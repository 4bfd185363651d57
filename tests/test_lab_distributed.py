"""The lab's training loop under two gloo processes matches one process on the same global batches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from normlab.lab.data import digits, standardize, subset  # noqa: E402
from normlab.lab.experiments import EXPERIMENTS, for_processes, run_experiments  # noqa: E402
from normlab.lab.models import cnn  # noqa: E402
from normlab.lab.train import Context, Dist, TrainConfig, fit  # noqa: E402

CFG = TrainConfig(epochs=1, batch_size=8, lr=0.1)


def _train(ctx: Context) -> list[float]:
    torch.manual_seed(0)
    model = cnn(1, 4, 10)
    split = subset(standardize(digits()), 96, 16)
    return fit(model, split, CFG, ctx, seed=5).losses + [float(p.detach().abs().sum()) for p in model.parameters()]


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = Dist(rank, world)
    try:
        values = _train(Context("tiny", 0, progress=False, dist=group))
        if rank == 0:
            Path(out).write_text(json.dumps(values))
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other process may never reach it
        raise
    # The lab's own exit, a barrier and then leaving the group: a process that tears gloo down while
    # the other is still in a collective can abort it ("terminate called without an active exception").
    group.close()
    # Then out without the interpreter's teardown: even after the group was left on both sides, a worker
    # has aborted in it with the same message (in about one full test run in five here, never alone).
    # What this test checks, the numbers, is written by then.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_match_one(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    single = _train(Context("tiny", 0, progress=False))
    out = tmp_path / "rank0.json"
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'init'}", str(out)), nprocs=2, join=True)
    both = json.loads(out.read_text())
    # Same losses step by step (synchronized BN over the global batch, DDP-averaged gradients of the
    # global mean loss) and the same final weights, up to float32 rounding of the reductions.
    assert both == pytest.approx(single, rel=1e-4, abs=1e-5)


def _experiments_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    group = Dist(rank, world)
    try:
        names, _ = for_processes(EXPERIMENTS, group.active)
        rows = run_experiments(Context("tiny", 0, out=Path(out), progress=False, dist=group), names, jobs=1)
        if rank == 0:
            (Path(out) / "claims.json").write_text(json.dumps(sorted({r["experiment"] for r in rows})))
    except BaseException:
        dist.destroy_process_group()
        raise
    group.close()
    os._exit(0)  # as _worker


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_every_experiment_that_runs_under_torchrun_runs_in_two_processes(tmp_path: Path) -> None:
    """What `torchrun ... -m normlab.lab.cli run all` runs (the tiny preset): every experiment without a
    single-process reason trains, checks its claims and writes its outputs in two gloo processes."""
    names, left_out = for_processes(EXPERIMENTS, True)
    assert left_out == ["small-batch"]  # it emulates its devices in one process
    out = tmp_path / "out"
    mp.spawn(_experiments_worker, args=(2, f"file://{tmp_path / 'init'}", str(out)), nprocs=2, join=True)
    assert json.loads((out / "claims.json").read_text()) == sorted(names)
    assert all((out / name / "results.json").exists() for name in names)
