"""BayesAdam's per-step cost against Adam's, timed two ways in one process.

* sequential: ``--steps`` steps of Adam, then as many of BayesAdam (what a training run and the
  demo's "step ms" columns see: each optimizer alone, one after the other);
* interleaved: ``--reps`` blocks of 10 steps of each in turn, the median of the paired ratios
  (issue #2's protocol, ``benchmarks/step_cost.py``, the demo's "step × Adam" column).

Both on one MLP and batch (``--fresh``: a new batch every step, from 15,000 random rows), the
networks starting from the same initialisation; ``--rounds`` times over. Shows how far the two
statistics differ on a machine, and whether interleaving slows Adam's own step (its caches
evicted by the other optimizer's block).

    python benchmarks/sequential_vs_interleaved.py --threads 2 --hidden 512,256
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import effortless as ef
from effortless.experiments.timing import interleaved, paired_ratio
from effortless.models import MLP


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", default="256,256", help="hidden widths of the 784-…-10 MLP")
    ap.add_argument("--steps", type=int, default=300, help="sequential steps of each optimizer")
    ap.add_argument("--reps", type=int, default=30, help="interleaved blocks of 10 steps")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="a new batch every step")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x_all, y_all = torch.rand(15000, 784, generator=g), torch.randint(0, 10, (15000,), generator=g)
    torch.manual_seed(0)
    adam_model = MLP(784, [int(h) for h in args.hidden.split(",")], 10)
    bayes_model = copy.deepcopy(adam_model)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    bayes = ef.BayesAdam(bayes_model.parameters(), n_data=60000)
    where = {"adam": 0, "bayes": 0}

    def batch(who):
        if not args.fresh:
            return x_all[:128], y_all[:128]
        i = where[who]
        where[who] = (i + 128) % (len(x_all) - 128)
        return x_all[i : i + 128], y_all[i : i + 128]

    def adam_step():
        x, y = batch("adam")
        adam.zero_grad()
        F.cross_entropy(adam_model(x), y).backward()
        adam.step()

    def bayes_step():
        x, y = batch("bayes")
        bayes.zero_grad()
        with bayes.sampled_params(train=True):
            F.cross_entropy(bayes_model(x), y).backward()
        bayes.step()

    def alone(step):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        return (time.perf_counter() - t0) / args.steps

    for _ in range(10):  # (BayesAdam compiles in its first step)
        adam_step()
        bayes_step()
    print("| round | Adam alone ms | BayesAdam alone ms | sequential × | Adam interleaved ms | "
          "BayesAdam interleaved ms | interleaved × (median paired) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in range(args.rounds):
        a, b = alone(adam_step), alone(bayes_step)
        t = interleaved({"adam": adam_step, "bayes": bayes_step}, reps=args.reps, block=10)
        ta, tb = 1e3 * statistics.median(t["adam"]), 1e3 * statistics.median(t["bayes"])
        ratio = paired_ratio(t["bayes"], t["adam"])
        print(f"| {r} | {1e3 * a:.2f} | {1e3 * b:.2f} | {b / a:.2f} | {ta:.2f} | {tb:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
