"""`effortless demo`: Adam against BayesAdam on Fashion-MNIST, plus an in-between-uncertainty picture.

Both methods train the same MLP (784-512-256-10) from the same initialisation with the same
data order and epochs; BayesAdam is constructed with ``n_data`` only. Adam predicts with its
weights; BayesAdam with 32 posterior samples. Out-of-distribution inputs are the MNIST test set.
Without Fashion-MNIST the demo runs on MNIST-1D (generated) with Gaussian-noise inputs as OOD.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from .. import data
from ..api import fit, laplace, predict
from ..models import MLP
from ..optim import BayesAdam
from . import plots
from .timing import interleaved, paired_ratio
from .train import evaluate, predict_probs, train

TIMING_NOTE = (
    "BayesAdam's first step compiles its fused kernels with torch.compile: once per process, and "
    "from inductor's on-disk cache after the first run on a machine (several seconds cold, a few "
    "warm). The step time after it is each run's own mean, one run after the other, so machine noise "
    "between the runs shows in it; 'step × Adam' times both optimizers on fresh copies of the "
    "network, interleaved in blocks of steps on one batch (30 blocks of 10; 3 of 2 with --quick), "
    "the median of the paired ratios (benchmarks/step_cost.py's protocol)."
)
QUICK_NOTE = (
    "--quick checks the set-up (1 epoch on 3,000 examples; the toy regression 50 epochs): these "
    "numbers do not compare the methods. After so few steps the weight noise BayesAdam trains with "
    "(its variance from the initial curvature guess and a few dozen estimates) still costs accuracy; "
    "the same run at temperature 0 (Adam with the prior's L2) matches Adam's. Run without --quick "
    "for the comparison (docs/results/demo.md)."
)
COLUMNS = ["accuracy", "nll", "ece", "brier", "ood_auroc", "train_seconds", "step_ms"]


def _classification_task(quick: bool, log):
    try:
        split = data.fashion_mnist()
        try:
            ood, ood_name = data.mnist().x_test, "MNIST test set"
        except FileNotFoundError:
            gen = torch.Generator().manual_seed(0)
            ood, ood_name = torch.rand(10000, 784, generator=gen), "uniform noise"
        make = lambda: MLP(784, [512, 256], 10)  # noqa: E731
        epochs = 5
    except FileNotFoundError as err:
        log(f"Fashion-MNIST not found ({err}); falling back to MNIST-1D.")
        split = data.mnist1d()
        ood = torch.randn(1000, 40, generator=torch.Generator().manual_seed(0))
        ood_name = "Gaussian noise"
        make = lambda: MLP(40, [256, 256], 10)  # noqa: E731
        epochs = 30
    if quick:
        split = split.subset(3000, 1000)
        ood = ood[:1000]
        epochs = 1
    return split, ood, ood_name, make, epochs


def run(
    out: str | Path = "runs/demo",
    epochs: int | None = None,
    quick: bool = False,
    seed: int = 0,
    n_samples: int = 32,
    progress: bool = True,
    log=print,
) -> list[dict]:
    """Run the demo and write results.json, results.md and PNG plots into ``out``."""
    for name, v in (("epochs", epochs), ("n_samples", n_samples)):
        if v is not None and not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split, ood, ood_name, make, default_epochs = _classification_task(quick, log)
    epochs = epochs or default_epochs
    log(
        f"Task: {split.name} ({len(split.x_train)} train / {len(split.x_test)} test), "
        f"OOD: {ood_name}; {epochs} epochs, batch 128, seed {seed}"
    )
    rows, runs = [], {}
    for method, label in (("map", "Adam (MAP)"), ("bayesadam", "BayesAdam (defaults)")):
        run_ = train(method, make, split, epochs=epochs, batch_size=128, seed=seed, progress=progress)
        row = evaluate(run_, split, ood, n_samples=n_samples)
        row.update(task=split.name, method=label, seed=seed, epochs=epochs, first_step_s=run_.first_step_s,
                   later_step_ms=run_.later_step_ms)  # fmt: skip
        rows.append(row)
        runs[label] = run_
    ratio = step_ratio(make, split, reps=3 if quick else 30, block=2 if quick else 10, seed=seed)
    for row in rows:
        row["step_ratio"] = ratio if row["method"].startswith("BayesAdam") else 1.0
    # plots
    probs = {k: predict_probs(r, split.x_test, n_samples) for k, r in runs.items()}
    probs_ood = {k: predict_probs(r, ood, n_samples) for k, r in runs.items()}
    plots.reliability_diagram({k: (p, split.y_test) for k, p in probs.items()}, out / "reliability.png")
    plots.confidence_histogram({k: (probs[k], probs_ood[k]) for k in runs}, out / "confidence_hist.png")
    rows += _toy_regression(out, seed, quick, progress, log)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = format_table(rows)
    notes = f"{QUICK_NOTE}\n\n{TIMING_NOTE}" if quick else TIMING_NOTE
    (out / "results.md").write_text(
        f"# effortless demo\n\n{split.name}, MLP, {epochs} epochs, OOD = {ood_name}.\n\n{table}\n\n{notes}\n"
    )
    log("\n" + table + "\n\n" + notes)
    log(f"\nWrote {out}/results.json, results.md, reliability.png, confidence_hist.png, toy_regression.png")
    return rows


def step_ratio(make, split, reps: int = 30, block: int = 10, seed: int = 0, batch_size: int = 128) -> float:
    """BayesAdam's (defaults) time per training step over Adam's (lr 1e-3) on fresh copies of the
    network ``make()`` builds, on one batch of ``split``'s training data, interleaved in blocks of
    ``block`` steps (:mod:`effortless.experiments.timing`); the median of ``reps`` paired ratios.
    In the demo's process BayesAdam's kernels were compiled by its training run already."""
    torch.manual_seed(seed)
    adam_model = make().to(split.x_train.device)
    bayes_model = copy.deepcopy(adam_model)
    x, y = split.x_train[:batch_size], split.y_train[:batch_size]
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    bayes = BayesAdam(bayes_model.parameters(), n_data=len(split.x_train))

    def adam_step():
        adam.zero_grad()
        torch.nn.functional.cross_entropy(adam_model(x), y).backward()
        adam.step()

    def bayes_step():
        bayes.zero_grad()
        with bayes.sampled_params(train=True):
            torch.nn.functional.cross_entropy(bayes_model(x), y).backward()
        bayes.step()

    times = interleaved({"adam": adam_step, "bayesadam": bayes_step}, reps=reps, warmup=4, block=block)
    return paired_ratio(times["bayesadam"], times["adam"])


def toy_network() -> torch.nn.Module:
    """The toy regression's network (tanh MLP 1-50-50-1), initialised from the global RNG."""
    return torch.nn.Sequential(torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 50),
                               torch.nn.Tanh(), torch.nn.Linear(50, 1))  # fmt: skip


