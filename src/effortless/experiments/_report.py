"""Formatting shared by the experiments' reports."""

from __future__ import annotations

import statistics


def mean_sd(values, spec: str) -> str:
    """``mean ± std`` over repetitions in the format ``spec`` (``".3f"``); the mean alone for one
    (a "± 0.00" would read as a measured spread), "–" for none.

    Example:
        >>> mean_sd([1.0, 2.0, 3.0], ".1f"), mean_sd([0.5], ".2f"), mean_sd([], ".2f")
        ('2.0 ± 1.0', '0.50', '–')
    """
    values = list(values)
    if not values:
        return "–"
    mean = format(statistics.fmean(values), spec)
    return f"{mean} ± {format(statistics.stdev(values), spec)}" if len(values) > 1 else mean
