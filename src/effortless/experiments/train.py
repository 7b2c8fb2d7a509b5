"""Train and evaluate one method on one dataset split, the same way for every method.

Both methods see the same model initialisation, the same shuffling and the same epochs; the
evaluation code is shared. Used by the demo and by the benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import metrics
from ..api import _progress, predict
from ..data import Split, loader
from ..optim import BayesAdam
from ..posterior import DiagGaussian
from .memory import measure_step


@dataclass
class RunResult:
    method: str
    model: torch.nn.Module
    posterior: DiagGaussian | None
    train_seconds: float
    step_ms: float
    history: list[float] = field(default_factory=list)
    optimizer: object = None
    peak_mem_mb: float | None = None  # all tensor memory during one training step
    first_step_s: float = 0.0  # the first step alone (BayesAdam's fused kernels compile in it)
    n_steps: int = 0

    @property
    def later_step_ms(self) -> float:
        """Mean milliseconds of the steps after the first (the first pays one-off costs)."""
        if self.n_steps < 2:
            return self.step_ms
        return 1000 * (self.train_seconds - self.first_step_s) / (self.n_steps - 1)


MEASURED_STEP = 3  # the step (0-based) whose memory is counted: after warm-up


def step_measured_once(one_step, x, y, step: int, model, opt):
    """``one_step(x, y)``, under the memory counter if ``step`` is ``MEASURED_STEP``. Returns (its
    loss, the peak tensor memory in MiB or None, the seconds the counted step took: the caller
    leaves them out of its timing, as the counter slows the step down)."""
    if step != MEASURED_STEP:
        return one_step(x, y), None, 0.0
    synchronize(x.device)  # (queued GPU work before it stays in the timing)
    t0 = time.perf_counter()
    loss, peak = measure_step(lambda: one_step(x, y), model, opt, (x, y))
    synchronize(x.device)
    return loss, peak / 2**20, time.perf_counter() - t0


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device runs asynchronously: a clock read
    without it times the queueing, not the work); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    method: str,
    make_model: Callable[[], torch.nn.Module],
    split: Split,
    epochs: int = 5,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    measure_memory: bool = False,
    on_step: Callable[[torch.optim.Optimizer], None] | None = None,
    **kwargs,
) -> RunResult:
    """Train ``method`` ("map": Adam; "bayesadam": BayesAdam with ``kwargs``) from a seeded init.

    The loop is the plain user loop (zero_grad, forward/backward, step), with a constant learning
    rate, as a user would write it for Adam; Hessian keys that need the model's outputs go
    through ``BayesAdam.train_step``. ``measure_memory`` counts the tensor memory of one step
    (``RunResult.peak_mem_mb``); ``on_step(optimizer)`` runs after every step, outside the
    timing. (Regression trains on the mean squared error here, i.e. a
    Gaussian likelihood up to the noise scale, for Adam and the user loop alike.)
    """
    torch.manual_seed(seed)
    device = split.x_train.device  # the network trains where the data is (the same init everywhere)
    model = make_model().to(device)
    data = loader(split.x_train, split.y_train, batch_size=batch_size, seed=seed)
    regression = split.n_classes == 0
    lossf = F.mse_loss if regression else F.cross_entropy
    if method == "map":
        opt = torch.optim.Adam(model.parameters(), lr=kwargs.pop("lr", 1e-3), **kwargs)
    elif method == "bayesadam":
        gen = torch.Generator(device=device).manual_seed(seed + 1)  # (noise drawn where it is used)
        opt = BayesAdam(model.named_parameters(), n_data=len(split.x_train), generator=gen, **kwargs)
    else:
        raise ValueError(f"method must be 'map' or 'bayesadam', got {method!r}")
    model.train()
    history, steps, peak, first = [], 0, None, 0.0

    def one_step(x, y):
        if method == "bayesadam" and (opt.estimator.needs_model or opt.hessian == "gradsq"):
            # estimators that need outputs, or (gradsq) the size of each minibatch
            if regression:  # σ² = ½: the NLL is the squared error, the loss of every other path here
                return opt.train_step(model, x, y, likelihood="regression", sigma_noise=2**-0.5)
            return opt.train_step(model, x, y, likelihood="classification")
        opt.zero_grad()
        if method == "bayesadam":
            with opt.sampled_params(train=True):
                loss = lossf(model(x), y)
                loss.backward()
        else:
            loss = lossf(model(x), y)
            loss.backward()
        opt.step()
        return loss

    start = time.perf_counter()
    bar = _progress(range(epochs), progress, desc=method, unit="epoch", leave=False)
    for _ in bar:
        total = 0.0
        for x, y in data:
            t_step = time.perf_counter()
            loss, mem, spent = step_measured_once(one_step, x, y, steps if measure_memory else -1, model, opt)
            peak, start = mem or peak, start + spent
            if steps == 0:  # (MEASURED_STEP is later: nothing to take out here)
                synchronize(device)
                first = time.perf_counter() - t_step
            if on_step is not None:
                t0 = time.perf_counter()
                on_step(opt)
                start += time.perf_counter() - t0
            total += float(loss.detach()) * len(x)
            steps += 1
        history.append(total / len(split.x_train))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    synchronize(device)
    seconds = time.perf_counter() - start
    model.eval()
    post = opt.posterior() if method == "bayesadam" else None
    step_ms = 1000 * seconds / max(steps, 1)
    return RunResult(method, model, post, seconds, step_ms, history, opt, peak, first, steps)


@torch.no_grad()
def predict_probs(run: RunResult, x: torch.Tensor, n_samples: int = 32, seed: int = 0, chunk: int = 2000):
    """Predictive probabilities: softmax at the weights (MAP) or MC average over the posterior."""
    outs = []
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        if run.posterior is None:
            outs.append(run.model(xb).softmax(-1))
        else:
            gen = torch.Generator().manual_seed(seed + i)
            outs.append(predict(run.model, run.posterior, xb, n_samples=n_samples, generator=gen))
    return torch.cat(outs)


def evaluate(run: RunResult, split: Split, x_ood: torch.Tensor | None = None, n_samples: int = 32) -> dict:
    probs = predict_probs(run, split.x_test, n_samples)
    probs_ood = predict_probs(run, x_ood, n_samples) if x_ood is not None else None
    row = metrics.classification_report(probs, split.y_test, probs_ood)
    row.update(method=run.method, train_seconds=run.train_seconds, step_ms=run.step_ms)
    return row
