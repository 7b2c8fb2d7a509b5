"""``ensemble`` (Lakshminarayanan et al. 2017, without adversarial training): five MAP networks from
different seeds, their predictives averaged. Its cost is reported in full: the members' training
seconds and step times are summed."""

from __future__ import annotations

import torch

from ._common import Fitted, FittedRegression, residual_sigma, run, run_regression, softmax_predict

MEMBERS = 5


def fit(task, split, seed, epochs, progress, members=MEMBERS) -> Fitted:
    runs = [run(task, split, 1000 * seed + i, epochs, progress) for i in range(members)]

    def predict(x):
        return torch.stack([softmax_predict(r.model)(x) for r in runs]).mean(0)

    return Fitted(predict, sum(r.train_seconds for r in runs), sum(r.step_ms for r in runs),
                  runs[0].peak_mem_mb, runs[0].history)  # fmt: skip


def fit_regression(task, split, seed, epochs, progress, members=MEMBERS) -> FittedRegression:
    runs = [run_regression(task, split, 1000 * seed + i, epochs, "map") for i in range(members)]
    s2 = [residual_sigma(r.model, split) ** 2 for r in runs]

    def predict(x):
        with torch.no_grad():
            f = torch.stack([r.model.eval()(x) for r in runs])  # (M, N, 1)
        var = torch.tensor(s2, dtype=f.dtype, device=f.device)[:, None, None]  # (on cuda: was on the CPU)
        mean = f.mean(0)
        return mean, (var + f.pow(2)).mean(0) - mean.pow(2)  # the mixture's moments

    return FittedRegression(predict, sum(r.train_seconds for r in runs), sum(r.step_ms for r in runs), None,
                            runs[0].history)  # fmt: skip
