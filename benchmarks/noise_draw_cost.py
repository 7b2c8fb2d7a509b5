"""What it costs to draw BayesAdam's unit noise again instead of keeping it in a buffer.

Keeping ε (in the μ/θ/ε buffer) is one of the five parameter-sized tensors behind the default's
memory peak. Drawing it again where it is needed would free it; this times the ways to get ε for
the MLP 784-256-256-10 (269,322 numbers), one thread, medians over repetitions, beside one
training step of ``torch.optim.Adam`` on it (batch 128): torch's eager ``normal_`` with a
generator, ``randn_like`` inside a ``torch.compile``d kernel (fused with θ = μ + σ ε), the same
kernel reading ε from a buffer, and the cyclic shift BayesAdam reuses noise with.

    python benchmarks/noise_draw_cost.py --reps 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from effortless.models import MLP


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MLP(784, [256, 256], 10)
    n = sum(p.numel() for p in model.parameters())
    mu, s, eps = torch.randn(n), torch.rand(n), torch.randn(n)
    gen = torch.Generator().manual_seed(0)
    fused_draw = torch.compile(lambda mu, s: mu + s * torch.randn_like(mu))
    fused_read = torch.compile(lambda mu, s, e: mu + s * e)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)

    def adam_step():
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()

    rows = [
        ("one Adam training step (forward, backward, step)", adam_step),
        ("ε by eager normal_ (generator)", lambda: eps.normal_(generator=gen)),
        ("θ = μ + σ ε, ε by randn_like inside the compiled kernel", lambda: fused_draw(mu, s)),
        ("θ = μ + σ ε, ε read from its buffer (compiled)", lambda: fused_read(mu, s, eps)),
        ("ε reused: cyclic shift of the buffer (roll + copy)", lambda: eps.copy_(torch.roll(eps, 12345))),
    ]
    print(f"{n} numbers, {args.threads} thread(s), median of {args.reps} repetitions\n")
    print("| operation | ms |")
    print("|---|---|")
    for name, fn in rows:
        print(f"| {name} | {_median_ms(fn, args.reps):.3f} |")


if __name__ == "__main__":
    main()
