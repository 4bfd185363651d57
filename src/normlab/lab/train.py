"""Training and evaluation loops shared by the experiments, the run context and the distributed setup.

Determinism: :func:`seed_everything` seeds python, numpy and torch, and every minibatch order comes
from a ``torch.Generator`` seeded from the run's seed, so a run on CPU repeats exactly.

Distributed: under ``torchrun`` (``WORLD_SIZE > 1``) :class:`Dist` initializes a gloo process group,
every model is synchronized with :func:`normlab.sync` and wrapped in DDP, and each process trains on
its contiguous share of every global minibatch (same global order on every process). Only rank 0
writes outputs and shows progress bars.
"""

from __future__ import annotations

import copy
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import normlab
from normlab import distributed

from . import require
from .data import Split, class_batches, iid_batches

__all__ = [
    "PRESETS",
    "SEED_STRIDE",
    "SEED_RULE",
    "Context",
    "Dist",
    "TrainConfig",
    "History",
    "seed_everything",
    "replicate",
    "generator",
    "count_steps",
    "fit",
    "evaluate",
]

PRESETS = ("tiny", "quick", "full")
SEED_STRIDE = 1000  # run seeds per base seed: two base seeds share no run seed below this many repetitions
SEED_RULE = f"repetition s (0, 1, ...) trains with seed * {SEED_STRIDE} + s: initial weights and minibatch order"


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    require("numpy").random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (for minibatch orders)."""
    return torch.Generator().manual_seed(int(seed))


class Dist:
    """The process group of a ``torchrun`` launch, or a single process.

    ``Dist.setup()`` initializes gloo when launched with ``WORLD_SIZE > 1`` (and nothing otherwise).
    """

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank = rank
        self.world = world

    @property
    def active(self) -> bool:
        """Whether more than one process trains."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this process writes outputs (rank 0)."""
        return self.rank == 0

    @classmethod
    def setup(cls) -> Dist:
        """Join the ``torchrun`` process group (gloo) if there is one."""
        if not distributed.init_from_env("gloo"):
            return cls()
        return cls(distributed.rank(), distributed.world_size())

    def wrap(self, model: nn.Module) -> nn.Module:
        """Synchronize the model's normalization over the processes (in place) and wrap it in DDP.

        The identity for a single process.
        """
        if not self.active:
            return model
        normlab.sync(model, inplace=True)
        return nn.parallel.DistributedDataParallel(model)

    def shard(self, idx: Tensor) -> Tensor:
        """This process's contiguous share of a global minibatch of indices."""
        if not self.active:
            return idx
        return distributed.shard(idx, self.rank, self.world)

    def close(self) -> None:
        """Leave the process group."""
        if self.active:
            dist.barrier()
            dist.destroy_process_group()


@dataclass
class Context:
    """What every experiment runs with: size preset, seed, device, output folder and processes."""

    preset: str = "quick"
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    out: Path = Path("normlab-out")
    dist: Dist = field(default_factory=Dist)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"normlab lab: expected a preset in {PRESETS}, got {self.preset!r}")

    def pick(self, tiny: Any, quick: Any, full: Any) -> Any:
        """The value for this run's preset."""
        return {"tiny": tiny, "quick": quick, "full": full}[self.preset]

    def run_seed(self, s: int) -> int:
        """The seed of repetition ``s`` (0, 1, ...) of an experiment: ``seed * SEED_STRIDE + s``.

        Every experiment seeds its initial weights and its minibatch order with it (:data:`SEED_RULE`,
        recorded in each ``results.json``).
        """
        return self.seed * SEED_STRIDE + s

    def bar(self, iterable: Iterable[Any] | None = None, total: int | None = None, desc: str = "") -> Any:
        """A tqdm progress bar on stderr (silent when disabled or off rank 0)."""
        tqdm = require("tqdm").tqdm
        disable = not (self.progress and self.dist.main)
        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, disable=disable, dynamic_ncols=True)


