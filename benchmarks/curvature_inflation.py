"""How far BayesAdam's running curvature h is from the exact diagonal GGN after training.

Trains fmnist-mlp (784-512-256-10) with BayesAdam for a number of epochs (the plain loop of the
benchmarks) and compares each parameter's h with the exact per-sample diagonal GGN at the mean,
averaged over 2,048 training images: the median ratio h / GGN per tensor, and the test metrics.

    python benchmarks/curvature_inflation.py --epochs 1
    python benchmarks/curvature_inflation.py --epochs 1 --bayesadam '{"temperature": 0.1}'
"""

from __future__ import annotations

import argparse
import json

import torch

from effortless import curvature
from effortless.experiments.tasks import TASKS
from effortless.experiments.train import evaluate, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe", type=int, default=2048, help="training images for the exact GGN")
    ap.add_argument("--bayesadam", default="{}", help="JSON dict of BayesAdam keyword arguments")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kwargs = json.loads(args.bayesadam)
    spec = TASKS["fmnist-mlp"]
    split = spec.load()
    run = train("bayesadam", lambda: spec.model(0.0), split, epochs=args.epochs, batch_size=spec.batch_size,
                seed=args.seed, progress=False, **kwargs)  # fmt: skip
    model, opt = run.model, run.optimizer
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(0, args.probe, 256):
        est = curvature.diag_ggn(model, split.x_train[i : i + 256], split.y_train[i : i + 256])
        for n in ref:
            ref[n] += est[n] / args.probe
    ratio = {n: float((opt.state[p]["hess"] / ref[n].clamp_min(1e-12)).median())
             for n, p in model.named_parameters()}  # fmt: skip
    row = evaluate(run, split)
    print(json.dumps({"bayesadam": kwargs, "epochs": args.epochs, "median h / exact GGN": ratio,
                      **{k: row[k] for k in ("accuracy", "nll", "ece")}}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
