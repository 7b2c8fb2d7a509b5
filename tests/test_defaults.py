"""Slow: BayesAdam with only ``n_data`` set against Adam (lr 1e-3) at the same epochs.

The issue's goal: accuracy within 1 point of Adam and better NLL and ECE, on several tasks. Three
seeds per task, means compared (effortless.experiments.defaults_study, as benchmarks/defaults.py).
Run with ``pytest -m slow``. Where the goal is not met today the test is an xfail carrying the
measured means (not strict: these are quality measurements, and a near-tie can flip).
"""

import pytest
import torch

from effortless.experiments.defaults_study import run_task, summary

pytestmark = pytest.mark.slow

# measured 2026-11-28 with averaging=0.05 and noise_reuse=4 (python benchmarks/defaults.py,
# docs/results/noise-reuse.md); the tabular sets on a new 90/10 split per seed (docs/results/defaults.md;
# digits meets the goal on these 3 splits, not on 10: ECE 2.09 vs 2.06 %)
NOT_MET = {
    "fmnist-cnn": "ECE 1.15 % vs Adam 0.86 % (acc 86.45 vs 85.75, NLL 0.376 vs 0.395)",
    "mnist1d-cnn": "ECE 4.96 % vs Adam 3.50 % (acc 81.93 vs 80.13, NLL 0.519 vs 0.530)",
    "breast_cancer": "ECE 2.67 vs 1.87 % (acc 98.25 for both, NLL 0.110 vs 0.175)",
    "wine": "NLL 0.011 vs 0.002, ECE 1.11 vs 0.24 % (both 100 % accurate on these 3 splits)",
}
TASKS = ["fmnist-mlp", "mnist1d-mlp", "digits", *NOT_MET]


@pytest.mark.parametrize(
    "task",
    [t if t not in NOT_MET else pytest.param(t, marks=pytest.mark.xfail(reason=NOT_MET[t])) for t in TASKS],
)
def test_defaults_match_adam_accuracy_and_beat_its_nll_and_ece(task):
    torch.set_num_threads(1)
    s = summary(run_task(task, seeds=3), task)
    assert s["goal_met"], s
