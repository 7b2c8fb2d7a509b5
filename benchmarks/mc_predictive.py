"""The MC predictive (``ef.predict(method="mc")``, the default) where only part of the network is
Bayesian, against the reference that loads each weight draw into the model and runs it whole.

Cases (10,000 test inputs by default, 32 draws, one CPU thread):

* ``last-layer KFAC``: ``ef.laplace(..., hessian="kfac", subset="last_layer")`` on MLP
  784-512-256-10 (only the last layer varies: one forward pass, a matmul per draw);
* ``last-layer diagonal``: the same network, ``hessian="ggn", subset="last_layer"``;
* ``head on a frozen backbone``: a diagonal posterior over a two-layer head (1024-64-10) on a
  frozen 784-1024-1024 backbone (the samples run together on pieces of the inputs under vmap,
  where the backbone's layers run once per input);
* ``full posterior``: a diagonal posterior over all weights of MLP 784-96-64-10 (82k weights): the
  control, where every layer varies and nothing can be shared.

Each repetition times the library's predictive and the reference once each, in turn (same process,
same draws); the table reports medians and the median of the paired ratios, and the largest
difference of the probabilities from the reference's.

    python benchmarks/mc_predictive.py --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import effortless as ef
from effortless.models import MLP


def reference(model, post, x, n, seed):
    """Load each draw into the model and run it whole (what the MC predictive did for these)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outs = []
        for _ in range(n):
            with post.sampled(model, gen):
                outs.append(model(x))
    return torch.stack(outs).softmax(-1).mean(0)


def cases(n_fit: int):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_fit, 784, generator=g)
    y = torch.randint(0, 10, (n_fit,), generator=g)
    data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, n_fit, 256)]
    torch.manual_seed(0)
    mlp = MLP(784, [512, 256], 10).eval()
    out = {
        "last-layer KFAC": (mlp, ef.laplace(mlp, data, hessian="kfac", subset="last_layer")),
        "last-layer diagonal": (mlp, ef.laplace(mlp, data, hessian="ggn", subset="last_layer")),
    }
    back = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU())
    back.requires_grad_(False)
    headed = nn.Sequential(back, nn.Sequential(nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 10))).eval()
    out["head on a frozen backbone"] = (headed, ef.laplace(headed, data, hessian="ggn"))
    full = MLP(784, [96, 64], 10).eval()
    out["full posterior"] = (full, ef.laplace(full, data, hessian="ggn"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--inputs", type=int, default=10_000)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.rand(args.inputs, 784, generator=torch.Generator().manual_seed(1))
    print(f"{args.inputs} inputs, {args.samples} draws, {args.threads} thread(s), {args.reps} interleaved "
          "repetitions, medians\n")
    print("| case | ef.predict s | reference s | × faster (median paired ratio) | max |Δp| |")
    print("|---|---|---|---|---|")
    for name, (model, post) in cases(1024).items():
        ours, ref, diff = [], [], 0.0
        for r in range(args.reps):
            t0 = time.perf_counter()
            p = ef.predict(model, post, x, n_samples=args.samples, generator=torch.Generator().manual_seed(r))
            t1 = time.perf_counter()
            q = reference(model, post, x, args.samples, r)
            t2 = time.perf_counter()
            ours.append(t1 - t0)
            ref.append(t2 - t1)
            diff = max(diff, float((p - q).abs().max()))
        ratio = statistics.median(b / a for a, b in zip(ours, ref))
        print(f"| {name} | {statistics.median(ours):.2f} | {statistics.median(ref):.2f} | {ratio:.1f} | "
              f"{diff:.1e} |")


if __name__ == "__main__":
    main()
