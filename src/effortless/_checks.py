"""Argument checks shared by the public API."""

from __future__ import annotations

import numbers


def is_number(value) -> bool:
    """A real Python or NumPy scalar (``len(dataset)``, ``np.int64``, ``np.float32``), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_count(value, minimum: int = 1) -> bool:
    """An integer ≥ ``minimum``: a Python or NumPy int (``np.int64`` from an array's ``size`` or
    ``len``-like arithmetic was refused with "must be a positive int, got 2"), not a bool (``True``
    passed as 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
