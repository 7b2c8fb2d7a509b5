"""Bayesian optimizers (``torch.optim.Optimizer`` subclasses)."""

from .bayesadam import BayesAdam, bayesadam_update

__all__ = ["BayesAdam", "bayesadam_update"]
