"""The methods `effortless bench` compares, one module each, behind one small interface.

``fit(task, split, seed, epochs, progress) -> Fitted`` with ``Fitted.predict(x) -> probs (B, C)``;
for regression ``-> FittedRegression`` with ``predict(x) -> (mean, variance)``. Every method trains
the task's network on the same data order and is evaluated by the same code
(:mod:`effortless.experiments.bench`).

=====================  ===========================================================
module                 methods
=====================  ===========================================================
:mod:`.map`            ``map`` (Adam)
:mod:`.bayesadam`      ``bayesadam``, ``bayesadam-<key>`` for every Hessian key
:mod:`.bayesadam`      ``bayesadam-bf16``: the defaults with bf16 optimizer state
:mod:`.bayesadam`      ``bayesadam-lowmem``: only the curvature in bf16, no averaged mean
:mod:`.mc_dropout`     ``mc-dropout``
:mod:`.ensemble`       ``ensemble`` (5 members, cost summed)
:mod:`.temperature`    ``temperature`` (MAP + temperature scaling)
:mod:`.laplace`        ``laplace`` (last-layer KFAC), ``laplace-diag`` (all weights)
:mod:`.adam_laplace`   ``adam-laplace`` (the posterior in Adam's moments)
:mod:`.swag`           ``swag`` (diagonal + low rank)
:mod:`.vi`             ``vi`` (mean-field, local reparameterisation)
:mod:`.ivon_opt`       ``ivon`` (the peer, ivon-opt), when installed
:mod:`.laplace_torch`  ``laplace-torch`` (the peer), when installed
=====================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..curvature import estimators
from . import (
    adam_laplace,
    bayesadam,
    ensemble,
    ivon_opt,
    laplace,
    laplace_torch,
    map,  # noqa: A004  (the method's name)
    mc_dropout,
    swag,
    temperature,
    vi,
)
from ._common import Fitted, FittedRegression

__all__ = ["METHODS", "REGRESSION_METHODS", "Fitted", "FittedRegression", "available"]

METHODS: dict[str, Callable[..., Fitted]] = {
    "map": map.fit,
    "bayesadam": bayesadam.make_fit("reparam"),
    **{f"bayesadam-{k}": bayesadam.make_fit(k) for k in estimators.ESTIMATORS},
    "bayesadam-bf16": bayesadam.make_fit("reparam", state_dtype=torch.bfloat16),
    "bayesadam-lowmem": bayesadam.make_fit("reparam", **bayesadam.LOWMEM),
    "mc-dropout": mc_dropout.fit,
    "ensemble": ensemble.fit,
    "temperature": temperature.fit,
    "laplace": laplace.fit,
    "laplace-diag": laplace.fit_diag,
    "adam-laplace": adam_laplace.fit,
    "swag": swag.fit,
    "vi": vi.fit,
    "ivon": ivon_opt.fit,
    "laplace-torch": laplace_torch.fit,
}

REGRESSION_METHODS: dict[str, Callable[..., FittedRegression]] = {
    "map": map.fit_regression,
    "bayesadam": bayesadam.make_fit_regression("reparam"),
    **{f"bayesadam-{k}": bayesadam.make_fit_regression(k) for k in estimators.ESTIMATORS},
    "bayesadam-bf16": bayesadam.make_fit_regression("reparam", state_dtype=torch.bfloat16),
    "bayesadam-lowmem": bayesadam.make_fit_regression("reparam", **bayesadam.LOWMEM),
    "mc-dropout": mc_dropout.fit_regression,
    "ensemble": ensemble.fit_regression,
    "laplace": laplace.fit_regression,
    "laplace-diag": laplace.fit_diag_regression,
}

# the peers: the package each needs, and how to get it
_PEERS = {"ivon": (ivon_opt.PACKAGE, "ivon-opt"), "laplace-torch": (laplace_torch.PACKAGE, "laplace-torch")}


def available(name: str) -> str | None:
    """Why ``name`` cannot run here, or None."""
    if name not in METHODS:
        return f"unknown method (choose from {', '.join(METHODS)})"
    if name in _PEERS:
        package, dist = _PEERS[name]
        try:
            __import__(package)
        except ImportError:
            return f"{dist} is not installed (scripts/setup.sh --peers)"
        except Exception as err:  # installed but broken
            return f"{dist} cannot be imported ({type(err).__name__}: {err})"
    return None