@dataclass
class TrainConfig:
    """How to train: epochs, global batch size, optimizer settings and minibatch order."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    classes_per_batch: int | None = None  # None: i.i.d. shuffled minibatches
    max_steps: int | None = None
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam" (betas (momentum, 0.999))
    decay_from: float | None = None  # fraction of the steps after which lr decays linearly to 0 (None: constant)
    devices: int = 1  # data-parallel devices emulated in one process (see replicate); 1: one model, one batch


@dataclass
class History:
    """What a training run recorded: per-step loss, wall time per step and steps taken."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """The number of optimizer steps taken."""
        return len(self.losses)

    def time_per_step(self) -> float:
        """Median seconds per training step (forward, backward and update)."""
        times = sorted(self.step_seconds)
        return times[len(times) // 2] if times else float("nan")

    def final_loss(self, fraction: float = 0.1) -> float:
        """The mean training loss over the last ``fraction`` of the steps (at least one): where training ended."""
        if not self.losses:
            return float("nan")
        tail = self.losses[-max(1, int(len(self.losses) * fraction)) :]
        return sum(tail) / len(tail)

    def smoothed(self, window: int) -> list[float]:
        """Mean loss over consecutive windows of ``window`` steps."""
        w = max(1, window)
        return [sum(self.losses[i : i + w]) / len(self.losses[i : i + w]) for i in range(0, len(self.losses), w)]


def replicate(model: nn.Module, devices: int) -> list[nn.Module]:
    """``model`` and ``devices - 1`` replicas that share its parameters but keep their own buffers and state.

    Unsynchronized data parallelism in one process: each replica normalizes its own share of the
    global minibatch with its own statistics and running estimates (BatchNorm's running averages,
    Cross-Iteration BN's window, paired with the replica's own producer), as a layer on its own device
    does under DDP without synchronization; the gradients of the shared parameters add up as DDP's
    all-reduce of the mean loss does. Evaluation uses ``model`` itself, whose buffers are those of
    the first device (DDP's ``broadcast_buffers`` hands rank 0's to every process).
    """
    if devices < 1:
        raise ValueError(f"replicate: expected devices >= 1, got {devices}")
    out = [model]
    for _ in range(devices - 1):
        replica = copy.deepcopy(model)
        for src, dst in zip(model.modules(), replica.modules()):
            for name, param in src._parameters.items():
                if param is not None:
                    dst._parameters[name] = param  # shared: one gradient, one optimizer state
        out.append(replica)
    return out


def _batches(split: Split, cfg: TrainConfig, gen: torch.Generator) -> Iterator[Tensor]:
    for _ in range(cfg.epochs):
        if cfg.classes_per_batch is None:
            yield from iid_batches(len(split.y_train), cfg.batch_size, gen)
        else:
            yield from class_batches(split.y_train, cfg.batch_size, cfg.classes_per_batch, gen)


def count_steps(split: Split, cfg: TrainConfig) -> int:
    """How many optimizer steps :func:`fit` takes with ``cfg`` (i.i.d. order only; else an upper bound)."""
    steps = cfg.epochs * (len(split.y_train) // cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def fit(
    model: nn.Module,
    split: Split,
    cfg: TrainConfig,
    ctx: Context,
    seed: int,
    desc: str = "train",
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> History:
    """Train ``model`` in place with SGD on ``split``'s training set; return the :class:`History`.

    The minibatch order is a function of ``seed``; under ``torchrun`` each process takes its share
    of every global minibatch. With ``cfg.devices > 1`` every step splits the global minibatch into
    that many contiguous equal shares, each through its own replica (:func:`replicate`): data
    parallelism without synchronized normalization. ``on_step(step, model)`` runs after each update
    (``model`` unwrapped).
    """
    device = ctx.device
    model.to(device).train()
    if cfg.devices > 1:
        if ctx.dist.active:
            raise ValueError("fit: emulated devices (TrainConfig.devices > 1) cannot be combined with torchrun")
        if cfg.batch_size % cfg.devices:
            raise ValueError(f"fit: expected devices={cfg.devices} to divide batch_size={cfg.batch_size}")
    nets = replicate(model, cfg.devices) if cfg.devices > 1 else [ctx.dist.wrap(model)]
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay
        )
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"fit: expected optimizer 'sgd' or 'adam', got {cfg.optimizer!r}")
    x_all, y_all = split.x_train.to(device), split.y_train.to(device)
    hist = History()
    total = count_steps(split, cfg)
    sched = None
    if cfg.decay_from is not None:
        start_decay = cfg.decay_from * total
        span = max(total - start_decay, 1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, max(0.0, (total - t) / span)))
    with ctx.bar(total=total, desc=desc) as bar:
        for idx in _batches(split, cfg, generator(seed)):
            if cfg.max_steps is not None and hist.steps >= cfg.max_steps:
                break
            global_size = len(idx)
            idx = ctx.dist.shard(idx).to(device)
            start = time.perf_counter()
            # The mean over the global batch: DDP averages the processes' gradients, so each process
            # contributes its loss sum scaled by world / global batch size.
            parts = idx.chunk(len(nets))
            logits = torch.cat([net(x_all[part]) for net, part in zip(nets, parts)])
            loss = F.cross_entropy(logits, y_all[torch.cat(parts)], reduction="sum") * (ctx.dist.world / global_size)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            hist.step_seconds.append(time.perf_counter() - start)
            value = float(loss.detach())
            if ctx.dist.active:
                value = _mean_over_processes(value)  # each process's term is world * its share
            hist.losses.append(value)
            if on_step is not None:
                on_step(hist.steps, model)
            bar.update(1)
    return hist


def _mean_over_processes(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` in eval mode on ``(x, y)``; restores the mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return correct / len(y), loss_sum / len(y)