def toy_scores(mean: torch.Tensor, std: torch.Tensor, split) -> dict:
    """RMSE and Gaussian NLL on the whole test range and where the data is, and the mean
    predictive std inside the gap (|x| < 0.8), for a predictive ``(mean, std)`` on ``split.x_test``."""
    from .. import metrics

    x, y = split.x_test[:, 0], split.y_test
    gap = x.abs() < 0.8
    near = (x >= float(split.x_train.min())) & (x <= float(split.x_train.max())) & ~gap  # where the data is
    return dict(rmse=metrics.rmse(mean, y), gaussian_nll=metrics.gaussian_nll(mean, std**2, y),
                rmse_data=metrics.rmse(mean[near], y[near]),
                gaussian_nll_data=metrics.gaussian_nll(mean[near], std[near] ** 2, y[near]),
                gap_std=float(std[gap].mean()))  # fmt: skip


def _toy_regression(out: Path, seed: int, quick: bool, progress: bool, log) -> list[dict]:
    """BayesAdam (via ef.fit) vs Adam on 1-D data with a gap; plot the predictive bands."""
    split = data.toy_regression(seed=seed)
    loader = data.loader(split.x_train, split.y_train, batch_size=32, seed=seed)
    epochs = 50 if quick else 1000  # at T = 1, 400 left BayesAdam under-fitted on 4 of 4 seeds
    sigma = 0.1
    torch.manual_seed(seed)
    map_model = toy_network()
    bayes_model = copy.deepcopy(map_model)  # same initialisation
    t0 = time.perf_counter()
    opt = torch.optim.Adam(map_model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            (0.5 * (map_model(x) - y).pow(2).mean() / sigma**2).backward()
            opt.step()
    t_map = time.perf_counter() - t0
    t0 = time.perf_counter()  # post-hoc: diagonal GGN Laplace around Adam's weights, evidence-tuned prior
    post_map = laplace(map_model, loader, likelihood="regression", hessian="ggn", sigma_noise=sigma,
                       prior_precision="marglik")  # fmt: skip
    t_laplace = t_map + time.perf_counter() - t0
    # BayesAdam twice: with its defaults (temperature 0.01, what a user gets) and untempered (T = 1,
    # the Bayesian posterior for this known noise level, which the mean-field Gaussian under-fits:
    # its mean flattens at the data's edges; docs/results/demo.md has both)
    posts, t_bayes = {}, {}
    for name, kwargs in (("defaults", {}), ("T = 1", dict(temperature=1.0, lr=1e-2))):
        model = copy.deepcopy(bayes_model)  # the same initialisation for both
        t0 = time.perf_counter()
        post = fit(model, loader, likelihood="regression", sigma_noise=sigma, epochs=epochs,
                   progress=progress, generator=torch.Generator().manual_seed(seed), **kwargs)  # fmt: skip
        t_bayes[name] = time.perf_counter() - t0
        posts[name] = predict(model, post, split.x_test, n_samples=64, likelihood="regression",
                              sigma_noise=sigma, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    with torch.no_grad():
        m_map = map_model(split.x_test)
    mean_la, var_la = predict(map_model, post_map, split.x_test, method="glm", n_samples=64,
                              likelihood="regression", sigma_noise=sigma,
                              generator=torch.Generator().manual_seed(seed))  # fmt: skip
    curves = {
        "Adam (MAP)": (m_map, torch.full_like(m_map, sigma)),
        "BayesAdam (ef.fit, defaults)": (posts["defaults"][0], posts["defaults"][1].sqrt()),
        "BayesAdam (ef.fit, T = 1)": (posts["T = 1"][0], posts["T = 1"][1].sqrt()),
        "Adam + ef.laplace (GLM)": (mean_la, var_la.sqrt()),
    }
    plots.regression_band(split.x_train, split.y_train, split.x_test, curves, out / "toy_regression.png",
                          truth=split.y_test)  # fmt: skip
    rows = []
    seconds = (t_map, t_bayes["defaults"], t_bayes["T = 1"], t_laplace)
    for name, (m, s), secs in zip(curves, curves.values(), seconds):
        rows.append(dict(task="toy-regression", method=name, seed=seed, epochs=epochs,
                         **toy_scores(m, s, split), train_seconds=secs))  # fmt: skip
    log(
        "Toy regression (x in [-3,-1] ∪ [1,3]): mean predictive std inside the gap "
        f"Adam {rows[0]['gap_std']:.3f} (noise only), BayesAdam {rows[1]['gap_std']:.3f} (defaults) / "
        f"{rows[2]['gap_std']:.3f} (T = 1), Adam + Laplace {rows[3]['gap_std']:.3f}"
    )
    return rows


def format_table(rows: list[dict]) -> str:
    cls = [r for r in rows if "accuracy" in r]
    reg = [r for r in rows if "rmse" in r]
    lines = [
        "| task | method | acc % | NLL | ECE % | Brier | OOD AUROC % | train s | of it, the first step s "
        "| step ms after it | step × Adam (interleaved) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cls:
        lines.append(
            f"| {r['task']} | {r['method']} | {100 * r['accuracy']:.2f} | {r['nll']:.3f} | "
            f"{100 * r['ece']:.2f} | {r['brier']:.3f} | {100 * r.get('ood_auroc', float('nan')):.1f} | "
            f"{r['train_seconds']:.1f} | {r.get('first_step_s', float('nan')):.1f} | "
            f"{r.get('later_step_ms', float('nan')):.2f} | {r.get('step_ratio', float('nan')):.2f} |"
        )
    if reg:
        lines += ["", "| task | method | RMSE where the data is | Gaussian NLL there | RMSE on [-4, 4] "
                  "| Gaussian NLL on [-4, 4] | mean std in the gap | train s |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in reg:
            lines.append(
                f"| {r['task']} | {r['method']} | {r['rmse_data']:.3f} | {r['gaussian_nll_data']:.3f} | "
                f"{r['rmse']:.3f} | {r['gaussian_nll']:.3f} | {r['gap_std']:.3f} | {r['train_seconds']:.1f} |"
            )
    return "\n".join(lines)
