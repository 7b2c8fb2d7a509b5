"""``bayesadam``, ``bayesadam-<key>``, ``bayesadam-bf16`` and ``bayesadam-lowmem``: the network
trained with :class:`effortless.BayesAdam` (defaults, ``hessian=key``; ``state_dtype=torch.bfloat16``;
:data:`LOWMEM`), predictions by Monte Carlo over its posterior (32 samples)."""

from __future__ import annotations

import torch

from .. import api
from ._common import Fitted, FittedRegression, chunked, residual_sigma, run, run_regression

SAMPLES = 32
# the settings within both of issue #2's cost goals on its MLP (3.62× the parameters beyond weights
# and gradients at 1.26× Adam's step; docs/results/bf16-state-probe.md): the last iterate, and only
# the curvature in bf16
LOWMEM = dict(averaging=None, state_dtype={"hess": torch.bfloat16})


def make_fit(key: str = "reparam", **options):
    """The classification method for the Hessian key ``key`` (``options``: more BayesAdam arguments)."""

    def fit(task, split, seed, epochs, progress) -> Fitted:
        r = run(task, split, seed, epochs, progress, method="bayesadam", hessian=key, **options)

        def predict(x):
            gen = torch.Generator().manual_seed(seed)
            return chunked(
                lambda xb: api.predict(r.model, r.posterior, xb, n_samples=SAMPLES, generator=gen), x
            )

        return Fitted(predict, r.train_seconds, r.step_ms, r.peak_mem_mb, r.history,
                      first_step_s=r.first_step_s)

    return fit


def make_fit_regression(key: str = "reparam", **options):
    """The regression method for ``key``: the noise σ is the posterior mean's training residual."""

    def fit(task, split, seed, epochs, progress) -> FittedRegression:
        r = run_regression(task, split, seed, epochs, "bayesadam", hessian=key, **options)
        sigma = residual_sigma(r.model, split)

        def predict(x):
            gen = torch.Generator().manual_seed(seed)
            r.model.eval()
            return api.predict(r.model, r.posterior, x, n_samples=SAMPLES, likelihood="regression",
                               sigma_noise=sigma, generator=gen)  # fmt: skip

        return FittedRegression(predict, r.train_seconds, r.step_ms, None, r.history)

    return fit
