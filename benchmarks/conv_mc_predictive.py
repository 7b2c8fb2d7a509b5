"""The MC predictive of a diagonal posterior over convolutional networks on CPU: the draws batched
with ``torch.func.vmap`` against one draw at a time (each loaded into the model), on the same draws.

Under vmap a convolution whose weights differ per draw runs as one grouped convolution; this
measures whether that pays on CPU. ``ef.predict`` runs posteriors that sample a convolution one
draw at a time on CPU above ``MC_CONV_VMAP_NUMBERS`` input numbers (``api._samples_conv``) and
keeps the batched path for a frozen convolutional backbone under a sampled head (there the
backbone runs once for all draws).

Cases (one CPU thread, 20 draws as the active-learning scores use): LeNet (Fashion-MNIST's CNN,
62k weights) and the MNIST-1D CNN (9.6k weights), each with every weight sampled and with the
convolutions frozen (only the fully connected head sampled), at several input batch sizes. Each
repetition times both paths once, in turn; the table reports medians and the median of the paired
ratios.

    python benchmarks/conv_mc_predictive.py --reps 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

import effortless as ef
from effortless import api
from effortless.models import CNN1d, LeNet


def paths(model, post, x, n, seed):
    """(seconds batched, seconds one at a time, largest output difference) on the same draws."""
    params = post._match(model)
    names = {id(p): k for k, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    draws = [post.sample(gen) for _ in range(n)]
    rows = max(1, api.MC_VMAP_INPUTS // n)
    with torch.no_grad():
        t0 = time.perf_counter()
        pieces = [api._vmapped(model, params, names, draws, x[i : i + rows]) for i in range(0, len(x), rows)]
        a = torch.cat(pieces, 1)
        t1 = time.perf_counter()
        b = api._one_at_a_time(model, post, draws, x)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, float((a - b).abs().max())


def cases():
    torch.manual_seed(0)
    out = {}
    for name, make, shape in (("LeNet", LeNet, (784,)), ("MNIST-1D CNN", CNN1d, (40,))):
        model = make().eval()
        out[f"{name}, every weight"] = (model, ef.DiagGaussian.from_model(model, 1e4), shape)
        frozen = make().eval()
        for m in frozen.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                m.requires_grad_(False)
        out[f"{name}, head only"] = (frozen, ef.DiagGaussian.from_model(frozen, 1e4), shape)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--batches", default="32,128,512,2000", help="comma list of input batch sizes")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{args.samples} draws, {args.threads} thread(s), {args.reps} interleaved repetitions, medians\n")
    print("| case | inputs | vmap ms | one at a time ms | one at a time × faster (median paired ratio) | "
          "ef.predict runs | max |Δ| |")
    print("|---|---|---|---|---|---|---|")
    for name, (model, post, shape) in cases().items():
        conv = api._samples_conv(model, post._match(model))
        for n in batches:
            chosen = "one at a time" if conv and n * math.prod(shape) > api.MC_CONV_VMAP_NUMBERS else "vmap"
            x = torch.rand(n, *shape, generator=torch.Generator().manual_seed(n))
            batched, single, diff = [], [], 0.0
            for r in range(args.reps):
                a, b, d = paths(model, post, x, args.samples, r)
                batched.append(a)
                single.append(b)
                diff = max(diff, d)
            ratio = statistics.median(a / b for a, b in zip(batched, single))
            print(f"| {name} | {n} | {1e3 * statistics.median(batched):.1f} | "
                  f"{1e3 * statistics.median(single):.1f} | {ratio:.2f} | {chosen} | {diff:.1e} |")


if __name__ == "__main__":
    main()
