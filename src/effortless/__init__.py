"""effortless: Bayesian deep learning at the cost of Adam.

Example:
    >>> import effortless as ef
    >>> sorted(ef.curvature.estimators.ESTIMATORS)[:3]
    ['efisher', 'ggn', 'ggn-mc']
"""

from . import curvature, likelihoods, metrics
from .api import fit, laplace, predict, predict_samples
from .optim import BayesAdam
from .posterior import DiagGaussian, KronLastLayer
from .posterior.from_adam import posterior_from_adam

__version__ = "0.1.0"
__all__ = [
    "BayesAdam", "DiagGaussian", "KronLastLayer", "fit", "predict", "predict_samples", "laplace",
    "posterior_from_adam", "curvature", "likelihoods", "metrics",
]  # fmt: skip
