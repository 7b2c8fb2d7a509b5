"""Gaussian posteriors over network weights."""

from . import evidence, predictive
from .diag import DiagGaussian

__all__ = ["DiagGaussian", "evidence", "predictive"]
