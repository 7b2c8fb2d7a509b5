"""Curvature of the negative log-likelihood: estimators, dense references, the estimator table."""

from . import estimators, exact
from .functional import diag_efisher, diag_ggn, diag_hessian, diag_hutchinson, hvp, trainable

__all__ = [
    "diag_ggn",
    "diag_efisher",
    "diag_hessian",
    "diag_hutchinson",
    "hvp",
    "trainable",
    "exact",
    "estimators",
]
