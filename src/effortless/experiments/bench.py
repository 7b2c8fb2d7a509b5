"""`effortless bench`: methods side by side on the same data, network, epochs and evaluation.

One registry of tasks (dataclasses) and one of methods (:mod:`effortless.baselines`) drive the
runs. Every (task, method, seed) row holds accuracy, NLL, ECE, Brier, OOD AUROC (max probability),
train seconds and milliseconds per step, and accuracy / NLL / ECE on shifted test sets (rotated
images, or Gaussian input noise, at several intensities: the task's ``shift``); rows already in
``results.json`` are skipped, so a killed run continues where it stopped. ``results.md`` has
mean ± std over seeds with the best mean per column in bold, and a shift table; PNG plots:
reliability diagrams and in/out confidence histograms (last seed), shift curves (all seeds).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from .. import metrics
from .._io import write_atomic
from ..baselines import METHODS, REGRESSION_METHODS, available
from . import plots
from ._report import mean_sd
from .tasks import REGRESSION as REGRESSION_TASKS
from .tasks import TASKS

DEFAULTS = {
    "task": ["fmnist-mlp"],
    "methods": ["map", "bayesadam", "mc-dropout", "temperature", "laplace", "adam-laplace"],
    "seeds": 1,
    "epochs": None,
    "subset": None,
    "out": "runs/bench",
    "device": "auto",
}
PROFILES = {
    # every method of 1x-5x training cost on the quick tasks (issue #5: fmnist-mlp, mnist1d-mlp and
    # toy-regression; methods without a regression version skip it): ~20 min on 2 CPU cores
    "quick": {"task": ["fmnist-mlp", "mnist1d-mlp", "toy-regression"], "seeds": 1,
              "methods": ["map", "bayesadam", "bayesadam-ggn-mc", "mc-dropout", "ensemble",
                          "temperature", "laplace", "laplace-diag", "adam-laplace", "swag", "vi"]},
    # all tasks, more seeds: for a GPU machine or an overnight CPU run (vi is MLP-only: not here)
    "full": {"task": list(TASKS), "seeds": 5,  # (methods without a regression version skip those tasks)
             "methods": ["map", "bayesadam", "bayesadam-ggn-mc", "bayesadam-efisher", "mc-dropout",
                         "ensemble", "temperature", "laplace", "adam-laplace", "swag"]},
}  # fmt: skip
# a profile also runs the peers that are installed (an optional extra: scripts/setup.sh --peers)
PEERS = ("ivon", "laplace-torch")


def resolve_config(profile=None, config=None, **overrides) -> dict:
    """The run's settings: defaults, then the ``profile``, then the ``config`` file (JSON, or YAML
    when PyYAML is installed), then the non-None ``overrides`` (the command-line flags)."""
    out = dict(DEFAULTS)
    if profile is not None:
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
        out.update(PROFILES[profile])
        out["methods"] = list(out["methods"]) + installed_peers()
    if config is not None:
        path = Path(config)
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); "
                                 "or use JSON") from None  # fmt: skip
            try:
                given = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
        else:
            try:
                given = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}); YAML files need a .yaml suffix") from None
        if not isinstance(given, dict):
            raise ValueError(f"{path}: the config must be a mapping of fields, got a {type(given).__name__}")
        unknown = set(given) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        out.update(given)
    out.update({k: v for k, v in overrides.items() if v is not None})
    for k in ("task", "methods"):
        if isinstance(out[k], str):
            out[k] = [x.strip() for x in out[k].split(",") if x.strip()]
    return out


def installed_peers() -> list[str]:
    """The peers a profile runs: those installed; the others are named on stderr."""
    why = {m: available(m) for m in PEERS}  # (each tries its import once)
    missing = [m for m in PEERS if why[m] is not None]
    if missing:
        reasons = "; ".join(f"{m}: {why[m]}" for m in missing)
        print(f"bench: the profile runs without {', '.join(missing)} ({reasons})", file=sys.stderr)
    return [m for m in PEERS if why[m] is None]


COLUMNS = ("accuracy", "nll", "ece", "brier", "ood_auroc", "train_seconds", "step_ms", "peak_mem_mb")
LOWER_IS_BETTER = {"nll", "ece", "brier", "train_seconds", "step_ms", "peak_mem_mb"}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA device if there is one, else the CPU; anything else as given,
    refused with a clear error when it is not there."""
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch {torch.__version__} sees no CUDA device here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def run(tasks, methods, seeds=1, epochs=None, out="runs/bench", subset=None, progress=True, log=print,
        shard=None, tensorboard=False, device="auto"):  # fmt: skip
    """Run every (task, method, seed) not already in ``out/results.json``; write the reports.

    ``device``: where the networks train and predict (``"auto"``: CUDA if available); the data
    moves there once per task, the metrics are computed on CPU. Rows record it, and a results
    file from another device type is refused rather than mixed.

    ``shard=(i, n)`` runs only the i-th of n interleaved slices of the grid (0-based), for job
    arrays: give each array task its own ``out`` and combine them with :func:`merge`.
    ``tensorboard=True`` also writes each run's curves and metrics as TensorBoard scalars under
    ``out/tensorboard/<task>/<method>/seed<s>`` (needs the ``tensorboard`` package).
    """
    if not tasks or not methods:
        raise ValueError(f"nothing to run: tasks {list(tasks)}, methods {list(methods)}")
    if not (isinstance(seeds, int) and seeds >= 1):
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    if epochs is not None and not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be a positive int or None (the task's), got {epochs!r}")
    if shard is not None:
        i, n = shard
        if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    rows = _read_rows(path) if path.exists() else []
    done = {(r["task"], r["method"], r["seed"]) for r in rows}
    for m in methods:
        why = available(m)
        if why:
            raise ValueError(f"method {m!r}: {why}")
    if tensorboard:
        _tensorboard_writer_class()  # fail before any training when the package is missing
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"task {t!r}: choose from {', '.join(TASKS)}")
        if t in REGRESSION_TASKS and not any(m in REGRESSION_METHODS for m in methods):
            raise ValueError(f"task {t!r} is regression: none of {methods} supports it; "
                             f"choose from {', '.join(REGRESSION_METHODS)}")  # fmt: skip
    skipped = [(t, m) for t in tasks if t in REGRESSION_TASKS for m in methods if m not in REGRESSION_METHODS]
    if skipped:
        log(f"bench: skipping methods without a regression version on regression tasks: {skipped}")
    grid = [(t, m, s) for t in tasks for m in methods for s in range(seeds) if (t, m) not in skipped]
    if shard is not None:
        grid = grid[shard[0] :: shard[1]]
    for r in rows:  # rows already there count as done only if they were run the same way
        if (r["task"], r["method"], r["seed"]) in grid and r["task"] in TASKS:
            want = {"epochs": epochs or TASKS[r["task"]].epochs, "subset": subset, "device": dev.type,
                    "split": _split_kind(r["task"]), "variant": _variant(r["task"], r["method"])}  # fmt: skip
            before = {"device": "cpu", "split": _SPLIT_BEFORE.get(r["task"], want["split"])}
            have = {k: r.get(k, before.get(k)) for k in want}  # (rows before devices: cpu; splits: below)
            if have != want:
                raise ValueError(
                    f"{path} already holds {r['task']} / {r['method']} / seed {r['seed']} run with "
                    f"{have}, but this run asks for {want}; use another --out or delete that file"
                )
    todo = [c for c in grid if c not in done]
    try:
        from tqdm.auto import tqdm

        bar = tqdm(todo, desc="bench", unit="run", disable=not progress)
    except ImportError:  # pragma: no cover
        bar = todo
    splits, on_dev, last, bands = {}, {}, {}, {}
    for t, m, s in bar:
        task = TASKS[t]
        key = (t, s) if task.split_per_seed else t
        if key not in splits:
            split = task.split(s)
            splits[key] = split.subset(subset, max(1, subset // 5)) if subset else split
            on_dev[key] = splits[key].to(dev)  # (moved once per task and split)
        split = splits[key]  # (on CPU: the test sets, shifts and metrics; the methods get it on dev)
        if split.n_classes == 0:  # regression: predictive mean and variance, no OOD or shift
            fitted = REGRESSION_METHODS[m](task, on_dev[key], s, epochs or task.epochs, False)
            mean, var = (v.cpu() for v in fitted.predict(split.x_test.to(dev)))
            row = metrics.regression_report(mean, var, split.y_test, split.y_scale)
            row.update(task=t, method=m, seed=s, epochs=epochs or task.epochs, subset=subset, device=dev.type,
                       split=_split_kind(t), train_seconds=fitted.train_seconds, step_ms=fitted.step_ms,
                       peak_mem_mb=None, train_loss_per_epoch=fitted.train_loss)  # fmt: skip
            if (variant := _variant(t, m)) is not None:
                row["variant"] = variant
            rows.append(row)
            if split.x_train.shape[1] == 1:
                bands.setdefault(t, (split, {}))[1][m] = (mean, var.sqrt())
            _write_rows(path, rows)
            _write_csv(rows, out / "results.csv")
            if tensorboard:
                _log_tensorboard(row, out / "tensorboard")
            continue
        ood = task.ood(split) if task.ood else None
        if subset and ood is not None:
            ood = ood[: subset // 5]
        fitted = METHODS[m](task, on_dev[key], s, epochs or task.epochs, False)

        def predict(x, fitted=fitted):
            return fitted.predict(x.to(dev)).cpu()

        probs = predict(split.x_test)
        probs_ood = predict(ood) if ood is not None else None
        row = metrics.classification_report(probs, split.y_test, probs_ood)
        if task.ood_noise:  # a second OOD set: uniform noise in the inputs' range
            g = torch.Generator().manual_seed(0)
            lo, hi = float(split.x_test.min()), float(split.x_test.max())
            shape = (min(1000, len(split.x_test)), *split.x_test.shape[1:])
            noise = lo + (hi - lo) * torch.rand(shape, generator=g)
            p_noise = predict(noise)
            row["ood_auroc_uniform_noise"] = metrics.auroc(probs.max(-1).values, p_noise.max(-1).values)
        if task.shifts:  # accuracy / NLL / ECE on shifted copies of the test set
            row["shift"] = {}
            for name, (_, levels, fn) in task.shifts.items():
                row["shift"][name] = {}
                for lv in levels:
                    p = probs if lv == 0 else predict(fn(split.x_test, lv))
                    y = split.y_test
                    row["shift"][name][str(lv)] = {
                        "accuracy": metrics.accuracy(p, y), "nll": metrics.nll(p, y),
                        "ece": metrics.ece(p, y),
                    }  # fmt: skip
        row.update(
            task=t,
            method=m,
            seed=s,
            epochs=epochs or task.epochs,
            subset=subset,
            device=dev.type,
            split=_split_kind(t),
            train_seconds=fitted.train_seconds,
            step_ms=fitted.step_ms,
            peak_mem_mb=fitted.peak_mem_mb,
            first_step_s=fitted.first_step_s,
            train_loss_per_epoch=fitted.train_loss,
        )
        rows.append(row)
        last[(t, m)] = (probs, probs_ood, split.y_test)
        _write_rows(path, rows)  # after every run: a killed run resumes here
        _write_csv(rows, out / "results.csv")
        if tensorboard:
            _log_tensorboard(row, out / "tensorboard")
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(task=t, method=m, acc=f"{row['accuracy']:.3f}", nll=f"{row['nll']:.3f}")
    table = report(rows, tasks, methods)
    (out / "results.md").write_text(table + "\n")
    for t, (split, curves) in bands.items():
        plots.regression_band(split.x_train, split.y_train, split.x_test, curves, out / f"band_{t}.png",
                              truth=split.y_test)  # fmt: skip
    for t in tasks:
        sel = {m: v for (tt, m), v in last.items() if tt == t}
        if sel:
            plots.reliability_diagram(
                {m: (p, y) for m, (p, _, y) in sel.items()}, out / f"reliability_{t}.png"
            )
            with_ood = {m: (p, q) for m, (p, q, _) in sel.items() if q is not None}
            if with_ood:
                plots.confidence_histogram(with_ood, out / f"confidence_{t}.png")
    _shift_plots(rows, tasks, methods, out)
    log(table)
    return rows


# rows written before the tabular classification sets moved to a split per seed (commit 77f8197)
# have no "split": theirs was the one fixed split
_SPLIT_BEFORE = {"digits": "one split", "breast_cancer": "one split", "wine": "one split"}


# methods whose regression version changed: rows without the variant were run the old way
_VARIANTS = {"laplace": "last-layer kfac"}  # (regression's laplace was the all-weights diagonal)


def _variant(task: str, method: str) -> str | None:
    return _VARIANTS.get(method) if task in REGRESSION_TASKS else None


def _split_kind(task: str) -> str:
    return "a split per seed" if TASKS[task].split_per_seed else "one split"


REG_COLUMNS = ("rmse", "nll", "picp", "qce", "train_seconds")


def _regression_table(sel, methods, t):
    split = ("a 90/10 split per seed" if TASKS[t].split_per_seed
             else "test inputs on a grid over [-4, 4]: the data, the gap and beyond" if t == "toy-regression"
             else "one fixed split")
    lines = [f"## {t} (regression; RMSE and NLL in the target's original units, {split})",
             "", "| method | splits | RMSE | NLL | 95 % interval coverage % | quantile calibration error % "
             "| train s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    stats = {m: [r for r in sel if r["method"] == m] for m in methods}
    means = {m: statistics.fmean(r["nll"] for r in rs) for m, rs in stats.items() if rs}
    best = min(means, key=means.get) if means else None
    for m, rs in stats.items():
        if not rs:
            continue
        cells = []
        for c, scale in zip(REG_COLUMNS, (1, 1, 100, 100, 1)):
            v = [scale * r[c] for r in rs]
            cell = mean_sd(v, ".3f" if scale == 1 else ".1f")
            cells.append(f"**{cell}**" if c == "nll" and m == best else cell)
        lines.append(f"| {m} | {len(rs)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def report(rows, tasks, methods) -> str:
    lines = []
    for t in tasks:
        if t in REGRESSION_TASKS:
            sel = [r for r in rows if r["task"] == t and r["method"] in methods]
            if sel:
                lines += _regression_table(sel, methods, t)
            continue
        sel = [r for r in rows if r["task"] == t and r["method"] in methods]
        if not sel:
            continue
        stats = {}
        for m in methods:
            rs = [r for r in sel if r["method"] == m]
            if rs:
                stats[m] = {c: [r[c] for r in rs if r.get(c) is not None] for c in COLUMNS}
        best = {}
        for c in COLUMNS:
            means = {m: statistics.fmean(v[c]) for m, v in stats.items() if v[c]}
            if means:
                best[c] = (min if c in LOWER_IS_BETTER else max)(means, key=means.get)
        lines += [
            f"## {t}",
            "",
            "| method | seeds | acc % | NLL | ECE % | Brier | OOD AUROC % | train s | ms/step | MiB/step |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m, v in stats.items():
            cells = []
            for c, scale in zip(COLUMNS, (100, 1, 100, 1, 100, 1, 1, 1)):
                if not v[c]:
                    cells.append("–")
                    continue
                fmt = ".3f" if scale == 1 and c in ("nll", "brier") else ".2f"
                cell = mean_sd([scale * x for x in v[c]], fmt)
                cells.append(f"**{cell}**" if best.get(c) == m else cell)
            lines.append(f"| {m} | {len(v['accuracy'])} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _shift_table(sel, methods, t)
    lines += goals_table(rows, tasks, methods)
    return "\n".join(lines)


# issue #5's goals for BayesAdam with default settings (the ``bayesadam`` rows)
MULTIPLE_COST = {"ensemble"}  # methods that train more than one network
EQUAL_ACCURACY = 0.003  # "at equal accuracy": at most 0.3 points below MAP's (fmnist-mlp's tolerance)
BOSTON_NLL = 2.41  # the deep ensemble of Lakshminarayanan et al. (2017), Table 1


def _times(ratio: float, after_first: float | None) -> str:
    if after_first is None:
        return f"{ratio:.2f}×"
    return f"{ratio:.2f}× ({after_first:.2f}× after the first step, which compiles)"


def goal_checks(rows, tasks, methods) -> list[dict]:
    """Issue #5's goals for ``bayesadam`` on the tasks run, each with BayesAdam's value (means over
    seeds), the target and whether it is met; a goal whose comparison rows are missing is left out.

    fmnist-mlp: accuracy ≥ MAP − 0.3 points, NLL below every method of 1× training cost and no worse
    than the ensemble's, ECE ≤ 0.7 %, OOD AUROC ≥ 88 %, training time ≤ 1.3× MAP's. fmnist-cnn and
    mnist1d-*: NLL and ECE below MAP's at equal accuracy. boston: NLL ≤ 2.41."""

    def mean(t, m, c):
        vals = [r[c] for r in rows if r["task"] == t and r["method"] == m and r.get(c) is not None]
        return statistics.fmean(vals) if vals else None

    out = []

    def check(t, goal, value, target, met, fmt):
        out.append({"task": t, "goal": goal, "value": fmt(value), "target": target, "met": bool(met)})

    pct = lambda x: f"{100 * x:.2f} %"  # noqa: E731
    num = lambda x: f"{x:.3f}"  # noqa: E731
    for t in tasks:
        if "bayesadam" not in methods or mean(t, "bayesadam", "nll") is None:
            continue
        cols = ("accuracy", "nll", "ece", "ood_auroc", "train_seconds", "first_step_s")
        ba = {c: mean(t, "bayesadam", c) for c in cols}
        has_map = mean(t, "map", "nll") is not None
        mp = {c: mean(t, "map", c) for c in cols} if has_map else {}
        if t == "boston":
            check(t, "NLL ≤ the deep ensemble's published 2.41", ba["nll"], f"≤ {BOSTON_NLL}",
                  ba["nll"] <= BOSTON_NLL, num)  # fmt: skip
            continue
        if t in REGRESSION_TASKS or not has_map:
            continue
        floor = mp["accuracy"] - EQUAL_ACCURACY
        acc_ok = ba["accuracy"] >= floor
        check(t, "accuracy ≥ MAP − 0.3 points", ba["accuracy"], f"≥ {pct(floor)}", acc_ok, pct)
        if t == "fmnist-mlp":
            ones = [m for m in methods if m not in MULTIPLE_COST and not m.startswith("bayesadam")
                    and mean(t, m, "nll") is not None]  # fmt: skip
            best = min(ones, key=lambda m: mean(t, m, "nll"))
            low = mean(t, best, "nll")
            check(t, f"NLL below every method of 1× training cost ({', '.join(ones)})", ba["nll"],
                  f"< {low:.3f} ({best})", ba["nll"] < low, num)  # fmt: skip
            for m in sorted(MULTIPLE_COST & set(methods)):
                if mean(t, m, "nll") is not None:
                    check(t, f"NLL no worse than the {m}'s", ba["nll"], f"≤ {mean(t, m, 'nll'):.3f}",
                          ba["nll"] <= mean(t, m, "nll"), num)  # fmt: skip
            check(t, "ECE ≤ 0.7 %", ba["ece"], "≤ 0.70 %", ba["ece"] <= 0.007, pct)
            if ba["ood_auroc"] is not None:
                check(t, "OOD AUROC ≥ 88 %", ba["ood_auroc"], "≥ 88.00 %", ba["ood_auroc"] >= 0.88, pct)
            ratio = ba["train_seconds"] / mp["train_seconds"]
            after = None  # the ratio without each run's first step (rows recorded since 2026-11-28)
            if ba["first_step_s"] is not None and mp["first_step_s"] is not None:
                rest = [d["train_seconds"] - d["first_step_s"] for d in (ba, mp)]
                after = rest[0] / rest[1]
            check(t, "training time ≤ 1.3× MAP's", ratio, "≤ 1.30×", ratio <= 1.3,
                  lambda x, after=after: _times(x, after))  # fmt: skip
        elif t in ("fmnist-cnn", "mnist1d-mlp", "mnist1d-cnn"):
            check(t, "NLL below MAP's", ba["nll"], f"< {mp['nll']:.3f}", ba["nll"] < mp["nll"], num)
            check(t, "ECE below MAP's", ba["ece"], f"< {pct(mp['ece'])}", ba["ece"] < mp["ece"], pct)
    return out


def goals_table(rows, tasks, methods) -> list[str]:
    """The Markdown section of :func:`goal_checks` (empty when no goal applies)."""
    checks = goal_checks(rows, tasks, methods)
    if not checks:
        return []
    sel = [r for r in rows if r["task"] in {c["task"] for c in checks} and r["method"] == "bayesadam"]
    off = [r["task"] for r in sel if r.get("subset") or r.get("epochs") != TASKS[r["task"]].epochs]
    lines = ["## Issue #5's goals for BayesAdam with defaults (`bayesadam`, means over seeds)", ""]
    if off:
        lines += [f"(Run with other epochs or a subset on {', '.join(sorted(set(off)))}: the goals assume "
                  "the task's full protocol.)", ""]  # fmt: skip
    lines += ["| task | goal | BayesAdam | target | met |", "|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['task']} | {c['goal']} | {c['value']} | {c['target']} | "
                     f"{'yes' if c['met'] else '**no**'} |")  # fmt: skip
    met = sum(c["met"] for c in checks)
    return lines + ["", f"{met} of {len(checks)} goals met. Goals that compare with other methods compare "
                    "with those in this run only.", ""]  # fmt: skip


def _shift_table(sel, methods, task):
    """Mean accuracy % / NLL / ECE % per shift intensity and method (over the seeds that have it)."""
    shifted = [r for r in sel if r.get("shift")]
    if not shifted or not TASKS[task].shifts:
        return []
    lines = []
    for name, (label, levels, _) in TASKS[task].shifts.items():
        lines += [f"Under shift — {label}: accuracy % / NLL / ECE %, mean over seeds", "",
                  "| method | " + " | ".join(f"{lv:g}" for lv in levels) + " |",
                  "|---|" + "---|" * len(levels)]  # fmt: skip
        for m in methods:
            rs = [r["shift"][name] for r in shifted if r["method"] == m and name in r["shift"]]
            if not rs:
                continue
            cells = []
            for lv in levels:
                vals = [r[str(lv)] for r in rs if str(lv) in r]
                if not vals:
                    cells.append("–")
                    continue
                acc, nll, ece = (statistics.fmean(v[k] for v in vals) for k in ("accuracy", "nll", "ece"))
                cells.append(f"{100 * acc:.1f} / {nll:.2f} / {100 * ece:.1f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _write_rows(path: Path, rows: list[dict]) -> None:
    """``results.json`` written whole, then renamed over the old one: a run killed while writing
    leaves the previous rows, not a truncated file (which lost every row to a JSON error)."""
    text = json.dumps(rows, indent=2)
    write_atomic(path, lambda tmp: tmp.write_text(text))


def _read_rows(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a bench results file ({e}); move it away or use another "
                         "--out") from None
    if not (isinstance(rows, list) and all(isinstance(r, dict) and {"task", "method", "seed"} <= r.keys()
                                           for r in rows)):  # fmt: skip
        raise ValueError(f"{path} is not a bench results file (a list of rows with task, method and seed)")
    return rows


def merge(dirs, out, log=print):
    """Combine the ``results.json`` of several bench directories (e.g. job-array shards) into
    ``out``: rows deduplicated by (task, method, seed), then ``results.md`` and the shift curves."""
    rows, seen, protocol = [], set(), {}
    for d in dirs:
        path = Path(d) / "results.json"
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        for r in _read_rows(path):
            key = (r["task"], r["method"], r["seed"])
            how = {"epochs": r.get("epochs"), "subset": r.get("subset")}
            first = protocol.setdefault(r["task"], (how, path))
            if how != first[0]:  # one table, one protocol per task
                raise ValueError(f"{r['task']}: {first[1]} has rows run with {first[0]}, {path} with {how}; "
                                 "merge only shards of the same run")  # fmt: skip
            if key not in seen:
                seen.add(key)
                rows.append(r)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_rows(out / "results.json", rows)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = report(rows, tasks, methods)
    (out / "results.md").write_text(table + "\n")
    _shift_plots(rows, tasks, methods, out)
    log(table)
    return rows


def _shift_plots(rows, tasks, methods, out):
    for t in tasks:  # shift curves over every seed in results.json
        if t not in TASKS or not TASKS[t].shifts:
            continue
        for name, (label, _, _) in TASKS[t].shifts.items():
            shifted = {}
            for r in rows:
                if r["task"] == t and r["method"] in methods and name in (r.get("shift") or {}):
                    for lv, v in r["shift"][name].items():
                        shifted.setdefault(r["method"], {}).setdefault(float(lv), []).append(v)
            if shifted:
                plots.shift_curves(shifted, out / f"shift_{t}_{name}.png", label)


def _tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch's module needs the tensorboard package
        raise ValueError(
            "TensorBoard logging needs the tensorboard package: pip install 'effortless-bayes[tensorboard]'"
        ) from err
    return SummaryWriter


def _log_tensorboard(row, root):
    """One run as TensorBoard scalars: ``train/loss`` per epoch (step = epoch, from 1), every scalar
    test metric under ``test/`` (at the last epoch), and the shift suites under
    ``shift/<suite>/<metric>`` with the shift intensity as the step (``shift/<suite>_x100/<metric>``
    and 100 × the intensity where intensities are fractional)."""
    logdir = Path(root) / row["task"] / row["method"] / f"seed{row['seed']}"
    writer = _tensorboard_writer_class()(log_dir=str(logdir))
    try:
        curve = row.get("train_loss_per_epoch") or []
        for e, loss in enumerate(curve, start=1):
            writer.add_scalar("train/loss", loss, e)
        last = max(len(curve), 1)
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("seed", "epochs"):
                writer.add_scalar(f"test/{k}", v, last)
        for suite, levels in (row.get("shift") or {}).items():
            whole = all(float(lv).is_integer() for lv in levels)  # degrees, pixels: the step itself
            tag = f"shift/{suite}" if whole else f"shift/{suite}_x100"  # else 100 × intensity
            for lv, vals in levels.items():
                for k, v in vals.items():
                    writer.add_scalar(f"{tag}/{k}", v, round(float(lv) * (1 if whole else 100)))
    finally:
        writer.close()


def _write_csv(rows, path):
    """One line per row with its scalar fields (the nested shift results stay in results.json)."""
    import csv

    fields = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
