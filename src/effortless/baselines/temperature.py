"""``temperature`` (Guo et al. 2017): MAP on 90 % of the training set, then one softmax
temperature fitted by NLL on the held-out 10 %."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..data import Split
from ._common import Fitted, chunked, run


def fit(task, split, seed, epochs, progress, n_val=0.1) -> Fitted:
    n = len(split.x_train)
    k = int(n * (1 - n_val))
    train_split = Split(
        split.name, split.x_train[:k], split.y_train[:k], split.x_test, split.y_test, split.n_classes
    )
    r = run(task, train_split, seed, epochs, progress)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = r.model.eval()(split.x_train[k:])
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), split.y_train[k:])
        loss.backward()
        return loss

    opt.step(closure)
    temp = float(log_t.detach().exp())

    def predict(x):
        with torch.no_grad():
            return chunked(lambda xb: (r.model(xb) / temp).softmax(-1), x)

    return Fitted(predict, r.train_seconds + time.perf_counter() - t0, r.step_ms, r.peak_mem_mb,
                  r.history)  # fmt: skip
