"""``map``: the network trained with Adam (lr 1e-3), its own softmax; for regression, the point
prediction with the training residuals' variance as the noise."""

from __future__ import annotations

import torch

from ._common import Fitted, FittedRegression, residual_sigma, run, run_regression, softmax_predict


def fit(task, split, seed, epochs, progress) -> Fitted:
    r = run(task, split, seed, epochs, progress)
    return Fitted(softmax_predict(r.model), r.train_seconds, r.step_ms, r.peak_mem_mb, r.history,
                  first_step_s=r.first_step_s)


def fit_regression(task, split, seed, epochs, progress) -> FittedRegression:
    r = run_regression(task, split, seed, epochs, "map")
    s2 = residual_sigma(r.model, split) ** 2

    def predict(x):
        with torch.no_grad():
            f = r.model.eval()(x)
        return f, torch.full_like(f, s2)

    return FittedRegression(predict, r.train_seconds, r.step_ms, None, r.history)
