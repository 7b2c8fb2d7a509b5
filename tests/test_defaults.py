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
# docs/results/noise-reuse.md)
NOT_MET = {
    "fmnist-cnn": "ECE 1.15 % vs Adam 0.86 % (acc 86.45 vs 85.75, NLL 0.376 vs 0.395)",
    "mnist1d-cnn": "ECE 4.96 % vs Adam 3.50 % (acc 81.93 vs 80.13, NLL 0.519 vs 0.530)",
    "digits": "NLL 0.059 vs 0.055, ECE 2.51 % vs Adam 1.88 % (acc 98.15 vs 97.96)",
    "breast_cancer": "acc 98.25 vs 98.83 %, NLL 0.045 vs 0.020, ECE 3.23 vs 1.48 %",
    "wine": "NLL 0.004 vs 0.0005 (both 100 % accurate), ECE 0.37 vs 0.05 %",
}
TASKS = ["fmnist-mlp", "mnist1d-mlp", *NOT_MET]


@pytest.mark.parametrize(
    "task",
    [t if t not in NOT_MET else pytest.param(t, marks=pytest.mark.xfail(reason=NOT_MET[t])) for t in TASKS],
)
def test_defaults_match_adam_accuracy_and_beat_its_nll_and_ece(task):
    torch.set_num_threads(1)
    s = summary(run_task(task, seeds=3), task)
    assert s["goal_met"], s
