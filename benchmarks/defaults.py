"""BayesAdam with only ``n_data`` set against Adam (lr 1e-3), same epochs, several tasks and seeds.

The issue's goal for the defaults: accuracy within 1 point of Adam, better NLL and ECE. Tasks come
from :mod:`effortless.experiments.defaults_study`. Writes results.json and results.md (mean ± std).

    python benchmarks/defaults.py --tasks fmnist-mlp,mnist1d-mlp,digits --seeds 3 --out runs/defaults
    python benchmarks/defaults.py --bayesadam '{"temperature": 0.03}'   # try other settings
    python benchmarks/defaults.py --bayesadam '{"state_dtype": "bfloat16"}'  # m, v, h in bf16
    python benchmarks/defaults.py --bayesadam '{"averaging": null, "state_dtype": {"hess": "bfloat16"}}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from effortless.experiments.defaults_study import METRICS, TASKS, run_task, summary


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
    run_kwargs = dict(kwargs)
    sd = kwargs.get("state_dtype")  # JSON has no dtypes: "bfloat16" → torch.bfloat16 (also in a dict)
    if isinstance(sd, str):
        run_kwargs["state_dtype"] = getattr(torch, sd)
    elif isinstance(sd, dict):
        run_kwargs["state_dtype"] = {k: None if v is None else getattr(torch, v) for k, v in sd.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    tasks = args.tasks.split(",")

    def log(row):
        print(json.dumps({k: row[k] for k in ("task", "method", "seed", *METRICS)}), flush=True)

    for task in tasks:
        rows += run_task(task, args.seeds, run_kwargs, log=log)
        (out / "results.json").write_text(json.dumps({"bayesadam_kwargs": kwargs, "rows": rows}, indent=2))
    lines = [
        f"BayesAdam {kwargs or '(defaults)'} vs Adam lr 1e-3; mean ± std over {args.seeds} seeds.",
        "",
        "| task | method | acc % | NLL | ECE % | Brier | goal met (acc ≥ Adam − 1, NLL and ECE lower) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        s = summary(rows, task)
        for method, name in (("map", "Adam"), ("bayesadam", "BayesAdam")):
            st = s[method]

            def fmt(k, scale=1.0, digits=3, st=st):
                return f"{scale * st[k][0]:.{digits}f} ± {scale * st[k][1]:.{digits}f}"

            verdict = ("yes" if s["goal_met"] else "**no**") if method == "bayesadam" else ""
            lines.append(
                f"| {task} | {name} | {fmt('accuracy', 100, 2)} | {fmt('nll')} | {fmt('ece', 100, 2)} | "
                f"{fmt('brier')} | {verdict} |"
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
