"""Plots a person reads instead of tables (matplotlib, PNG, no display needed).

Figures are ``matplotlib.figure.Figure`` objects, not pyplot's: no backend is chosen and no
global figure list grows (``matplotlib.use("Agg")`` here switched a notebook's inline backend off
for the rest of the session, as soon as a bench or demo module was imported).
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from .. import metrics


def figure(**kwargs) -> Figure:
    """A figure of its own (``Figure(**kwargs)``): saved with ``savefig``, never shown."""
    return Figure(**kwargs)


def _grid(n: int, w: float, h: float, max_cols: int = 4):
    """A grid of at most ``max_cols`` panels a row; surplus axes hidden. Returns (fig, axes list)."""
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig = figure(figsize=(w * cols, h * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def reliability_diagram(results: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, n_bins=15):
    """Accuracy against confidence per method; ``results`` maps name -> (probs, labels)."""
    fig, axes = _grid(len(results), 4.0, 4.0)
    for ax, (name, (probs, labels)) in zip(axes, results.items()):
        conf, acc, count = metrics.calibration_bins(probs, labels, n_bins)
        edges = torch.linspace(0, 1, n_bins + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        mask = count > 0
        ax.bar(centers[mask], acc[mask], width=1 / n_bins, edgecolor="k", alpha=0.7, label="accuracy")
        ax.bar(centers[mask], (conf - acc)[mask], bottom=acc[mask], width=1 / n_bins, color="tab:red",
               alpha=0.3, label="gap to confidence")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ece = metrics.ece(probs, labels, n_bins)
        ax.set(title=f"{name}  (ECE {100 * ece:.2f} %)", xlabel="confidence", ylabel="accuracy",
               xlim=(0, 1), ylim=(0, 1))  # fmt: skip
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def confidence_histogram(results: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path):
    """Max-probability histograms, in- vs out-of-distribution; ``results``: name -> (probs_in, probs_out)."""
    fig, axes = _grid(len(results), 4.0, 3.5)
    bins = torch.linspace(0, 1, 31).numpy()
    for ax, (name, (p_in, p_out)) in zip(axes, results.items()):
        c_in, c_out = p_in.max(-1).values.numpy(), p_out.max(-1).values.numpy()
        ax.hist(c_in, bins=bins, alpha=0.6, density=True, label="in-distribution")
        ax.hist(c_out, bins=bins, alpha=0.6, density=True, label="out-of-distribution")
        auroc = metrics.auroc(p_in.max(-1).values, p_out.max(-1).values)
        ax.set(title=f"{name}  (AUROC {100 * auroc:.1f} %)", xlabel="max probability", ylabel="density")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def shift_curves(results: dict[str, dict[float, list[dict]]], path: str | Path, xlabel: str):
    """Accuracy, NLL and ECE against shift intensity; ``results``: method -> intensity -> rows
    (one per seed, each with accuracy / nll / ece); the line is the mean, the band ± one std."""
    fig = figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    for name, by_level in results.items():
        levels = sorted(by_level)
        for ax, key, scale in zip(axes, ("accuracy", "nll", "ece"), (100, 1, 100)):
            vals = torch.tensor([[scale * r[key] for r in by_level[lv]] for lv in levels],
                                dtype=torch.float64)  # fmt: skip
            mean = vals.mean(1)
            sd = vals.std(1, unbiased=True) if vals.shape[1] > 1 else torch.zeros_like(mean)
            (line,) = ax.plot(levels, mean, marker="o", ms=3, label=name)
            ax.fill_between(levels, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
    for ax, label in zip(axes, ("accuracy %", "NLL", "ECE %")):
        ax.set(xlabel=xlabel, ylabel=label)
    axes[0].legend(fontsize=8)
    fig.suptitle("Under distribution shift")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def regression_band(x_train, y_train, x_test, curves: dict[str, tuple], path: str | Path, truth=None):
    """Predictive mean ± 2 std per method on a 1-D input; ``curves``: name -> (mean, std)."""
    cols = 2 if len(curves) == 4 else min(len(curves), 3)  # rows of three at most (four as 2 × 2)
    rows = -(-len(curves) // cols)
    fig = figure(figsize=(5 * cols, 3.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    xs = x_test[:, 0].numpy()
    for ax, (name, (mean, std)) in zip(axes.flat, curves.items()):
        m, s = mean[:, 0].numpy(), std[:, 0].numpy()
        ax.fill_between(xs, m - 2 * s, m + 2 * s, alpha=0.3, label="mean ± 2 std")
        ax.plot(xs, m, lw=2, label="predictive mean")
        if truth is not None:
            ax.plot(xs, truth[:, 0].numpy(), "k--", lw=1, label="truth")
        ax.scatter(x_train[:, 0].numpy(), y_train[:, 0].numpy(), s=8, c="k", alpha=0.6, label="data")
        ax.set(title=name, xlabel="x", ylabel="y", ylim=(-3, 3))
        ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
