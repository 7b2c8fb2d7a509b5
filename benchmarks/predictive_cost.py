"""Cost of the predictives against one forward pass (issue #4 goal: GLM predictive for a batch of
128 at most 10× a forward pass, and no more than O(B·C·width) extra memory).

Protocol: MLP 784-512-256-10 (the Fashion-MNIST bench network), batch 128, one CPU thread. Every
repetition times each predictive once in turn (interleaved, same process); the table reports the
median over repetitions of the paired ratio t(predictive) / t(forward). Extra memory is counted at
the dispatcher (:class:`effortless.experiments.memory.PeakMemory`): all tensor bytes allocated
during the call beyond the parameters, the posterior and the inputs, in units of B·C·W floats
(W = 784, the widest layer input).

    python benchmarks/predictive_cost.py --reps 200 --out runs/predictive_cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import effortless as ef
from effortless.experiments.memory import PeakMemory
from effortless.models import MLP


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default="runs/predictive_cost")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MLP(784, [512, 256], 10).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 784, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)
    prec = {n: 1e3 * (1 + torch.rand(p.shape, generator=g)) for n, p in model.named_parameters()}
    diag = ef.DiagGaussian.from_model(model, prec)
    kron = ef.laplace(model, [(torch.rand(512, 784, generator=g), y)], hessian="kfac", subset="last_layer")
    gen = torch.Generator().manual_seed(1)

    def forward():
        with torch.no_grad():
            return model(x).softmax(-1)

    cases = {
        "forward (baseline)": forward,
        "diag GLM, probit": lambda: ef.predict(model, diag, x, method="probit"),
        "diag GLM, 32 output samples": lambda: ef.predict(model, diag, x, method="glm", n_samples=32,
                                                          generator=gen),  # fmt: skip
        "last-layer KFAC, probit": lambda: ef.predict(model, kron, x, method="probit"),
        "diag MC, 32 weight samples": lambda: ef.predict(model, diag, x, method="mc", n_samples=32,
                                                         generator=gen),  # fmt: skip
    }
    for _ in range(args.warmup):
        for fn in cases.values():
            fn()
    times = {k: [] for k in cases}
    for _ in range(args.reps):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = times["forward (baseline)"]
    unit = args.batch * 10 * 784 * 4  # B·C·W float32 bytes
    baseline = [*model.parameters(), *diag.mean.values(), *diag.precision.values(), x]
    rows = []
    for k, fn in cases.items():
        with PeakMemory(baseline) as mem:
            fn()
        start = sum(t.untyped_storage().nbytes() for t in {id(t): t for t in baseline}.values())
        rows.append(dict(
            predictive=k,
            ms=1000 * statistics.median(times[k]),
            ratio_to_forward=statistics.median(t / b for t, b in zip(times[k], base)),
            extra_memory_bcw=(mem.peak_bytes - start) / unit,
        ))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"reps": args.reps, "threads": args.threads,
                                                  "batch": args.batch, "rows": rows}, indent=2))  # fmt: skip
    lines = [
        f"MLP 784-512-256-10, batch {args.batch}, {args.threads} thread(s), {args.reps} interleaved reps, "
        "medians of paired ratios.",
        "",
        "| predictive | ms | × forward | extra memory (× B·C·W floats, W = 784) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['predictive']} | {r['ms']:.2f} | {r['ratio_to_forward']:.2f} | "
                     f"{r['extra_memory_bcw']:.2f} |")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
