"""effortless: Bayesian deep learning at the cost of Adam.

Example:
    >>> import effortless as ef
    >>> sorted(ef.curvature.estimators.ESTIMATORS)[:3]
    ['efisher', 'ggn', 'ggn-mc']
"""

import re as _re
import warnings as _warnings

import torch as _torch

_OLDEST_TORCH = (2, 6)  # the oldest torch the test suite passes on (pyproject.toml)


def _check_torch(version: str) -> None:
    """Warn when ``version`` (a torch version string) is older than ``_OLDEST_TORCH``."""
    found = _re.match(r"(\d+)\.(\d+)", version)
    if found and tuple(int(v) for v in found.groups()) < _OLDEST_TORCH:
        oldest = ".".join(map(str, _OLDEST_TORCH))
        _warnings.warn(
            f"effortless needs torch >= {oldest}, found {version}: older ones cannot take "
            "model.named_parameters() in an optimizer or run a torch.compile'd model eagerly for "
            f"its curvature (pip install 'torch>={oldest}')",
            RuntimeWarning,
            stacklevel=2,
        )


_check_torch(_torch.__version__)

from . import curvature, likelihoods, metrics  # noqa: E402
from .api import fit, laplace, predict, predict_samples  # noqa: E402
from .optim import BayesAdam  # noqa: E402
from .posterior import DiagGaussian, KronLastLayer  # noqa: E402
from .posterior.from_adam import posterior_from_adam  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "BayesAdam", "DiagGaussian", "KronLastLayer", "fit", "predict", "predict_samples", "laplace",
    "posterior_from_adam", "curvature", "likelihoods", "metrics",
]  # fmt: skip
