"""What every benchmark method shares: the result types, the shared training run and the
chunked, no-grad evaluation helpers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data import loader
from ..experiments.train import RunResult, step_measured_once, synchronize, train


@dataclass
class Fitted:
    """A trained classification method: ``predict(x) -> probs (B, C)``."""

    predict: Callable[[torch.Tensor], torch.Tensor]
    train_seconds: float
    step_ms: float
    peak_mem_mb: float | None = None  # all tensor memory during one training step (one member)
    train_loss: list[float] | None = None  # mean training loss per epoch (first member)
    first_step_s: float | None = None  # the first step alone, in train_seconds (where recorded)


@dataclass
class FittedRegression:
    """A trained regression method: ``predict(x) -> (mean (N, 1), variance (N, 1))``, the variance
    including the noise, in the standardised target units."""

    predict: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    train_seconds: float
    step_ms: float
    peak_mem_mb: float | None = None
    train_loss: list[float] | None = None


def chunked(fn, x, chunk=2000):
    """``fn`` over ``x`` in chunks of rows, concatenated (bounded memory for large test sets)."""
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def softmax_predict(model):
    """The network's own predictive (eval mode, no gradients)."""

    def predict(x):
        with torch.no_grad():
            model.eval()
            return chunked(lambda xb: model(xb).softmax(-1), x)

    return predict


def run(task, split, seed, epochs, progress, method="map", dropout=0.0, **kwargs) -> RunResult:
    """The shared classification training run of the task's network (memory measured), MAP
    (Adam) or BayesAdam with ``kwargs``."""
    return train(method, lambda: task.model(dropout), split, epochs=epochs, batch_size=task.batch_size,
                 seed=seed, progress=progress, measure_memory=True, **kwargs)  # fmt: skip


def run_regression(task, split, seed, epochs, method, dropout=0.0, **kwargs) -> RunResult:
    """The shared regression training run (the squared error for every method)."""
    return train(method, lambda: task.model(dropout), split, epochs=epochs, batch_size=task.batch_size,
                 seed=seed, progress=False, **kwargs)  # fmt: skip


def residual_sigma(model, split) -> float:
    """The homoscedastic noise σ of a point predictor: its root mean squared training residual."""
    with torch.no_grad():
        model.eval()
        return float((model(split.x_train) - split.y_train).pow(2).mean().sqrt())


def train_loop(one_step, model, opt, split, batch_size, seed, epochs, after_step=None):
    """The bench's loop for methods with their own training step (``one_step(x, y) -> loss``):
    the shared data order, one step's memory counted (outside the timing), the mean loss per
    epoch. ``after_step(epoch, i)`` runs after step ``i`` of ``epoch``, inside the timing (a
    method's own extra work). Returns (seconds, ms per step, peak MiB, loss per epoch)."""
    data = loader(split.x_train, split.y_train, batch_size=batch_size, seed=seed)
    steps, peak, t0, history = 0, None, time.perf_counter(), []
    for epoch in range(epochs):
        total = 0.0
        for i, (x, y) in enumerate(data):
            loss, mem, spent = step_measured_once(one_step, x, y, steps, model, opt)
            peak, t0 = mem or peak, t0 + spent
            total += float(loss.detach()) * len(x)
            steps += 1
            if after_step is not None:
                after_step(epoch, i)
        history.append(total / len(split.x_train))
    synchronize(split.x_train.device)
    seconds = time.perf_counter() - t0
    return seconds, 1000 * seconds / max(steps, 1), peak, history
