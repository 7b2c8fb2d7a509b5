"""Peak memory and time of ``diag_ggn`` and of the linearised predictive on many inputs of a CNN:
passes sized by the model's footprint (the default since 2026-11-28) against fixed passes of up to
4,096 samples (``diag_ggn``) and 1,024 samples (the predictive), as before.

The hook engine's output gradients hold K numbers (K = C = 10 here) per sample and per element of
every saved layer input and output; for a 28×28 CNN that is ~480,000 numbers per sample. Peak
memory is counted at the dispatcher (all tensor bytes alive during the call, parameters and data
included). One thread.

    python benchmarks/hook_passes.py --n 1024
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import effortless as ef
from effortless import curvature
from effortless.curvature import functional
from effortless.experiments.memory import PeakMemory
from effortless.posterior import predictive


def _compare(title, fn, baseline, fixed_first):
    """Run ``fn`` with fixed passes (the first pass as large as before, no budget) and with the
    footprint-sized ones; print peak memory and time; return the two results."""
    print(f"\n{title}\n\n| passes | peak MiB | seconds |\n|---|---|---|")
    out = []
    settings = (("fixed passes (before)", fixed_first, 2**62),
                ("sized by footprint", functional.HOOK_FIRST, functional.HOOK_BUDGET))
    for name, first, budget in settings:
        old = functional.HOOK_FIRST, functional.HOOK_BUDGET
        functional.HOOK_FIRST, functional.HOOK_BUDGET = first, budget
        try:
            with PeakMemory(baseline=baseline) as mem:
                t0 = time.perf_counter()
                out.append(fn())
                seconds = time.perf_counter() - t0
        finally:
            functional.HOOK_FIRST, functional.HOOK_BUDGET = old
        print(f"| {name} | {mem.peak_bytes / 2**20:.0f} | {seconds:.1f} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="inputs in the call")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(64 * 7 * 7, 10))  # fmt: skip
    x, y = torch.randn(args.n, 1, 28, 28), torch.randint(0, 10, (args.n,))
    a, b = _compare(f"CNN, exact diagonal GGN (hooks) on {args.n} inputs, 1 thread",
                    lambda: curvature.diag_ggn(model, x, y, backend="hooks"),
                    [*model.parameters(), x, y], functional.HOOK_CHUNK)  # fmt: skip
    diff = max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)
    print(f"\nlargest difference of the results, relative to each tensor's largest entry: {diff:.1e}")
    post = ef.DiagGaussian.from_model(model, 100.0)
    a, b = _compare(f"the same CNN, linearised predictive covariance on {args.n} inputs",
                    lambda: predictive.linearised_moments(model, post, x)[1],
                    [*model.parameters(), x, *post.mean.values(), *post.precision.values()],
                    predictive.MOMENT_CHUNK)  # fmt: skip
    diff = float((a - b).abs().max() / a.abs().max())
    print(f"\nlargest difference of the covariances (relative): {diff:.1e}")


if __name__ == "__main__":
    main()
