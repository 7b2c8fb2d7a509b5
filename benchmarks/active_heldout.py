"""Settings for the active-learning learners, chosen without the test set: test accuracy of one
round's training on random labelled sets of a few sizes. The labelled sets are drawn from MNIST's
training images except the last 5,000, on which the accuracy is measured. Same training schedule
as ``effortless active`` (30 passes, at least 200 steps, minibatches of 64, LeNet), one run per
seed and size; every learner sees the same labelled set.

Each ``--configs`` entry is ``learner`` or ``learner:field=value,field=value`` with fields of
:class:`effortless.active.TrainConfig` (entries separated by ``;``):

    python benchmarks/active_heldout.py --seeds 4,5,6 \\
        --configs "mc-dropout;bayesadam:temperature=1e-4;bayesadam:temperature=1e-3"
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from effortless import data
from effortless.active import TrainConfig, make_learner
from effortless.models import LeNet

HOLDOUT = 5000


def parse_configs(text: str) -> list[tuple[str, dict]]:
    """``"a;b:x=1,y=2"`` → [("a", {}), ("b", {"x": 1, "y": 2})], values cast to the field's type."""
    types = {f.name: type(f.default) for f in dataclasses.fields(TrainConfig)}
    out = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, _, rest = entry.partition(":")
        kw = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in types:
                raise SystemExit(f"unknown TrainConfig field {key!r}; fields: {sorted(types)}")
            kw[key] = types[key](value)
        out.append((name, kw))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="mc-dropout;bayesadam:temperature=1e-4;bayesadam:temperature=1e-3")
    ap.add_argument("--sizes", default="60,200,500")
    ap.add_argument("--seeds", default="4,5,6")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = data.mnist()
    x_val, y_val = split.x_train[-HOLDOUT:], split.y_train[-HOLDOUT:]
    configs = parse_configs(args.configs)
    sizes = [int(n) for n in args.sizes.split(",")]
    acc: dict[str, dict[int, list[float]]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for n in sizes:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(len(split.x_train) - HOLDOUT, generator=g)[:n]
            x, y = split.x_train[idx], split.y_train[idx]
            for name, kw in configs:
                cfg = TrainConfig(**{"epochs": 30, "min_steps": 200, **kw})
                trained = make_learner(name, lambda p: LeNet(dropout=p), cfg)(x, y, seed)
                a = 100 * float((trained.probs(x_val).argmax(-1) == y_val).float().mean())
                label = name + "".join(f", {k} = {v:g}" if isinstance(v, float) else f", {k} = {v}"
                                       for k, v in kw.items())  # fmt: skip
                acc.setdefault(label, {}).setdefault(n, []).append(a)
                print(f"seed {seed}, {n} labels, {label}: {a:.2f} %", flush=True)
    print(f"\nheld-out accuracy % (the last {HOLDOUT} MNIST training images), mean over seeds [each seed]\n")
    print("| learner | " + " | ".join(f"{n} labels" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for label, by_n in acc.items():
        cells = [f"{statistics.mean(v):.2f} [{', '.join(f'{a:.1f}' for a in v)}]" for v in by_n.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
