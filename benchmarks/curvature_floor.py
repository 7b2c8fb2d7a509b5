"""How fast could a diagonal curvature estimate be at all? Lower bounds for issue #3's goals.

Each estimator of issue #3 needs, beyond the training forward and backward, some matrix products
that no implementation can skip (for a Linear layer l with input a_l, B × in, and output
gradient δ_l, B × out):

* empirical Fisher: Σ_n g_n² = (δ_l²)ᵀ (a_l²) per layer — one more product the size of ∇W;
* MC GGN (1 sample): a second backward of sampled-label gradients δ'_l through every layer but
  the first, then (δ'_l²)ᵀ (a_l²) per layer;
* exact GGN: C output cotangents back-propagated through every layer but the first
  ((B·C) × out × in each), then (Σ_c δ_lc²)ᵀ (a_l²) per layer;
* KFAC (MC, 1 sample): the sampled-label backward, then A_l = a_lᵀ a_l and G_l = δ'_lᵀ δ'_l.

This script counts those multiply-adds and also times exactly those products (plus the
elementwise squares), nothing else, interleaved with a real autograd forward+backward of the same
MLP, on one thread: the ratio 1 + t(extra products) / t(fwd+bwd) is a floor for any estimator
computed this way. Median of paired ratios over repetitions.

    python benchmarks/curvature_floor.py --reps 300 --out runs/curvature_floor
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effortless.models import MLP

GOALS = {"efisher+grad": 1.3, "ggn-mc+grad": 1.5, "ggn+grad": 2.0, "kfac-mc+grad": 2.0}


def macs(widths, batch, classes):
    """Multiply-adds of forward+backward and of each estimator's extra products."""
    layers = list(zip(widths[:-1], widths[1:]))
    fwd = sum(batch * i * o for i, o in layers)
    dw = fwd  # ∇W_l = δ_lᵀ a_l, same size as the forward product
    dx = sum(batch * i * o for i, o in layers[1:])  # no input gradient for the first layer
    sq = dw  # (δ²)ᵀ (a²) per layer
    return {
        "fwd+bwd": fwd + dw + dx,
        "efisher+grad": sq,
        "ggn-mc+grad": dx + sq,
        "ggn+grad": classes * dx + sq,
        "kfac-mc+grad": dx + sum(batch * (i * i + o * o) for i, o in layers),
    }


def extra_ops(model, x, classes, gen):
    """Closures doing only the unavoidable extra products of each estimator on the network's
    real activations and weights."""
    lins = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    acts, h = [], x
    with torch.no_grad():
        for k, lin in enumerate(lins):
            acts.append(h)
            h = lin(h)
            if k < len(lins) - 1:
                h = torch.relu(h)
    b = x.shape[0]
    deltas = [torch.randn(b, lin.out_features, generator=gen) for lin in lins]
    cot = [torch.randn(b * classes, lin.out_features, generator=gen) for lin in lins]
    weights = [lin.weight.detach() for lin in lins]

    def squares_product(ds):
        return [(d * d).T @ (a * a) for d, a in zip(ds, acts)]

    def backprop(top, n_rows):
        out = [top]  # δ at the last layer, then through W_l for l = L … 2 (the mask is elementwise)
        for k in range(len(weights) - 1, 0, -1):
            out.append(out[-1] @ weights[k])
        return out[::-1]

    def efisher():
        squares_product(deltas)

    def ggn_mc():
        squares_product(backprop(deltas[-1], b))

    def ggn():
        ds = backprop(cot[-1], b * classes)
        summed = [(d * d).view(classes, b, -1).sum(0) for d in ds]
        [s.T @ (a * a) for s, a in zip(summed, acts)]

    def kfac():
        ds = backprop(deltas[-1], b)
        [(a.T @ a, d.T @ d) for a, d in zip(acts, ds)]

    return {"efisher+grad": efisher, "ggn-mc+grad": ggn_mc, "ggn+grad": ggn, "kfac-mc+grad": kfac}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="256,256")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--out", default="runs/curvature_floor")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    hidden = [int(v) for v in args.hidden.split(",")]
    classes = 10
    widths = [784, *hidden, classes]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = MLP(784, hidden, classes)
    x = torch.rand(args.batch, 784, generator=gen)
    y = torch.randint(0, classes, (args.batch,), generator=gen)
    ops = extra_ops(model, x, classes, gen)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    runners = {"fwd+bwd": fwd_bwd, **ops}
    for _ in range(args.warmup):
        for f in runners.values():
            f()
    times = {k: [] for k in runners}
    for _ in range(args.reps):
        for k, f in runners.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    count = macs(widths, args.batch, classes)
    rows = []
    for k in ops:
        ratio = statistics.median(1 + e / base for e, base in zip(times[k], times["fwd+bwd"]))
        rows.append({"quantity": k, "goal": GOALS[k], "mac_floor": 1 + count[k] / count["fwd+bwd"],
                     "time_floor": ratio})  # fmt: skip
    lines = [
        f"MLP {'-'.join(map(str, widths))}, batch {args.batch}, 1 thread; fwd+bwd "
        f"{1000 * statistics.median(times['fwd+bwd']):.2f} ms, {count['fwd+bwd'] / 1e6:.1f} M multiply-adds; "
        f"median of {args.reps} paired ratios.",
        "",
        "| quantity | goal | floor by multiply-adds | floor by timing only the extra products |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['quantity']} | ≤ {r['goal']}× | {r['mac_floor']:.2f}× | {r['time_floor']:.2f}× |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"widths": widths, "batch": args.batch, "rows": rows}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
