"""Post-hoc last-layer KFAC Laplace (marglik prior, probit predictive): effortless against
laplace-torch (if installed, `scripts/setup.sh --peers`) on the same Adam-trained Fashion-MNIST MLP
(784-512-256-10, 5 epochs), per seed. Fit and predict times are wall-clock, one run each, with the
same loader; the epoch time is the MAP training time / 5.

    python benchmarks/last_layer_laplace.py --seeds 3 --out runs/last_layer_laplace
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import effortless as ef
from effortless import data, metrics
from effortless.experiments.train import train
from effortless.models import MLP


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/last_layer_laplace")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from laplace import Laplace
    except ImportError:
        Laplace = None
    s = data.fashion_mnist()
    rows = []
    for seed in range(args.seeds):
        run = train(
            "map", lambda: MLP(784, [512, 256], 10), s, epochs=5, batch_size=128, seed=seed, progress=False
        )
        epoch = run.train_seconds / 5
        loader = data.loader(s.x_train, s.y_train, batch_size=512, shuffle=False)

        def row(method, probs, fit, pred, seed=seed, epoch=epoch):
            r = dict(seed=seed, method=method, accuracy=metrics.accuracy(probs, s.y_test),
                     nll=metrics.nll(probs, s.y_test), ece=metrics.ece(probs, s.y_test),
                     fit_epochs=fit / epoch, predict_seconds=pred)  # fmt: skip
            print(json.dumps(r), flush=True)
            rows.append(r)

        with torch.no_grad():
            row("MAP (Adam)", run.model(s.x_test).softmax(-1), 0.0, 0.0)
        t = time.perf_counter()
        post = ef.laplace(run.model, loader, hessian="kfac", subset="last_layer", prior_precision="marglik")
        fit = time.perf_counter() - t
        t = time.perf_counter()
        probs = ef.predict(run.model, post, s.x_test, method="probit")
        row("effortless LL-KFAC", probs, fit, time.perf_counter() - t)
        if Laplace is not None:
            t = time.perf_counter()
            la = Laplace(
                run.model, "classification", subset_of_weights="last_layer", hessian_structure="kron"
            )
            la.fit(loader)
            la.optimize_prior_precision(method="marglik")
            fit = time.perf_counter() - t
            t = time.perf_counter()
            probs = torch.cat([la(s.x_test[i : i + 1000], pred_type="glm", link_approx="probit")
                               for i in range(0, len(s.x_test), 1000)])  # fmt: skip
            row("laplace-torch LL-KFAC", probs, fit, time.perf_counter() - t)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| seed | method | acc % | NLL | ECE % | fit (epochs) | predict 10k (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['method']} | {100 * r['accuracy']:.2f} | {r['nll']:.4f} | "
            f"{100 * r['ece']:.2f} | {r['fit_epochs']:.2f} | {r['predict_seconds']:.2f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
