"""``laplace-torch``, the peer from its own package (``pip install effortless-bayes[peers]``): MAP,
then laplace-torch's last-layer KFAC Laplace, marglik prior, probit GLM predictive."""

from __future__ import annotations

import time

import torch

from ._common import Fitted, chunked, run

PACKAGE = "laplace"  # the import name (distribution laplace-torch)


def fit(task, split, seed, epochs, progress) -> Fitted:
    from laplace import Laplace

    r = run(task, split, seed, epochs, progress)
    t0 = time.perf_counter()
    la = Laplace(r.model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(split.x_train, split.y_train),
                                       batch_size=512))  # fmt: skip
    la.optimize_prior_precision(method="marglik")
    extra = time.perf_counter() - t0

    def predict(x):
        with torch.no_grad():
            return chunked(lambda xb: la(xb, pred_type="glm", link_approx="probit"), x, 1000)

    return Fitted(predict, r.train_seconds + extra, r.step_ms, r.peak_mem_mb, r.history)
