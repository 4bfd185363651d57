"""The lab's data: embedded and synthesized sets only, never a download.

* :func:`digits` -- scikit-learn's ``load_digits`` (1797 8x8 handwritten digits, 10 classes),
  images scaled to [0, 1], a fixed stratified train/test split.
* :func:`mnist1d` -- MNIST-1D from the ``mnist1d`` package's offline generator (``make_dataset``;
  its ``get_dataset`` would try to download a pickle, so it is not used).
* :func:`standardize` -- one global mean/std from the training images, applied to every split.

Minibatch order comes from :func:`iid_batches` (shuffled, fixed size) or :func:`class_batches` (each
minibatch drawn from a few classes only, the Batch Renorm paper's non-i.i.d. setting); both take a
``torch.Generator`` so the order is a function of the seed.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from . import require

__all__ = ["Split", "digits", "mnist1d", "standardize", "iid_batches", "class_batches", "subset"]


@dataclass(frozen=True)
class Split:
    """A train/test split: inputs ``(N, C, *)`` float32 and integer labels."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def num_classes(self) -> int:
        """The number of classes (labels are ``0 .. num_classes - 1``)."""
        return int(max(self.y_train.max(), self.y_test.max())) + 1


@functools.lru_cache(maxsize=2)
def digits(test_fraction: float = 0.3) -> Split:
    """scikit-learn's 8x8 digits as ``(N, 1, 8, 8)`` images in [0, 1]; a fixed stratified split."""
    datasets = require("sklearn.datasets")
    model_selection = require("sklearn.model_selection")
    bunch = datasets.load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = model_selection.train_test_split(
        range(len(y)), test_size=test_fraction, random_state=0, stratify=bunch.target
    )
    return Split("digits", x[idx_train], y[idx_train], x[idx_test], y[idx_test])


@functools.lru_cache(maxsize=2)
def mnist1d(num_samples: int = 5000, seed: int = 42) -> Split:
    """MNIST-1D as ``(N, 1, 40)`` signals from the offline generator (80 % train, 20 % test)."""
    np = require("numpy")
    data = require("mnist1d.data")
    args = data.get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    # make_dataset reseeds numpy's and python's global generators: restore them afterwards.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def signals(a: object) -> Tensor:
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1)

    def labels(a: object) -> Tensor:
        return torch.tensor(a, dtype=torch.long)

    return Split("mnist1d", signals(ds["x"]), labels(ds["y"]), signals(ds["x_test"]), labels(ds["y_test"]))


def standardize(split: Split) -> Split:
    """The split with inputs shifted and scaled by the training set's global mean and std."""
    mean, std = split.x_train.mean(), split.x_train.std()
    return Split(split.name, (split.x_train - mean) / std, split.y_train, (split.x_test - mean) / std, split.y_test)


def subset(split: Split, train: int | None, test: int | None) -> Split:
    """The first ``train`` training and ``test`` test examples (all where ``None``)."""
    return Split(split.name, split.x_train[:train], split.y_train[:train], split.x_test[:test], split.y_test[:test])


def iid_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """One epoch of shuffled index minibatches of exactly ``batch_size`` (the remainder is dropped)."""
    if not 1 <= batch_size <= n:
        raise ValueError(f"iid_batches: expected 1 <= batch_size <= {n}, got {batch_size}")
    order = torch.randperm(n, generator=generator)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def class_batches(
    labels: Tensor, batch_size: int, classes_per_batch: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """One epoch of minibatches that each hold ``batch_size / classes_per_batch`` examples of
    ``classes_per_batch`` distinct classes: a non-i.i.d. order (every example still appears at most once).

    Each minibatch picks its classes at random among those with enough unused examples left; the
    epoch ends when fewer than ``classes_per_batch`` classes can fill their share.
    """
    if classes_per_batch < 1 or batch_size % classes_per_batch:
        raise ValueError(
            f"class_batches: expected classes_per_batch to divide batch_size={batch_size}, got {classes_per_batch}"
        )
    per_class = batch_size // classes_per_batch
    num_classes = int(labels.max()) + 1
    pools = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        pools.append(members[torch.randperm(len(members), generator=generator)].tolist())
    while True:
        ready = [c for c in range(num_classes) if len(pools[c]) >= per_class]
        if len(ready) < classes_per_batch:
            return
        pick = torch.randperm(len(ready), generator=generator)[:classes_per_batch].tolist()
        batch = []
        for i in pick:
            pool = pools[ready[i]]
            batch += pool[:per_class]
            del pool[:per_class]
        yield torch.tensor(batch, dtype=torch.long)
