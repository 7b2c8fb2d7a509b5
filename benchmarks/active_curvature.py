"""How good is the active-learning BayesAdam learner's curvature? One round's training on a random
labelled set (LeNet, MNIST, the learner's T and δ, or --temperature), once per Hessian key; the
learned h against the exact diagonal GGN of the labelled data / N: Spearman rank correlation over
all weights and the median ratio h / (GGN / N), and the test accuracy of the mean network.

    python benchmarks/active_curvature.py --labels 200 --keys reparam,ggn-mc --temperature 1e-4

(``docs/results/active-curvature.md`` was measured with T = 1e-4, the learner's value then.)
"""

from __future__ import annotations

import argparse

import torch

from effortless import curvature, data
from effortless.active import TrainConfig, make_learner
from effortless.models import LeNet


def _ranks(v):
    return v.argsort().argsort().double()


def spearman(a, b):
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=200)
    ap.add_argument("--keys", default="reparam,ggn-mc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=TrainConfig.temperature)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = data.mnist()
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(split.x_train), generator=g)[: args.labels]
    x, y = split.x_train[idx], split.y_train[idx]
    xt, yt = split.x_test[:3000], split.y_test[:3000]
    print(f"LeNet, {args.labels} random MNIST labels, one round of the active-learning learner "
          f"(T = {args.temperature:g}, δ = {TrainConfig.prior_precision:g})\n")
    print("| hessian | test acc % (3,000 images) | Spearman(h, GGN/N) | median h / (GGN/N) |")
    print("|---|---|---|---|")
    for key in args.keys.split(","):
        cfg = TrainConfig(hessian=key, temperature=args.temperature)
        learner = make_learner("bayesadam", lambda p: LeNet(dropout=p), cfg)
        trained = learner(x, y, args.seed)
        model, opt = trained.models[0], trained.optimizer
        ref = curvature.diag_ggn(model, x, y)
        h = torch.cat([opt.state[p]["hess"].flatten() for _, p in model.named_parameters()])
        r = torch.cat([ref[n].flatten() / len(x) for n, _ in model.named_parameters()])
        acc = float((trained.probs(xt).argmax(-1) == yt).float().mean())
        ratio = float((h.clamp_min(1e-12) / r.clamp_min(1e-12)).median())
        print(f"| {key} | {100 * acc:.2f} | {spearman(h, r):.3f} | {ratio:.3g} |", flush=True)


if __name__ == "__main__":
    main()
