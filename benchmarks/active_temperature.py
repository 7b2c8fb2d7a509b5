"""Which temperature for the active-learning BayesAdam learner? Test accuracy of one round's
training on random labelled sets of a few sizes, against the MC-dropout learner, without the test
set: the labelled sets are drawn from MNIST's training images except the last 5,000, on which the
accuracy is measured. Same training schedule as ``effortless active`` (30 passes, at least 200
steps, minibatches of 64, LeNet), δ = 0.01, one run per seed and size.

    python benchmarks/active_temperature.py --temperatures 1e-4,1e-3 --seeds 4,5,6
"""

from __future__ import annotations

import argparse
import statistics

import torch

from effortless import data
from effortless.active import TrainConfig, make_learner
from effortless.models import LeNet

HOLDOUT = 5000


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temperatures", default="1e-4,1e-3")
    ap.add_argument("--sizes", default="60,200,500")
    ap.add_argument("--seeds", default="4,5,6")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = data.mnist()
    x_val, y_val = split.x_train[-HOLDOUT:], split.y_train[-HOLDOUT:]
    temps = [float(t) for t in args.temperatures.split(",")]
    sizes = [int(n) for n in args.sizes.split(",")]
    learners = [("mc-dropout", None)] + [("bayesadam", t) for t in temps]
    acc: dict[tuple, list[float]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for n in sizes:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(len(split.x_train) - HOLDOUT, generator=g)[:n]
            x, y = split.x_train[idx], split.y_train[idx]
            for name, t in learners:
                cfg = TrainConfig(epochs=30, min_steps=200, **({} if t is None else {"temperature": t}))
                trained = make_learner(name, lambda p: LeNet(dropout=p), cfg)(x, y, seed)
                a = 100 * float((trained.probs(x_val).argmax(-1) == y_val).float().mean())
                acc.setdefault((name, t), {}).setdefault(n, []).append(a)
                which = name if t is None else f"{name} T={t:g}"
                print(f"seed {seed}, {n} labels, {which}: {a:.2f} %", flush=True)
    print(f"\nheld-out accuracy % (the last {HOLDOUT} MNIST training images), mean over seeds [each seed]\n")
    print("| learner | " + " | ".join(f"{n} labels" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for (name, t), by_n in acc.items():
        label = name if t is None else f"{name}, T = {t:g}"
        cells = [f"{statistics.mean(v):.2f} [{', '.join(f'{a:.1f}' for a in v)}]" for v in by_n.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
