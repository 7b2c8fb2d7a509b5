"""Per-step cost as a ratio against a baseline run side by side: the one timing this project
reports for speed claims (``benchmarks/step_cost.py``, the demo).

Every repetition runs a block of ``block`` training iterations of each method in turn, in one
process, so that machine noise (other jobs, frequency changes) hits all of them alike; the cost of
a method is the median over repetitions of its block's time over the baseline's block time in the
same repetition. Blocks rather than single iterations because BayesAdam's antithetic pairs
alternate an iteration that draws the weight noise with one that reuses it: single-iteration
times are bimodal, and the median of their ratios falls between the two kinds.

Example:
    >>> import torch
    >>> a, b = torch.zeros(1000), torch.zeros(1000)
    >>> times = interleaved({"add": lambda: a.add_(1), "mul": lambda: b.mul_(2)}, reps=5, block=2)
    >>> sorted(times), len(times["add"])
    (['add', 'mul'], 5)
    >>> paired_ratio(times["add"], times["add"])
    1.0
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(iterations: dict[str, Callable[[], object]], reps: int, warmup: int = 0,
                block: int = 10) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per iteration of every callable, interleaved: ``warmup`` rounds of one iteration
    each (not timed), then ``reps`` rounds of ``block`` iterations of each in turn; each entry of
    a returned list is one block's mean. Synchronise inside the callables for asynchronous
    devices."""
    for name, value in (("reps", reps), ("block", block)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (isinstance(warmup, int) and warmup >= 0):
        raise ValueError(f"warmup must be an int ≥ 0, got {warmup!r}")
    if not iterations:
        raise ValueError("iterations is empty: give at least one callable")
    for _ in range(warmup):
        for it in iterations.values():
            it()
    times: dict[str, list[float]] = {name: [] for name in iterations}
    for _ in range(reps):
        for name, it in iterations.items():
            t0 = time.perf_counter()
            for _ in range(block):
                it()
            times[name].append((time.perf_counter() - t0) / block)
    return times


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over repetitions of ``times[i] / baseline[i]`` (two lists from one
    :func:`interleaved` call)."""
    if len(times) != len(baseline) or not times:
        raise ValueError(f"need two equally long non-empty lists, got {len(times)} and {len(baseline)} times")
    return statistics.median(t / b for t, b in zip(times, baseline))
