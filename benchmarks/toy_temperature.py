"""BayesAdam's posterior temperature on the demo's 1-D toy regression (data with a gap).

Trains the demo's tanh MLP with ``ef.fit`` (1,000 epochs, noise std 0.1 known) at each
temperature and reports the fit where the data is, the NLL on [-4, 4] and the predictive std
inside the gap, per seed of the data. Temperature 1 is the Bayesian posterior for this noise
level; the library default is 0.01.

    python benchmarks/toy_temperature.py --temperatures 0.01,0.03,0.1,0.3,1 --seeds 0,1
"""

from __future__ import annotations

import argparse

import torch

from effortless import data
from effortless.api import fit, predict
from effortless.experiments.demo import toy_network, toy_scores


def run(temperature: float, seed: int, lr: float, epochs: int, sigma: float = 0.1) -> dict:
    split = data.toy_regression(seed=seed)
    loader = data.loader(split.x_train, split.y_train, batch_size=32, seed=seed)
    torch.manual_seed(seed)
    model = toy_network()
    post = fit(model, loader, likelihood="regression", sigma_noise=sigma, epochs=epochs, progress=False,
               temperature=temperature, lr=lr, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    mean, var = predict(model, post, split.x_test, n_samples=64, likelihood="regression", sigma_noise=sigma,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return toy_scores(mean, var.sqrt(), split)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temperatures", default="0.01,0.03,0.1,0.3,1")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--epochs", type=int, default=1000)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"lr {args.lr}, {args.epochs} epochs; per seed of the data: value [seed ...]\n")
    print("| temperature | RMSE where the data is | Gaussian NLL there | Gaussian NLL on [-4, 4] | "
          "std in the gap |")  # fmt: skip
    print("|---|---|---|---|---|")
    for t in (float(v) for v in args.temperatures.split(",")):
        rows = [run(t, int(s), args.lr, args.epochs) for s in args.seeds.split(",")]
        keys = ("rmse_data", "gaussian_nll_data", "gaussian_nll", "gap_std")
        cells = [" / ".join(f"{r[k]:.3f}" for r in rows) for k in keys]
        print(f"| {t:g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
