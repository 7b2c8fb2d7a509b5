"""BayesAdam with only ``n_data`` set against Adam (lr 1e-3), same epochs, several tasks and seeds.

The issue's goal for the defaults: accuracy within 1 point of Adam, better NLL and ECE. Each task
trains both methods from the same initialisation and data order per seed (plain user loop,
constant learning rate) and evaluates with the shared code in ``effortless.experiments.train``
(BayesAdam: 32-sample MC predictive). Writes results.json and results.md (mean ± std over seeds).

    python benchmarks/defaults.py --tasks fmnist-mlp,mnist1d-mlp,digits --seeds 3 --out runs/defaults
    python benchmarks/defaults.py --bayesadam '{"temperature": 0.1}'   # try other settings
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from effortless import data
from effortless.experiments.train import evaluate, train
from effortless.models import MLP, CNN1d, LeNet

# task -> (split loader, model factory taking the split, epochs, batch size)
TASKS = {
    "fmnist-mlp": (data.fashion_mnist, lambda s: MLP(784, [512, 256], 10), 5, 128),
    "fmnist-lenet": (data.fashion_mnist, lambda s: LeNet(), 3, 128),
    "mnist1d-mlp": (data.mnist1d, lambda s: MLP(40, [256, 256], 10), 30, 128),
    "mnist1d-cnn": (data.mnist1d, lambda s: CNN1d(), 30, 128),
    "digits": (lambda: data.tabular("digits"), lambda s: MLP(64, [64, 64], 10), 50, 32),
    "breast_cancer": (lambda: data.tabular("breast_cancer"), lambda s: MLP(30, [64, 64], 2), 50, 32),
    "wine": (lambda: data.tabular("wine"), lambda s: MLP(13, [64, 64], 3), 50, 32),
}
METRICS = ("accuracy", "nll", "ece", "brier")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma list from {list(TASKS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bayesadam", default="{}", help="JSON dict of BayesAdam keyword arguments")
    ap.add_argument("--out", default="runs/defaults")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kwargs = json.loads(args.bayesadam)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task in args.tasks.split(","):
        load, make, epochs, bs = TASKS[task]
        split = load()
        for seed in range(args.seeds):
            for method in ("map", "bayesadam"):
                run = train(method, lambda make=make, split=split: make(split), split, epochs=epochs,
                            batch_size=bs, seed=seed, progress=False,
                            **(kwargs if method == "bayesadam" else {}))  # fmt: skip
                row = evaluate(run, split)
                row.update(task=task, seed=seed, epochs=epochs)
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("task", "method", "seed", *METRICS)}), flush=True)
        (out / "results.json").write_text(json.dumps({"bayesadam_kwargs": kwargs, "rows": rows}, indent=2))
    lines = [
        f"BayesAdam {kwargs or '(defaults)'} vs Adam lr 1e-3; mean ± std over {args.seeds} seeds.",
        "",
        "| task | method | acc % | NLL | ECE % | Brier | goal met (acc ≥ Adam − 1, NLL and ECE lower) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        stats = {}
        for method in ("map", "bayesadam"):
            sel = [r for r in rows if r["task"] == task and r["method"] == method]
            stats[method] = {k: [r[k] for r in sel] for k in METRICS}
        mean = {m: {k: statistics.fmean(v) for k, v in s.items()} for m, s in stats.items()}
        ok = (
            mean["bayesadam"]["accuracy"] >= mean["map"]["accuracy"] - 0.01
            and mean["bayesadam"]["nll"] < mean["map"]["nll"]
            and mean["bayesadam"]["ece"] < mean["map"]["ece"]
        )
        for method, name in (("map", "Adam"), ("bayesadam", "BayesAdam")):
            s = stats[method]

            def fmt(k, scale=1.0, digits=3, s=s):
                sd = statistics.stdev(s[k]) if len(s[k]) > 1 else 0.0
                return f"{scale * statistics.fmean(s[k]):.{digits}f} ± {scale * sd:.{digits}f}"

            verdict = ("yes" if ok else "**no**") if method == "bayesadam" else ""
            lines.append(
                f"| {task} | {name} | {fmt('accuracy', 100, 2)} | {fmt('nll')} | {fmt('ece', 100, 2)} | "
                f"{fmt('brier')} | {verdict} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
