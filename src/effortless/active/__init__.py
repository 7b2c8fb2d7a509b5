"""Pool-based active learning: acquisition functions on (N, C, S) log-probs, learners, and a
seeded, resumable loop (``effortless active`` runs the experiment grid)."""

from .acquisition import (
    ACQUISITIONS,
    bald,
    batchbald,
    max_entropy,
    mean_std,
    random,
    select,
    variation_ratios,
)  # fmt: skip
from .learners import LEARNERS, TrainConfig, make_learner
from .loop import ActiveConfig, ActiveState, balanced_initial, run_loop

__all__ = [
    "ACQUISITIONS", "bald", "batchbald", "max_entropy", "mean_std", "random", "select", "variation_ratios",
    "LEARNERS", "TrainConfig", "make_learner", "ActiveConfig", "ActiveState", "balanced_initial", "run_loop",
]  # fmt: skip
