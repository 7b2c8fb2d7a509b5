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
    # distribution shift for the bench's shift curves: (name, intensities, x -> shifted x)
    shift: tuple[str, tuple[float, ...], Callable[[torch.Tensor, float], torch.Tensor]] | None = None


def _mnist_test(split):
    return data.mnist().x_test


def _noise(split):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1000, *split.x_test.shape[1:], generator=g)


ROTATION = ("rotation (degrees)", (0.0, 15.0, 30.0, 45.0, 60.0, 90.0, 135.0, 180.0), data.rotate)
NOISE = ("Gaussian noise (× feature std)", (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0), data.add_noise)


def _tabular(name, n_in, n_out):
    return Task(
        name, lambda: data.tabular(name), lambda p: MLP(n_in, [64, 64], n_out, dropout=p), None, 50, 32, NOISE
    )


TASKS = {
    t.name: t
    for t in [
        Task("fmnist-mlp", data.fashion_mnist, lambda p: MLP(784, [512, 256], 10, dropout=p), _mnist_test, 5,
             shift=ROTATION),
        Task("fmnist-cnn", data.fashion_mnist, lambda p: LeNet(dropout=p), _mnist_test, 3, shift=ROTATION),
        Task("mnist1d-mlp", data.mnist1d, lambda p: MLP(40, [256, 256], 10, dropout=p), _noise, 30,
             shift=NOISE),
        Task("mnist1d-cnn", data.mnist1d, lambda p: CNN1d(dropout=p), _noise, 30, shift=NOISE),
        _tabular("digits", 64, 10),
        _tabular("breast_cancer", 30, 2),
        _tabular("wine", 13, 3),
    ]
}
