"""How much of a small test set's ECE is the bins' noise: Adam against BayesAdam's defaults on the
tabular sets, each split's ECE beside the floor a perfectly calibrated predictor would show there.

The tabular sets of the defaults study test on 18 (wine), 57 (breast cancer) or 180 (digits)
rows. ECE from so few predictions in 15 bins is biased upwards, most for a less confident
predictor, whose predictions spread over more, emptier bins. For every split (a new 90/10 split
per seed, the study's networks, epochs and data order) this reports ECE, its floor
(:func:`effortless.metrics.ece_floor`: the ECE a calibrated predictor with the same confidences
would show on that many rows), NLL and confidence − accuracy, their means over splits, and ECE and
floor once more on all splits' test predictions pooled.

    python benchmarks/small_test_sets.py --tasks digits,breast_cancer,wine --splits 10
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from effortless import metrics
from effortless.experiments.defaults_study import TASKS
from effortless.experiments.train import predict_probs, train

METHODS = {"map": "Adam", "bayesadam": "BayesAdam (defaults)"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="digits,breast_cancer,wine", help=f"comma list from {list(TASKS)}")
    ap.add_argument("--splits", type=int, default=10, help="seeds (tabular sets: a split each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/small-test-sets")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, pooled = [], {}
    for task in args.tasks.split(","):
        spec = TASKS[task]
        for seed in range(args.splits):
            split = spec.split(seed)
            for method in METHODS:
                run = train(method, lambda spec=spec: spec.model(0.0), split, epochs=spec.epochs,
                            batch_size=spec.batch_size, seed=seed, progress=False)  # fmt: skip
                probs = predict_probs(run, split.x_test, 32).double()
                gen = torch.Generator().manual_seed(seed)
                row = dict(
                    task=task, method=method, seed=seed, n_test=len(split.y_test),
                    accuracy=metrics.accuracy(probs, split.y_test), nll=metrics.nll(probs, split.y_test),
                    ece=metrics.ece(probs, split.y_test), ece_floor=metrics.ece_floor(probs, generator=gen),
                    overconfidence=probs.max(1).values.mean().item() - metrics.accuracy(probs, split.y_test),
                )  # fmt: skip
                rows.append(row)
                pooled.setdefault((task, method), []).append((probs, split.y_test))
                print(json.dumps(row), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = [
        f"{args.splits} seeds per task (the tabular sets: a new 90/10 split per seed; the others their "
        "one split); ECE and its floor in %, confidence − accuracy in points (negative: underconfident).",
        "",
        "| task (test rows) | method | acc % | NLL | ECE | ECE floor | ECE − floor | confidence − accuracy "
        "| pooled ECE | pooled floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, method), preds in pooled.items():
        sel = [r for r in rows if (r["task"], r["method"]) == (task, method)]
        m = {k: statistics.fmean(r[k] for r in sel) for k in ("accuracy", "nll", "ece", "ece_floor",
                                                               "overconfidence")}  # fmt: skip
        probs, y = torch.cat([p for p, _ in preds]), torch.cat([t for _, t in preds])
        p_ece = metrics.ece(probs, y)
        p_floor = metrics.ece_floor(probs, generator=torch.Generator().manual_seed(0))
        lines.append(
            f"| {task} ({sel[0]['n_test']}) | {METHODS[method]} | {100 * m['accuracy']:.2f} | "
            f"{m['nll']:.4f} | {100 * m['ece']:.2f} | {100 * m['ece_floor']:.2f} | "
            f"{100 * (m['ece'] - m['ece_floor']):+.2f} | "
            f"{100 * m['overconfidence']:+.2f} | {100 * p_ece:.2f} | {100 * p_floor:.2f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
