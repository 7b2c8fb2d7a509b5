"""BatchNorm and the MC predictive: running statistics from training against each sample's own.

A small BatchNorm CNN (two conv blocks and a hidden layer, each followed by BatchNorm) is trained on
a Fashion-MNIST subset with ``ef.fit`` (BayesAdam defaults, constant learning rate) and with Adam
(lr 1e-3, same initialisation, epochs and batches). BayesAdam's posterior is then evaluated on the
test set three ways: the MC predictive with the running statistics (what ``ef.predict`` does
without ``bn_data``, and warns about), the MC predictive with each sample's statistics recomputed
from ``--bn-inputs`` training inputs (``bn_data=``), and the network at the posterior mean.

    python benchmarks/batchnorm_predictive.py --seeds 3 --n-train 20000 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import effortless as ef
from effortless import data, metrics


def bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 49, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def _row(probs, y, **extra) -> dict:
    acc = metrics.accuracy(probs, y)
    return dict(extra, accuracy=acc, nll=metrics.nll(probs, y), ece=metrics.ece(probs, y),
                overconfidence=probs.max(1).values.mean().item() - acc)  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=20000, help="training examples (a subset)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--samples", type=int, default=16, help="MC samples")
    ap.add_argument("--bn-inputs", type=int, default=2048, help="training inputs for bn_data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/batchnorm-predictive")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = data.fashion_mnist()
    x, y = split.x_train[: args.n_train], split.y_train[: args.n_train]
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        init = bn_cnn().state_dict()

        def loader(seed=seed):
            gen = torch.Generator().manual_seed(seed)
            ds = torch.utils.data.TensorDataset(x, y)
            return torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, generator=gen)

        adam_net = bn_cnn()
        adam_net.load_state_dict(init)
        opt = torch.optim.Adam(adam_net.parameters(), lr=1e-3)
        adam_net.train()
        for _ in range(args.epochs):
            for xb, yb in loader():
                opt.zero_grad()
                F.cross_entropy(adam_net(xb), yb).backward()
                opt.step()
        adam_net.eval()
        with torch.no_grad():
            rows.append(_row(adam_net(split.x_test).softmax(-1), split.y_test, seed=seed, method="Adam"))
        print(json.dumps(rows[-1]), flush=True)

        net = bn_cnn()
        net.load_state_dict(init)
        post = ef.fit(net, loader(), epochs=args.epochs, scheduler=None, progress=False,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip
        net.eval()
        def gen(seed=seed):  # the same draws for both predictives
            return torch.Generator().manual_seed(seed)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (the BatchNorm warning: measured here)
            stale = ef.predict(net, post, split.x_test, n_samples=args.samples, generator=gen())
        t0 = time.perf_counter()
        fresh = ef.predict(net, post, split.x_test, n_samples=args.samples, generator=gen(),
                           bn_data=x[: args.bn_inputs])  # fmt: skip
        fresh_s = time.perf_counter() - t0
        with torch.no_grad():
            plug = net(split.x_test).softmax(-1)
        for how, probs in (("MC, running statistics", stale), ("MC, bn_data", fresh), ("at the mean", plug)):
            rows.append(_row(probs, split.y_test, seed=seed, method=f"BayesAdam: {how}"))
            if how == "MC, bn_data":
                rows[-1]["predict_seconds"] = fresh_s
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"BatchNorm CNN, Fashion-MNIST ({args.n_train} training examples, {args.epochs} epochs, test set "
        f"10,000), {args.samples} MC samples, bn_data = {args.bn_inputs} training inputs; mean over "
        f"{args.seeds} seed(s) (min–max of ECE).",
        "",
        "| method | acc % | NLL | ECE % | confidence − accuracy (points) |",
        "|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        m = {k: statistics.fmean(r[k] for r in sel) for k in ("accuracy", "nll", "ece", "overconfidence")}
        eces = [100 * r["ece"] for r in sel]
        lines.append(f"| {method} | {100 * m['accuracy']:.2f} | {m['nll']:.4f} | {100 * m['ece']:.2f} "
                     f"({min(eces):.2f}–{max(eces):.2f}) | {100 * m['overconfidence']:+.2f} |")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
