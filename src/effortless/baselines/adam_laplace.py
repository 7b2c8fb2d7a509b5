"""``adam-laplace``: MAP with Adam, then :func:`effortless.posterior_from_adam` (the posterior
Adam's own second moment implies, evidence-tuned prior), probit predictive: no extra data pass."""

from __future__ import annotations

from .. import api
from ..posterior.from_adam import posterior_from_adam
from ._common import Fitted, chunked, run


def fit(task, split, seed, epochs, progress) -> Fitted:
    r = run(task, split, seed, epochs, progress)
    post = posterior_from_adam(r.model, r.optimizer, len(split.x_train), task.batch_size, "marglik")

    def predict(x):
        return chunked(lambda xb: api.predict(r.model, post, xb, method="probit"), x, 500)

    return Fitted(predict, r.train_seconds, r.step_ms, r.peak_mem_mb, r.history)
