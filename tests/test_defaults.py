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

NOT_MET = {  # measured 2026-11-28 (python benchmarks/defaults.py, docs/results/defaults.md)
    "fmnist-mlp": "NLL 0.3411 vs Adam 0.3409, a tie that flipped (acc 87.82 vs 87.85, ECE 1.33 vs 1.53 %)",
    "fmnist-cnn": "ECE 0.78 % vs Adam 0.65 % (acc 85.70 vs 85.77, NLL 0.393 vs 0.394)",
    "mnist1d-cnn": "ECE 4.18 % vs Adam 4.11 % (acc 81.20 vs 80.53, NLL 0.516 vs 0.526)",
    "digits": "ECE 2.25 % vs Adam 1.85 % (NLL 0.0545 vs 0.0554)",
    "breast_cancer": "acc 97.08 vs 98.83 %, NLL 0.053 vs 0.020, ECE 3.20 vs 1.48 %",
    "wine": "NLL 0.003 vs 0.000 (both 100 % accurate), ECE 0.34 vs 0.05 %",
}
TASKS = ["mnist1d-mlp", *NOT_MET]


@pytest.mark.parametrize(
    "task",
    [t if t not in NOT_MET else pytest.param(t, marks=pytest.mark.xfail(reason=NOT_MET[t])) for t in TASKS],
)
def test_defaults_match_adam_accuracy_and_beat_its_nll_and_ece(task):
    torch.set_num_threads(1)
    s = summary(run_task(task, seeds=3), task)
    assert s["goal_met"], s
