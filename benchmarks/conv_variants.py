"""Diagonal GGN and empirical Fisher of layers the hooks learned late: hook engine vs torch.func.

Since 2026-11-28 the hook rules cover grouped (depthwise) convolutions, non-zero padding modes
(reflect, replicate, circular), ``padding="same"``/``"valid"``, transposed convolutions and
GroupNorm; before, such models took the torch.func path. Models: ``separable`` (depthwise 3×3 with
reflect padding + pointwise 1×1 blocks), ``decoder`` (a 7×7 code upsampled by transposed
convolutions with GroupNorm, then a classifier) and ``transformer`` (two hand-written pre-norm
attention blocks with RMSNorm on 16 tokens of width 64, then a classifier). This times both
backends on the same model and batch, alternating, medians of ``--reps`` calls each, as multiples
of one plain forward+backward. One thread.

    python benchmarks/conv_variants.py --reps 5 [--model decoder|transformer]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from effortless import curvature


def decoder() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (16, 7, 7)),
                         nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                         nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 28 * 28, 10))  # fmt: skip


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h):
        q, k, v = self.qkv(self.norm1(h)).view(*h.shape[:2], 3, 4, -1).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # 4 heads
        h = h + self.proj(a)
        return h + self.down(F.gelu(self.up(self.norm2(h))))


def transformer() -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (16, 16)), nn.Linear(16, 64), _Block(64), _Block(64),
                         nn.RMSNorm(64), nn.Flatten(), nn.Linear(16 * 64, 10))  # fmt: skip


def separable() -> nn.Module:
    def block(c_in, c_out):  # depthwise 3×3 (reflect padding) + pointwise 1×1
        return [nn.Conv2d(c_in, c_in, 3, padding=1, padding_mode="reflect", groups=c_in), nn.ReLU(),
                nn.Conv2d(c_in, c_out, 1), nn.ReLU(), nn.MaxPool2d(2)]  # fmt: skip

    return nn.Sequential(nn.Conv2d(1, 16, 3, padding="same"), nn.ReLU(), *block(16, 32), *block(32, 64),
                         nn.Flatten(), nn.Linear(64 * 7 * 7, 10))  # fmt: skip


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", choices=["separable", "decoder", "transformer"], default="separable")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = {"separable": separable, "decoder": decoder, "transformer": transformer}[args.model]()
    shape = {"separable": (1, 28, 28), "decoder": (16 * 7 * 7,), "transformer": (256,)}[args.model]
    x, y = torch.randn(args.batch, *shape), torch.randint(0, 10, (args.batch,))

    def fwd_bwd():
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()

    calls = {f"{q} ({b})": (lambda q=q, b=b: getattr(curvature, q)(m, x, y, backend=b))
             for q in ("diag_ggn", "diag_efisher") for b in ("hooks", "func")}  # fmt: skip
    for fn in (fwd_bwd, *calls.values()):
        fn()  # warm-up
    base = statistics.median(_time(fwd_bwd) for _ in range(20))
    times = {k: [] for k in calls}
    for _ in range(args.reps):
        for k, fn in calls.items():
            times[k].append(_time(fn))
    n = sum(p.numel() for p in m.parameters())
    print(f"{args.model} ({n:,} weights), batch {args.batch}, 1 thread; "
          f"fwd+bwd {1000 * base:.1f} ms")
    print("| quantity (backend) | ms | × fwd+bwd |\n|---|---|---|")
    for k, v in times.items():
        t = statistics.median(v)
        print(f"| {k} | {1000 * t:.1f} | {t / base:.1f}× |")


if __name__ == "__main__":
    main()
