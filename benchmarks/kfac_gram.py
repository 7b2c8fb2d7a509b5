"""KFAC factors with the triangular (blocked) Gram product against one full GEMM, side by side.

Each repetition runs, in turn, a plain forward+backward, the KFAC-MC training pass (factors and the
gradient) with the blocked product, and the same pass with it switched off (``GRAM_BLOCK`` so large
that every factor is one GEMM); the reported numbers are medians of the paired ratios to the
forward+backward just before. Models: the MLP 784-256-256-10 of issue #3 (the 785-column input
factor is the big one) and LeNet-5 on 28×28 inputs (conv patch factors, B·L rows). One thread.

    python benchmarks/kfac_gram.py --reps 60
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from effortless import likelihoods
from effortless.curvature import engine, functional
from effortless.models import MLP, LeNet


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(name, model, x, y, reps):
    plan = engine.plan(model)
    lik = likelihoods.get("classification")
    gen = torch.Generator().manual_seed(0)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def kfac(block):
        def go():
            old = engine.GRAM_BLOCK
            engine.GRAM_BLOCK = block
            try:
                model.zero_grad(set_to_none=True)
                functional.training_pass(model, x, y, lik, plan, "kfac-mc", gen)
            finally:
                engine.GRAM_BLOCK = old
        return go

    variants = {"blocked": kfac(engine.GRAM_BLOCK), "one GEMM": kfac(10**9)}
    for fn in (fwd_bwd, *variants.values()):  # warm-up
        for _ in range(3):
            fn()
    ratios = {k: [] for k in variants}
    for _ in range(reps):
        for k, fn in variants.items():
            base = _time(fwd_bwd)
            ratios[k].append(_time(fn) / base)
    med = {k: statistics.median(v) for k, v in ratios.items()}
    paired = statistics.median(a / b for a, b in zip(ratios["blocked"], ratios["one GEMM"]))
    print(f"| {name} | {med['one GEMM']:.2f}× | {med['blocked']:.2f}× | {paired:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| model, batch 128 | KFAC-MC + grad, one GEMM (× fwd+bwd) | blocked | "
          "blocked / one GEMM (paired median) |")
    print("|---|---|---|---|")
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    run("MLP 784-256-256-10", MLP(784, [256, 256], 10), x, y, args.reps)
    run("LeNet-5, 28×28", LeNet().eval(), x.view(128, 1, 28, 28), y, args.reps)


if __name__ == "__main__":
    main()
