"""Gaussian posteriors over network weights."""

from . import evidence, kron, predictive
from .diag import DiagGaussian
from .kron import KronLastLayer

__all__ = ["DiagGaussian", "KronLastLayer", "evidence", "kron", "predictive"]
