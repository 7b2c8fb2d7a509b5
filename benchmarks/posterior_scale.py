"""How far can rescaling a diagonal posterior go towards issue #5's calibration goals?

Trains the fmnist-mlp network (784-512-256-10, 5 epochs, the bench's data and protocol) with Adam
and with BayesAdam (defaults), then scales each posterior's covariance by κ (precision / κ) and
evaluates the predictive on the test set and against MNIST (AUROC of the max probability):

* ``laplace-diag``: MAP + ef.laplace (exact diagonal GGN, evidence-tuned δ), probit predictive
  (κ = 1 is the bench's ``laplace-diag``);
* ``bayesadam``: BayesAdam's own posterior (κ = 1 is the bench's ``bayesadam``; MC predictive, 32
  samples, and probit).

κ is chosen here on the test set, so no row is a method: the table shows whether any single scale
of these diagonal posteriors meets the goals (NLL < 0.333, ECE ≤ 0.7 %, AUROC ≥ 88) at once.

    python benchmarks/posterior_scale.py --seeds 0,1 --out runs/posterior_scale

Writes results.json, results.md and tradeoff.png (AUROC against ECE along κ, the goal's corner
shaded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import effortless as ef
from effortless import metrics
from effortless.baselines._common import chunked as _chunked
from effortless.baselines._common import run as _run
from effortless.data import loader
from effortless.experiments.tasks import TASKS


def scaled(post: ef.DiagGaussian, kappa: float) -> ef.DiagGaussian:
    out = ef.DiagGaussian(post.mean, {k: v / kappa for k, v in post.precision.items()})
    out.likelihood = "classification"
    if hasattr(post, "sources"):
        out.sources = post.sources
    return out


def evaluate(probs_fn, split, ood) -> dict:
    p_in, p_out = probs_fn(split.x_test), probs_fn(ood)
    return dict(accuracy=100 * metrics.accuracy(p_in, split.y_test), nll=metrics.nll(p_in, split.y_test),
                ece=100 * metrics.ece(p_in, split.y_test),
                auroc=100 * metrics.auroc(p_in.max(-1).values, p_out.max(-1).values))  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1", help="comma list of seeds (one training run each)")
    ap.add_argument("--kappas", default="1,0.5,0.3,0.2,0.1,0.03,0.01", help="κ for laplace-diag")
    ap.add_argument("--ba-kappas", default="1,3,10,20,30,50,100,300", help="κ for bayesadam")
    ap.add_argument("--out", default="runs/posterior_scale")
    args = ap.parse_args()
    torch.set_num_threads(2)
    task = TASKS["fmnist-mlp"]
    split = task.load()
    ood = task.ood(split)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        one_seed(task, split, ood, seed, args, rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| seed | posterior | κ (covariance ×) | predictive | acc % | NLL | ECE % | AUROC % |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['seed']} | {r['method']} | {r['kappa']:g} | {r['predictive']} | "
                     f"{r['accuracy']:.2f} | {r['nll']:.4f} | {r['ece']:.2f} | {r['auroc']:.1f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, out / "tradeoff.png")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.axhspan(88, 100, xmin=0, xmax=1, color="0.92")
    ax.fill_between([0, 0.7], 88, 100, color="tab:green", alpha=0.25, label="goal (ECE ≤ 0.7, AUROC ≥ 88)")
    curves = sorted({(r["seed"], r["method"], r["predictive"]) for r in rows})
    for seed, method, predictive in curves:
        sel = [r for r in rows if (r["seed"], r["method"], r["predictive"]) == (seed, method, predictive)]
        sel = [r for r in sel if r["accuracy"] > 80]  # the collapsed MC draws leave the axes
        ax.plot([r["ece"] for r in sel], [r["auroc"] for r in sel], "o-" if seed == 0 else "s--", ms=3,
                label=f"{method} {predictive}, seed {seed}")  # fmt: skip
        for r in sel:
            ax.annotate(f"{r['kappa']:g}", (r["ece"], r["auroc"]), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")  # fmt: skip
    ax.set_xlabel("ECE % (test set)")
    ax.set_ylabel("AUROC % (Fashion-MNIST vs MNIST)")
    ax.set_xlim(0, 12)
    ax.set_ylim(80, 96)
    ax.set_title("fmnist-mlp: scaling a diagonal posterior's covariance by κ (labels)", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def one_seed(task, split, ood, seed, args, rows):
    def add(method, kappa, predictive, fn):
        r = dict(seed=seed, method=method, kappa=kappa, predictive=predictive, **evaluate(fn, split, ood))
        rows.append(r)
        print(json.dumps(r))

    run = _run(task, split, seed, task.epochs, False)
    model = run.model.eval()
    la = ef.laplace(model, loader(split.x_train, split.y_train, 512, shuffle=False), hessian="ggn",
                    prior_precision="marglik", progress=False)  # fmt: skip
    for k in map(float, args.kappas.split(",")):
        q = scaled(la, k)
        add("laplace-diag", k, "probit",
            lambda x, q=q: _chunked(lambda xb: ef.predict(model, q, xb, method="probit"), x, 500))
    run = _run(task, split, seed, task.epochs, False, method="bayesadam", hessian="reparam")
    model = run.model.eval()
    for k in map(float, args.ba_kappas.split(",")):
        q = scaled(run.posterior, k)
        for method in ("mc", "probit"):
            def fn(x, q=q, method=method):
                g = torch.Generator().manual_seed(seed)
                return _chunked(
                    lambda xb: ef.predict(model, q, xb, n_samples=32, method=method, generator=g), x, 500
                )

            add("bayesadam", k, method, fn)


if __name__ == "__main__":
    main()
