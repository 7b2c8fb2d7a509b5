"""Curvature of the negative log-likelihood: estimators, dense references, the estimator table."""

from . import engine, estimators, exact, operators
from .data import accumulate
from .engine import plan
from .functional import (
    diag_efisher,
    diag_ggn,
    diag_hessian,
    diag_hutchinson,
    diag_kfac,
    hvp,
    kfac,
    trainable,
)

__all__ = [
    "accumulate",
    "diag_ggn",
    "diag_efisher",
    "diag_hessian",
    "diag_hutchinson",
    "diag_kfac",
    "hvp",
    "kfac",
    "plan",
    "trainable",
    "engine",
    "operators",
    "exact",
    "estimators",
]
