"""``mc-dropout`` (Gal & Ghahramani 2016): the network with dropout (p = 0.2 for classification,
0.05 for regression) trained with Adam, predictions averaged over dropout masks at test time."""

from __future__ import annotations

import torch

from ._common import Fitted, FittedRegression, chunked, residual_sigma, run, run_regression


def fit(task, split, seed, epochs, progress, p=0.2, samples=30) -> Fitted:
    r = run(task, split, seed, epochs, progress, dropout=p)
    model = r.model

    def predict(x):
        torch.manual_seed(seed)
        model.train()  # dropout on
        with torch.no_grad():
            out = chunked(lambda xb: torch.stack([model(xb).softmax(-1) for _ in range(samples)]).mean(0), x)
        model.eval()
        return out

    return Fitted(predict, r.train_seconds, r.step_ms, r.peak_mem_mb, r.history)


def fit_regression(task, split, seed, epochs, progress, p=0.05, samples=32) -> FittedRegression:
    r = run_regression(task, split, seed, epochs, "map", dropout=p)
    s2 = residual_sigma(r.model, split) ** 2

    def predict(x):
        torch.manual_seed(seed)
        r.model.train()
        with torch.no_grad():
            f = torch.stack([r.model(x) for _ in range(samples)])
        r.model.eval()
        return f.mean(0), f.var(0, unbiased=False) + s2

    return FittedRegression(predict, r.train_seconds, r.step_ms, None, r.history)
