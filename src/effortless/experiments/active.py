"""`effortless active`: the pool-based active-learning experiment grid (method × acquisition × repeat).

Protocol (Gal et al. 2017, as default): a balanced set of ``initial`` labels, ``query`` labels per
round chosen from a random subset of ``pool_subset`` pool points, up to ``budget`` labels, the
network retrained from scratch each round (``--warm-start`` keeps the previous weights) and
evaluated on the full test set. Every cell of the grid writes a checkpoint after each round, so
an interrupted run picks up where it stopped when started again with the same arguments.

Outputs in ``out``: ``results.json`` (every learning curve), ``results.md`` (labels needed to reach
90 % and 95 % test accuracy, mean ± std over the repeats that got there; area under the learning
curve), ``learning_curves.png`` (accuracy vs labels, mean ± std bands over repeats).
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path

import torch

from .. import data
from .._checks import is_count
from ..active import ACQUISITIONS, LEARNERS, ActiveConfig, TrainConfig, make_learner, run_loop
from ..models import MLP, CNN1d, LeNet
from ._report import mean_sd

TASKS = {
    "mnist": (data.mnist, lambda p: LeNet(dropout=p)),
    "fmnist": (data.fashion_mnist, lambda p: LeNet(dropout=p)),
    "mnist1d": (data.mnist1d, lambda p: CNN1d(dropout=p)),
    "mnist1d-mlp": (data.mnist1d, lambda p: MLP(40, [256, 256], 10, dropout=p)),
}
THRESHOLDS = (0.90, 0.95)


def _cell(task, method, acquisition, repeat, config: dict, train: dict, out: str, threads: int,
          progress: bool = False, subset: int | None = None, parent: int | None = None,
          split=None):  # fmt: skip
    """One learning curve (runs in a worker process when jobs > 1, which stops at the next round
    when its ``parent`` process is gone: a killed run leaves no orphans writing checkpoints).
    ``split``: the task's data when the caller has loaded it already (one process)."""
    torch.set_num_threads(threads)
    load, make_model = TASKS[task]
    split = split if split is not None else load()
    if subset:
        split = split.subset(subset, None)
    learner = make_learner(method, make_model, TrainConfig(**train))
    cfg = ActiveConfig(**{**config, "seed": repeat})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        rounds = 1 + math.ceil((cfg.budget - cfg.initial) / cfg.query)
        bar = tqdm(total=rounds, desc=f"{method}/{acquisition}/{repeat}", leave=False)

    def tick(row):
        if parent is not None and os.getppid() != parent:
            raise SystemExit(f"active: the parent process {parent} is gone; stopping {method}/{acquisition}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(labels=row["labels"], acc=f"{row['accuracy']:.3f}")

    ckpt = Path(out) / "checkpoints" / f"{method}__{acquisition}__{repeat}.pt"
    state = run_loop(learner, acquisition, split.x_train, split.y_train, split.x_test, split.y_test,
                     split.n_classes, cfg, checkpoint=ckpt, progress=tick,
                     learner_settings=train)  # fmt: skip
    if bar is not None:
        bar.close()
    return {
        "method": method,
        "acquisition": acquisition,
        "repeat": repeat,
        "history": state.history,
        "labelled": state.labelled,
        "seconds": state.seconds,  # all rounds, also those of earlier (resumed) runs; None: unknown
    }


def labels_to_reach(history, threshold):
    """The first number of labels at which test accuracy reached ``threshold`` (None if never)."""
    return next((r["labels"] for r in history if r["accuracy"] >= threshold), None)


def area_under_curve(history):
    """Trapezoid area under accuracy vs labels, over the labels spanned (so 1.0 = perfect throughout)."""
    xs = [r["labels"] for r in history]
    ys = [r["accuracy"] for r in history]
    if len(xs) < 2:
        return ys[0] if ys else float("nan")
    area = sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))
    return area / (xs[-1] - xs[0])


def summarise(cells):
    groups: dict[tuple[str, str], list] = {}
    for c in cells:
        groups.setdefault((c["method"], c["acquisition"]), []).append(c)
    rows = []
    for (method, acq), cs in groups.items():
        row = {"method": method, "acquisition": acq, "repeats": len(cs),
               "seconds": None if any(c["seconds"] is None for c in cs)
               else sum(c["seconds"] for c in cs)}  # fmt: skip
        for t in THRESHOLDS:
            got = [v for v in (labels_to_reach(c["history"], t) for c in cs) if v is not None]
            row[f"labels@{t:.2f}"] = got
        row["alc"] = [area_under_curve(c["history"]) for c in cs]
        row["final_accuracy"] = [c["history"][-1]["accuracy"] for c in cs]
        rows.append(row)
    return rows


def _secs(seconds):
    return "time not recorded" if seconds is None else f"{seconds:.0f} s"


