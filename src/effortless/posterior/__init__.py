"""Gaussian posteriors over network weights."""

from . import predictive
from .diag import DiagGaussian

__all__ = ["DiagGaussian", "predictive"]
