"""Which way BayesAdam's defaults miss calibration: signed confidence − accuracy, and where it comes from.

ECE says how far predictions are from calibrated, not in which direction. For each task of the
defaults study (same networks, epochs, data order and evaluation as ``benchmarks/defaults.py``)
this trains Adam and BayesAdam with each given setting and reports accuracy, NLL, ECE and the mean
top-class confidence minus accuracy (positive: overconfident). With ``--decompose`` it also
evaluates every BayesAdam run four ways, to separate the averaging from the posterior's spread:
the MC predictive around the averaged mean (the default), the plug-in prediction at that mean,
and both again at the last iterate.

    python benchmarks/calibration_direction.py --tasks fmnist-cnn \
        --settings '{"default": {}, "last": {"averaging": null}}'
    python benchmarks/calibration_direction.py --tasks fmnist-cnn,mnist1d-cnn --seeds 1 --decompose
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from effortless import metrics
from effortless.experiments.defaults_study import TASKS
from effortless.experiments.train import RunResult, predict_probs, train
from effortless.posterior import DiagGaussian

KEYS = ("accuracy", "nll", "ece", "overconfidence")


def _report(probs, y) -> dict:
    row = metrics.classification_report(probs, y, None)
    row["overconfidence"] = probs.max(1).values.mean().item() - row["accuracy"]
    return {k: row[k] for k in KEYS}


def _decomposed(run: RunResult, split) -> dict[str, dict]:
    """The run's MC and plug-in predictions at its averaged mean and at its last iterate."""
    averaged = run.optimizer.posterior()
    params = dict(run.model.named_parameters())
    last = {k: params[k].detach().clone() for k in averaged.mean}  # training leaves μ_T in the model
    out = {}
    for where, mean in (("averaged mean", averaged.mean), ("last iterate", last)):
        with torch.no_grad():
            for k, v in mean.items():
                params[k].copy_(v)
        for how, post in (("MC", DiagGaussian(mean, averaged.precision)), ("plug-in", None)):
            probs = predict_probs(RunResult("bayesadam", run.model, post, 0.0, 0.0), split.x_test, 32)
            out[f"{how}, {where}"] = _report(probs, split.y_test)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="fmnist-mlp,fmnist-cnn,mnist1d-mlp,mnist1d-cnn",
                    help=f"comma list from {list(TASKS)}")  # fmt: skip
    ap.add_argument("--settings", default='{"default": {}}',
                    help="JSON: name -> BayesAdam keyword arguments (default: the defaults)")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decompose", action="store_true",
                    help="also evaluate each BayesAdam run as MC / plug-in prediction at its averaged mean "
                    "and at its last iterate")  # fmt: skip
    ap.add_argument("--out", default="runs/calibration_direction")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = json.loads(args.settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in args.tasks.split(","):
        spec = TASKS[task]
        for name, kwargs in [("adam", None), *settings.items()]:
            for seed in range(args.seeds):
                split = spec.split(seed)
                method = "map" if kwargs is None else "bayesadam"
                run = train(method, lambda spec=spec: spec.model(0.0), split, epochs=spec.epochs,
                            batch_size=spec.batch_size, seed=seed, progress=False,
                            **(kwargs or {}))  # fmt: skip
                evals = {"": _report(predict_probs(run, split.x_test, 32), split.y_test)}
                if args.decompose and kwargs is not None and run.optimizer.defaults["averaging"] is not None:
                    evals.update(_decomposed(run, split))
                for how, r in evals.items():
                    rows.append(dict(task=task, setting=name, evaluation=how, seed=seed, **r))
                    print(json.dumps(rows[-1]), flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [
        f"Mean over {args.seeds} seed(s); overconfidence = mean top-class probability − accuracy "
        "(points; negative: underconfident).",
        "",
        "| task | setting | evaluation | acc % | NLL | ECE % | confidence − accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, name, how in dict.fromkeys((r["task"], r["setting"], r["evaluation"]) for r in rows):
        sel = [r for r in rows if (r["task"], r["setting"], r["evaluation"]) == (task, name, how)]
        m = {k: statistics.fmean(r[k] for r in sel) for k in KEYS}
        lines.append(
            f"| {task} | {name} | {how or 'as the study evaluates'} | {100 * m['accuracy']:.2f} | "
            f"{m['nll']:.4f} | {100 * m['ece']:.2f} | {100 * m['overconfidence']:+.2f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