def table(rows, task, config, budget):
    lines = [
        f"# Active learning on {task}",
        "",
        f"Initial {config['initial']} balanced labels, {config['query']} per round from a random subset of "
        f"{config['pool_subset']} pool points, budget {budget}; mean ± std over repeats.",
        "",
        "| method | acquisition | labels to 90 % | labels to 95 % | area under curve | final acc % "
        "| minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for t in THRESHOLDS:
            got = r[f"labels@{t:.2f}"]
            s = mean_sd(got, ".0f")
            if len(got) < r["repeats"]:
                s += f" ({len(got)}/{r['repeats']} reached)"
            cells.append(s)
        acc = [100 * a for a in r["final_accuracy"]]
        minutes = "–" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"
        lines.append(
            f"| {r['method']} | {r['acquisition']} | {cells[0]} | {cells[1]} | "
            f"{mean_sd(r['alc'], '.4f')} | {mean_sd(acc, '.2f')} | {minutes} |"
        )
    return "\n".join(lines)


def plot(cells, path, task):
    from .plots import figure

    fig = figure(figsize=(7, 4.5))
    ax = fig.subplots()
    groups: dict[tuple[str, str], list] = {}
    for c in cells:
        groups.setdefault((c["method"], c["acquisition"]), []).append(c)
    for (method, acq), cs in sorted(groups.items()):
        n = min(len(c["history"]) for c in cs)
        xs = [r["labels"] for r in cs[0]["history"][:n]]
        acc = torch.tensor([[r["accuracy"] for r in c["history"][:n]] for c in cs], dtype=torch.float64)
        mean = acc.mean(0)
        sd = acc.std(0, unbiased=True) if len(cs) > 1 else torch.zeros_like(mean)
        (line,) = ax.plot(xs, 100 * mean, label=f"{method} · {acq}")
        ax.fill_between(xs, 100 * (mean - sd), 100 * (mean + sd), color=line.get_color(), alpha=0.2)
    for t in THRESHOLDS:
        ax.axhline(100 * t, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="labelled examples", ylabel="test accuracy %", title=f"Active learning ({task})")
    ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(
    task="mnist",
    methods=("bayesadam", "mc-dropout"),
    acquisitions=("bald", "random"),
    initial=20,
    query=10,
    budget=1000,
    repeats=3,
    pool_subset=2000,
    n_samples=20,
    warm_start=False,
    epochs=30,
    min_steps=200,
    temperature=None,
    prior_precision=None,
    hessian=None,
    out="runs/active",
    jobs=1,
    threads=1,
    progress=True,
    subset=None,
    log=print,
    pairs=None,
):
    """Run the grid (every method × acquisition, or the given ``pairs`` of (method, acquisition))
    × ``repeats``; cells already checkpointed in ``out`` are read back, not rerun."""
    if pairs is not None:
        pairs = [tuple(p) for p in pairs]
        methods = list(dict.fromkeys(m for m, _ in pairs))
        acquisitions = list(dict.fromkeys(a for _, a in pairs))
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    for m in methods:
        if m not in LEARNERS:
            raise ValueError(f"method must be one of {sorted(LEARNERS)}, got {m!r}")
    for a in acquisitions:
        if a not in ACQUISITIONS:
            raise ValueError(f"acquisition must be one of {sorted(ACQUISITIONS)}, got {a!r}")
    if not (is_count(repeats) and is_count(jobs) and is_count(threads)):
        raise ValueError(f"repeats, jobs and threads must be positive ints, got {repeats!r}, {jobs!r}, "
                         f"{threads!r}")  # fmt: skip
    extra = {k: v for k, v in (("temperature", temperature), ("prior_precision", prior_precision),
                               ("hessian", hessian)) if v is not None}  # fmt: skip
    train = asdict(TrainConfig(epochs=epochs, min_steps=min_steps, **extra))
    config = asdict(ActiveConfig(initial, query, budget, pool_subset, n_samples, warm_start))
    config.pop("seed")
    split = TASKS[task][0]()  # argument errors now, against the data, not in a worker or after a bar
    pool = subset if subset else len(split.x_train)
    ActiveConfig(**config).check(min(pool, len(split.x_train)), split.n_classes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    combos = pairs if pairs is not None else [(m, a) for m in methods for a in acquisitions]
    grid = [(m, a, r) for m, a in combos for r in range(repeats)]
    t0 = time.perf_counter()
    cells = []
    if jobs == 1:
        saved_threads = torch.get_num_threads()  # (the caller's setting, which the cells change)
        try:
            for m, a, r in grid:
                cells.append(_cell(task, m, a, r, config, train, str(out), threads, progress, subset,
                                   split=split))  # (loaded above: once for every cell)
                log(f"{m} · {a} · repeat {r}: final accuracy {cells[-1]['history'][-1]['accuracy']:.4f}, "
                    f"{_secs(cells[-1]['seconds'])}")  # fmt: skip
        finally:
            torch.set_num_threads(saved_threads)
    else:
        import multiprocessing as mp

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(grid), desc=f"active {task} ({jobs} jobs)")
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_cell, task, m, a, r, config, train, str(out), threads, False, subset,
                                   os.getpid()) for m, a, r in grid]  # fmt: skip
            for f in as_completed(futures):
                cells.append(f.result())
                if bar is not None:
                    bar.update(1)
                c = cells[-1]
                log(f"{c['method']} · {c['acquisition']} · repeat {c['repeat']}: final accuracy "
                    f"{c['history'][-1]['accuracy']:.4f}, {_secs(c['seconds'])}")  # fmt: skip
        if bar is not None:
            bar.close()
    cells.sort(key=lambda c: (c["method"], c["acquisition"], c["repeat"]))
    rows = summarise(cells)
    md = table(rows, task, config, budget)
    wall = time.perf_counter() - t0
    md += f"\n\nWall time {wall / 60:.1f} min with {jobs} job(s) × {threads} thread(s)."
    (out / "results.json").write_text(json.dumps(
        {"task": task, "config": config, "train": train, "summary": rows, "cells": cells,
         "wall_seconds": wall}, indent=1))  # fmt: skip
    (out / "results.md").write_text(md + "\n")
    plot(cells, out / "learning_curves.png", task)
    return rows, md
