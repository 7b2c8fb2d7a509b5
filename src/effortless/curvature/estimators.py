"""The table of Hessian estimators a :class:`~effortless.BayesAdam` can use (``hessian=`` key).

Each estimator returns ``ĥ``, an estimate of the diagonal of the *per-sample average* Hessian of
the negative log-likelihood at the sampled weights θ (the optimizer multiplies by ``n_data``).

Two kinds:

* optimizer-side (``needs_model=False``): computed inside the update from the minibatch-mean
  gradient ``g`` and the weight noise ``θ − μ`` alone, so a plain training loop works:
    - ``reparam``: ``g ⊙ (θ − μ) / σ²`` (Stein's lemma; unbiased for ``E_q[diag ∇²L]``, can be
      negative, so the running estimate uses a positivity-preserving update as in IVON);
    - ``gradsq``: ``B · g ⊙ g`` (squared minibatch gradient scaled by the batch size ``B``, ≈ the
      per-sample empirical Fisher when the mean gradient is small; Adam/Vadam).
* model-side (``needs_model=True``): need the model's outputs, so they run through
  :meth:`BayesAdam.train_step`; ``fn(model, x, y, lik, generator, params)`` returns a batch *sum*
  per parameter name (``efisher``, ``ggn-mc`` and ``ggn`` also take
  ``product_dtype=``, see :func:`~effortless.curvature.diag_ggn`; :data:`LOW_PRECISION` lists them):
    - ``efisher``: squared per-sample gradients (VOGN);
    - ``ggn-mc``: squared gradients at one label drawn from the model's predictive;
    - ``ggn``: exact GGN diagonal;
    - ``hutchinson``: one Rademacher probe of the Hessian diagonal (can be negative);
    - ``kfac``: the diagonal of the Kronecker-factored GGN ``G ⊗ A`` (Linear/Conv layers only).

With the hook engine (:mod:`effortless.curvature.engine`), ``train_step`` computes ``efisher``
from the training backward itself and ``ggn``/``ggn-mc``/``kfac`` from one extra batched backward
to the layer outputs, sharing the training forward.

The curvature engine plugs in by replacing an entry's ``fn``; the optimizer only sees this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import functional as cf


@dataclass(frozen=True)
class Estimator:
    key: str
    needs_model: bool
    nonnegative: bool
    fn: Callable | None = None
    summary: str = ""
    # what the hook engine computes from the training forward itself (train_step), if it can
    engine_kind: str | None = None


ESTIMATORS: dict[str, Estimator] = {
    "reparam": Estimator("reparam", False, False, None, "g·(θ−μ)/σ², free"),
    "gradsq": Estimator("gradsq", False, True, None, "B·g², free"),
    "efisher": Estimator(
        "efisher",
        True,
        True,
        lambda model, x, y, lik, gen, params, product_dtype=None: cf.diag_efisher(
            model, x, y, lik, params=params, product_dtype=product_dtype
        ),
        "per-sample squared gradients",
        "efisher",
    ),
    "ggn-mc": Estimator(
        "ggn-mc",
        True,
        True,
        lambda model, x, y, lik, gen, params, product_dtype=None: cf.diag_ggn(
            model, x, y, lik, method="mc", generator=gen, params=params, product_dtype=product_dtype
        ),
        "GGN diagonal from one sampled label",
        "ggn-mc",
    ),
    "ggn": Estimator(
        "ggn",
        True,
        True,
        lambda model, x, y, lik, gen, params, product_dtype=None: cf.diag_ggn(
            model, x, y, lik, method="exact", params=params, product_dtype=product_dtype
        ),
        "exact GGN diagonal",
        "ggn",
    ),
    "kfac": Estimator(
        "kfac",
        True,
        True,
        lambda model, x, y, lik, gen, params: cf.diag_kfac(model, x, y, lik, params=params),
        "diagonal of the Kronecker-factored GGN (Linear/Conv layers)",
        "kfac",
    ),
    "hutchinson": Estimator(
        "hutchinson",
        True,
        False,
        lambda model, x, y, lik, gen, params: cf.diag_hutchinson(
            model, x, y, lik, generator=gen, params=params
        ),
        "Hessian diagonal, one Rademacher probe",
    ),
}


# model-side keys whose ``fn`` takes ``product_dtype=`` (the hook engine's low-precision products)
# (the diagonal of KFAC needs no products: it sums squares)
LOW_PRECISION = frozenset({"efisher", "ggn-mc", "ggn"})


def get(key: str) -> Estimator:
    """Validate a ``hessian=`` key and return its estimator."""
    if key not in ESTIMATORS:
        raise ValueError(f"hessian must be one of {sorted(ESTIMATORS)}, got {key!r}")
    return ESTIMATORS[key]
