"""Regression methods for the benchmark: each returns a predictive mean and variance (including
the noise) in the standardised target units.

The homoscedastic noise σ of MAP, BayesAdam, MC dropout and the ensemble members is the root mean
squared training residual of the point prediction; the Laplace method chooses σ and the prior by
the evidence (``ef.laplace(..., sigma_noise="marglik")``) and predicts with the GLM predictive.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import api
from ..curvature import estimators
from ..experiments.train import train


@dataclass
class FittedRegression:
    predict: object  # x -> (mean (N, 1), variance (N, 1))
    train_seconds: float
    step_ms: float
    peak_mem_mb: float | None = None
    train_loss: list[float] | None = None


def _sigma(model, split) -> float:
    with torch.no_grad():
        model.eval()
        return float((model(split.x_train) - split.y_train).pow(2).mean().sqrt())


def _run(task, split, seed, epochs, method, dropout=0.0, **kw):
    return train(method, lambda: task.model(dropout), split, epochs=epochs, batch_size=task.batch_size,
                 seed=seed, progress=False, **kw)  # fmt: skip


def fit_map(task, split, seed, epochs, progress):
    run = _run(task, split, seed, epochs, "map")
    s2 = _sigma(run.model, split) ** 2

    def predict(x):
        with torch.no_grad():
            f = run.model.eval()(x)
        return f, torch.full_like(f, s2)

    return FittedRegression(predict, run.train_seconds, run.step_ms, None, run.history)


def fit_bayesadam(task, split, seed, epochs, progress, samples=32, hessian="reparam"):
    run = _run(task, split, seed, epochs, "bayesadam", hessian=hessian)
    sigma = _sigma(run.model, split)

    def predict(x):
        gen = torch.Generator().manual_seed(seed)
        run.model.eval()
        return api.predict(run.model, run.posterior, x, n_samples=samples, likelihood="regression",
                           sigma_noise=sigma, generator=gen)  # fmt: skip

    return FittedRegression(predict, run.train_seconds, run.step_ms, None, run.history)


def fit_mc_dropout(task, split, seed, epochs, progress, p=0.05, samples=32):
    run = _run(task, split, seed, epochs, "map", dropout=p)
    s2 = _sigma(run.model, split) ** 2

    def predict(x):
        torch.manual_seed(seed)
        run.model.train()
        with torch.no_grad():
            f = torch.stack([run.model(x) for _ in range(samples)])
        run.model.eval()
        return f.mean(0), f.var(0, unbiased=False) + s2

    return FittedRegression(predict, run.train_seconds, run.step_ms, None, run.history)


def fit_ensemble(task, split, seed, epochs, progress, members=5):
    runs = [_run(task, split, 1000 * seed + i, epochs, "map") for i in range(members)]
    s2 = [_sigma(r.model, split) ** 2 for r in runs]

    def predict(x):
        with torch.no_grad():
            f = torch.stack([r.model.eval()(x) for r in runs])  # (M, N, 1)
        var = torch.tensor(s2, dtype=f.dtype)[:, None, None]
        mean = f.mean(0)
        return mean, (var + f.pow(2)).mean(0) - mean.pow(2)  # the mixture's moments

    return FittedRegression(predict, sum(r.train_seconds for r in runs), sum(r.step_ms for r in runs), None,
                            runs[0].history)  # fmt: skip


def fit_laplace(task, split, seed, epochs, progress):
    run = _run(task, split, seed, epochs, "map")
    t0 = time.perf_counter()
    n = len(split.x_train)
    loader = [(split.x_train[i : i + 256], split.y_train[i : i + 256]) for i in range(0, n, 256)]
    post = api.laplace(run.model, loader, likelihood="regression", hessian="ggn", prior_precision="marglik",
                       sigma_noise="marglik")  # fmt: skip
    extra = time.perf_counter() - t0

    def predict(x):
        return api.predict(run.model, post, x, likelihood="regression", sigma_noise=post.sigma_noise,
                           method="glm")  # fmt: skip

    return FittedRegression(predict, run.train_seconds + extra, run.step_ms, None, run.history)


def _bayesadam_with(key):
    def fit(task, split, seed, epochs, progress):
        return fit_bayesadam(task, split, seed, epochs, progress, hessian=key)

    return fit


REGRESSION_METHODS = {
    "map": fit_map,
    "bayesadam": fit_bayesadam,
    **{f"bayesadam-{k}": _bayesadam_with(k) for k in estimators.ESTIMATORS},
    "mc-dropout": fit_mc_dropout,
    "ensemble": fit_ensemble,
    "laplace": fit_laplace,
}
