"""Gaussian posteriors over network weights."""

from .diag import DiagGaussian

__all__ = ["DiagGaussian"]
