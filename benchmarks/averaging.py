"""What averaging the mean iterates does, and how much of it Adam gets from the same averaging.

For each task and seed, one Adam run and one BayesAdam run (defaults: ``averaging=0.05``), each
evaluated twice from the same training run:

* ``adam``: the last iterate (what a user of torch.optim.Adam gets);
* ``adam + averaging``: Adam's iterates averaged exactly as BayesAdam averages its means
  (polynomial-decay average, weight (η+1)/(t+η) on step t's weights, η = 1/averaging − 1);
* ``bayesadam, last iterate``: BayesAdam's posterior with the running μ as its mean (what
  ``averaging=None`` gives: the training is bitwise the same);
* ``bayesadam``: the defaults (the averaged means).

Same network, data order, epochs and evaluation as ``benchmarks/defaults.py`` (BayesAdam: 32-sample
MC predictive). The goal column is the core issue's defaults goal against plain Adam.

    python benchmarks/averaging.py --tasks fmnist-mlp,digits --seeds 3 --out runs/averaging
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from effortless.experiments.defaults_study import TASKS
from effortless.experiments.train import RunResult, evaluate, train
from effortless.optim.bayesadam import averaging_weight
from effortless.posterior import DiagGaussian

METRICS = ("accuracy", "nll", "ece")
VARIANTS = ("adam", "adam + averaging", "bayesadam, last iterate", "bayesadam")


class IterateAverage:
    """The polynomial-decay average BayesAdam keeps of its means, kept here of any optimizer's
    parameters (an ``on_step`` callback of :func:`effortless.experiments.train.train`)."""

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.t = 0
        self.avg: list[torch.Tensor] | None = None

    @torch.no_grad()
    def __call__(self, opt) -> None:
        params = [p for g in opt.param_groups for p in g["params"]]
        self.t += 1
        if self.avg is None:
            self.avg = [p.detach().clone() for p in params]
        else:
            weight = averaging_weight(self.fraction, self.t)
            torch._foreach_lerp_(self.avg, [p.detach() for p in params], weight)


def run_seed(task: str, split, seed: int, fraction: float) -> list[dict]:
    spec = TASKS[task]
    common = dict(epochs=spec.epochs, batch_size=spec.batch_size, seed=seed, progress=False)
    rows = []

    def add(variant, run):
        row = evaluate(run, split)
        rows.append(dict(task=task, seed=seed, variant=variant, **{k: row[k] for k in METRICS}))

    averager = IterateAverage(fraction)
    adam = train("map", lambda: spec.model(0.0), split, on_step=averager, **common)
    add("adam", adam)
    last = [p.detach().clone() for p in adam.model.parameters()]
    with torch.no_grad():
        for p, a in zip(adam.model.parameters(), averager.avg):
            p.copy_(a)
    add("adam + averaging", adam)
    with torch.no_grad():
        for p, a in zip(adam.model.parameters(), last):
            p.copy_(a)

    ba = train("bayesadam", lambda: spec.model(0.0), split, averaging=fraction, **common)
    live = {n: p.detach().clone() for n, p in ba.model.named_parameters()}  # the running μ
    q = DiagGaussian(live, ba.posterior.precision)
    if hasattr(ba.posterior, "likelihood"):  # (recorded by train_step only)
        q.likelihood = ba.posterior.likelihood
    add("bayesadam, last iterate", RunResult("bayesadam", ba.model, q, 0.0, 0.0))
    add("bayesadam", ba)
    return rows


def table(rows: list[dict], tasks: list[str], seeds: int) -> str:
    lines = [
        f"Mean ± std over {seeds} seeds; goal (core issue): accuracy ≥ Adam − 1 point, NLL and ECE lower "
        "than plain Adam's.",
        "",
        "| task | variant | acc % | NLL | ECE % | goal met |",
        "|---|---|---|---|---|---|",
    ]
    for task in tasks:
        stats = {}
        for v in VARIANTS:
            sel = [r for r in rows if r["task"] == task and r["variant"] == v]
            stats[v] = {k: (statistics.fmean(r[k] for r in sel),
                            statistics.stdev(r[k] for r in sel) if len(sel) > 1 else 0.0)
                        for k in METRICS}  # fmt: skip
        ref = stats["adam"]
        for v in VARIANTS:
            s = stats[v]
            ok = (s["accuracy"][0] >= ref["accuracy"][0] - 0.01 and s["nll"][0] < ref["nll"][0]
                  and s["ece"][0] < ref["ece"][0])  # fmt: skip
            verdict = "" if v == "adam" else ("yes" if ok else "**no**")
            lines.append(
                f"| {task} | {v} | {100 * s['accuracy'][0]:.2f} ± {100 * s['accuracy'][1]:.2f} | "
                f"{s['nll'][0]:.4f} ± {s['nll'][1]:.4f} | "
                f"{100 * s['ece'][0]:.2f} ± {100 * s['ece'][1]:.2f} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma list from {list(TASKS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--averaging", type=float, default=0.05, help="the fraction (BayesAdam's default 0.05)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/averaging")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    rows = []
    for task in tasks:
        for seed in range(args.seeds):
            new = run_seed(task, TASKS[task].split(seed), seed, args.averaging)
            for r in new:
                print(json.dumps(r), flush=True)
            rows += new
            doc = {"averaging": args.averaging, "rows": rows}
            (out / "results.json").write_text(json.dumps(doc, indent=1))
    md = table(rows, tasks, args.seeds)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
