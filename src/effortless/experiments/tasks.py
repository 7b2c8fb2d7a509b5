"""The one registry of tasks: data, network, out-of-distribution set, epochs and batch size.

It drives ``effortless bench``, the defaults study (``benchmarks/defaults.py`` and the slow tests)
and ``effortless adam-hessian``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import data
from ..models import MLP, CNN1d, LeNet


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[], data.Split]
    model: Callable[[float], torch.nn.Module]  # dropout -> network
    ood: Callable[[data.Split], torch.Tensor] | None
    epochs: int
    batch_size: int = 128
    # distribution shifts for the bench's shift curves: name -> (axis label, intensities, x -> shifted x)
    shifts: dict[str, tuple[str, tuple[float, ...], Callable[[torch.Tensor, float], torch.Tensor]]] | None = (
        None
    )
    # a second out-of-distribution set: uniform noise shaped like the inputs
    ood_noise: bool = False
    # a new random train/test split per seed (repeated 90/10 splits: the regression benchmarks, and
    # the small tabular sets, whose one fixed split has 18 (wine) to 180 (digits) test rows)
    split_per_seed: bool = False

    def split(self, seed: int = 0) -> data.Split:
        """The data for run ``seed``: its own split where ``split_per_seed``, else the one split."""
        return self.load(seed) if self.split_per_seed else self.load()


def _mnist_test(split):
    return data.mnist().x_test


def _noise(split):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1000, *split.x_test.shape[1:], generator=g)


# Ovadia et al. (2019): rotated (15°–180°) and translated (2–26 px) images
IMAGES = {
    "rotation": ("rotation (degrees)", (0.0, 15.0, 30.0, 45.0, 60.0, 90.0, 135.0, 180.0), data.rotate),
    "translation": ("translation (pixels)", (0.0, 2.0, 4.0, 8.0, 12.0, 16.0, 20.0, 26.0), data.translate),
}
NOISE = {"noise": ("Gaussian noise (× feature std)", (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0), data.add_noise)}


def _tabular(name, n_in, n_out):
    return Task(
        name, lambda seed=0: data.tabular(name, seed=seed), lambda p: MLP(n_in, [64, 64], n_out, dropout=p),
        None, 50, 32, shifts=NOISE, split_per_seed=True,
    )


TASKS = {
    t.name: t
    for t in [
        Task("fmnist-mlp", data.fashion_mnist, lambda p: MLP(784, [512, 256], 10, dropout=p), _mnist_test, 5,
             shifts=IMAGES, ood_noise=True),
        Task("fmnist-cnn", data.fashion_mnist, lambda p: LeNet(dropout=p), _mnist_test, 3, shifts=IMAGES,
             ood_noise=True),
        Task("mnist1d-mlp", data.mnist1d, lambda p: MLP(40, [256, 256], 10, dropout=p), _noise, 30,
             shifts=NOISE),
        Task("mnist1d-cnn", data.mnist1d, lambda p: CNN1d(dropout=p), _noise, 30, shifts=NOISE),
        Task("toy-regression", data.toy_regression, lambda p: MLP(1, [50, 50], 1, dropout=p), None, 400, 32),
        Task("diabetes", lambda seed=0: data.tabular("diabetes", seed=seed),
             lambda p: MLP(10, [50], 1, dropout=p), None, 100, 32, split_per_seed=True),
        Task("boston", lambda seed=0: data.boston(seed), lambda p: MLP(13, [50], 1, dropout=p), None, 100, 32,
             split_per_seed=True),
        _tabular("digits", 64, 10),
        _tabular("breast_cancer", 30, 2),
        _tabular("wine", 13, 3),
    ]
}

REGRESSION = tuple(name for name in ("toy-regression", "diabetes", "boston") if name in TASKS)
CLASSIFICATION = tuple(name for name in TASKS if name not in REGRESSION)
