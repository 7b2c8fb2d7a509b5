"""BayesAdam with only ``n_data`` set against Adam (lr 1e-3), same epochs, several tasks and seeds.

Tasks come from :mod:`effortless.experiments.tasks` (the tabular sets with a new 90/10 split
per seed); this drives ``benchmarks/defaults.py`` and
the slow tests in ``tests/test_defaults.py``. Each task trains both methods from the same
initialisation and data order per seed (plain user loop, constant learning rate) and evaluates
with the shared code in :mod:`effortless.experiments.train` (BayesAdam: 32-sample MC predictive).
"""

from __future__ import annotations

import statistics

from .tasks import CLASSIFICATION
from .tasks import TASKS as _ALL
from .train import evaluate, train

TASKS = {k: _ALL[k] for k in CLASSIFICATION}  # the defaults study is about classifiers

METRICS = ("accuracy", "nll", "ece", "brier")


def run_task(task: str, seeds: int = 3, bayesadam_kwargs: dict | None = None, log=None) -> list[dict]:
    """Rows (one per method and seed) with accuracy, nll, ece, brier, train_seconds, step_ms."""
    spec = TASKS[task]
    rows = []
    for seed in range(seeds):
        split = spec.split(seed)  # (a new 90/10 split per seed for the tabular sets)
        for method in ("map", "bayesadam"):
            kwargs = (bayesadam_kwargs or {}) if method == "bayesadam" else {}
            run = train(method, lambda: spec.model(0.0), split, epochs=spec.epochs,
                        batch_size=spec.batch_size, seed=seed, progress=False, **kwargs)  # fmt: skip
            row = evaluate(run, split)
            row.update(task=task, seed=seed, epochs=spec.epochs)
            rows.append(row)
            if log:
                log(row)
    return rows


def summary(rows: list[dict], task: str) -> dict:
    """Mean and std per method and metric, and whether the defaults goal is met on average."""
    out = {}
    for method in ("map", "bayesadam"):
        sel = [r for r in rows if r["task"] == task and r["method"] == method]
        values = {k: [r[k] for r in sel] for k in METRICS}
        out[method] = {
            k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for k, v in values.items()
        }
    m, b = out["map"], out["bayesadam"]
    accuracy_ok = b["accuracy"][0] >= m["accuracy"][0] - 0.01
    out["goal_met"] = accuracy_ok and b["nll"][0] < m["nll"][0] and b["ece"][0] < m["ece"][0]
    return out
