"""Metrics of predictive quality and uncertainty (torch only).

Classification metrics take predictive probabilities ``probs`` (N, C) and labels (N,).

Example:
    >>> import torch
    >>> probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    >>> labels = torch.tensor([0, 1, 1])
    >>> round(accuracy(probs, labels), 4), round(brier(probs, labels), 4)
    (0.6667, 0.44)
    >>> auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.85]))
    0.75
"""

from __future__ import annotations

import functools
import math

import torch

from . import likelihoods
from ._checks import is_count, is_number

__all__ = [
    "accuracy", "nll", "ece", "ece_floor", "calibration_bins", "calibration_sums", "mce", "brier",
    "auroc", "aupr", "fpr_at_tpr", "aurc", "entropy", "mutual_information", "classification_report",
    "gaussian_nll", "rmse", "picp", "quantile_calibration_error",
]  # fmt: skip


def _on_cpu(fn):
    """Evaluate on the CPU: tensor arguments are detached and moved there first (a no-op for CPU
    tensors). The binned and ranked metrics build their bins and ranks on the CPU, so CUDA
    predictions (a Lightning callback on a GPU run) failed in index_add_ with a device mismatch."""

    def moved(a):
        if not isinstance(a, torch.Tensor):
            return a
        a = a.detach().cpu()
        # labels of any integer width as int64 (uint8 ones, as IDX files hold them, failed in gather)
        return a.long() if likelihoods._is_integer(a) and a.dtype != torch.int64 else a

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*[moved(a) for a in args], **{k: moved(v) for k, v in kwargs.items()})

    return wrapper


def _check_classification(probs: torch.Tensor, labels: torch.Tensor) -> None:
    """Probabilities (N, C) and integer labels (N,) in range: labels of shape (N, 1) broadcast
    against (N,) to an (N, N) comparison, and logits passed as probabilities give a number, both
    silently wrong."""
    if probs.dim() != 2:
        raise ValueError(f"probs must be (N, C) predictive probabilities, got shape {tuple(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(
            f"labels must have shape ({probs.shape[0]},) to match probs {tuple(probs.shape)}, got "
            f"{tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]):
        raise ValueError(
            f"labels must lie in [0, {probs.shape[1]}), got {int(labels.min())}..{int(labels.max())}"
        )
    p = probs.detach().double()
    if not bool(torch.isfinite(p).all()):
        raise ValueError("probs has NaN or inf entries")
    tol = 1e-2 if probs.dtype in (torch.float16, torch.bfloat16) else 1e-4
    sums = p.sum(-1)
    if len(p) and (float(p.min()) < 0 or float((sums - 1).abs().max()) > tol):
        raise ValueError(
            f"probs must be probabilities (non-negative, rows summing to 1); got entries down to "
            f"{float(p.min()):.3g} and row sums {float(sums.min()):.4g}..{float(sums.max()):.4g} "
            "(logits? pass probs = logits.softmax(-1))"
        )


def _check_scores(*scores: torch.Tensor) -> None:
    for s in scores:
        if s.dim() != 1:
            raise ValueError(f"scores must be 1-D (one per input), got shape {tuple(s.shape)}")
        if not len(s):
            raise ValueError("scores must not be empty")
        if not bool(torch.isfinite(s).all()):
            raise ValueError("scores have NaN or inf entries")


def _check_regression(mean: torch.Tensor, y: torch.Tensor, var: torch.Tensor | None = None) -> None:
    """Same shapes (a (N, 1) mean against (N,) targets broadcast to (N, N), silently) and a
    positive, finite variance."""
    if mean.shape != y.shape:
        raise ValueError(
            f"mean {tuple(mean.shape)} and y {tuple(y.shape)} must have the same shape "
            "(reshape one: they would broadcast)"
        )
    if var is not None:
        if var.shape != mean.shape:
            raise ValueError(f"var {tuple(var.shape)} must have the shape of mean {tuple(mean.shape)}")
        if not bool(torch.isfinite(var).all()) or bool((var <= 0).any()):
            raise ValueError("var must be positive and finite everywhere")


@_on_cpu
def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    _check_classification(probs, labels)
    return float((probs.argmax(-1) == labels).double().mean())


@_on_cpu
def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log predictive probability of the true label."""
    _check_classification(probs, labels)
    p = probs.gather(-1, labels[:, None]).squeeze(-1).double()
    return float(-(p.clamp_min(eps)).log().mean())


@_on_cpu
def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over samples of ``Σ_c (p_c − 1[y = c])²``."""
    _check_classification(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).to(torch.float64)
    return float((probs.double() - onehot).pow(2).sum(-1).mean())


def _bin_index(conf: torch.Tensor, n_bins: int, adaptive: bool) -> torch.Tensor:
    """Each confidence's bin: equal-width on [0, 1], or equal-mass (sorted by confidence)."""
    if not is_count(n_bins):
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    if adaptive:
        # rank r goes to bin r·n_bins // N; tied confidences (saturated float32 probabilities are
        # exactly 1) all go to the bin of the tie's first rank, so no bin edge splits a tie in
        # the order the inputs came in
        sorted_conf, order = torch.sort(conf, stable=True)
        first = torch.ones(len(conf), dtype=torch.bool)
        first[1:] = sorted_conf[1:] != sorted_conf[:-1]
        rank = torch.arange(len(conf))
        tie_start = torch.cummax(torch.where(first, rank, 0), 0).values
        idx = torch.empty_like(order)
        idx[order] = tie_start * n_bins // max(len(conf), 1)
        return idx
    return (conf * n_bins).long().clamp(0, n_bins - 1)


@_on_cpu
def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, adaptive: bool = False):
    """Confidence bins: (bin confidence, bin accuracy, bin count), each (n_bins,).

    Equal-width bins on [0, 1], or with ``adaptive=True`` equal-mass bins (each holds ~N/n_bins
    predictions, sorted by confidence).
    """
    sum_conf, sum_acc, count = calibration_sums(probs, labels, n_bins, adaptive)
    safe = count.clamp_min(1)
    return sum_conf / safe, sum_acc / safe, count


@_on_cpu
def calibration_sums(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, adaptive: bool = False):
    """Per confidence bin: (sum of the top-class confidences, number correct, count), each (n_bins,)
    in float64. With equal-width bins these add over disjoint parts of a test set (shards of a
    distributed evaluation): the ECE of the whole is Σ_b |Σ conf − Σ correct| / N of the summed bins."""
    _check_classification(probs, labels)
    conf, pred = probs.double().max(-1)
    correct = (pred == labels).double()
    idx = _bin_index(conf, n_bins, adaptive)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    return sum_conf, sum_acc, count


@_on_cpu
def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15, adaptive: bool = False) -> float:
    """Expected calibration error (fraction, not %), equal-width or equal-mass (adaptive) bins."""
    conf, acc, count = calibration_bins(probs, labels, n_bins, adaptive)
    return float(((conf - acc).abs() * count).sum() / count.sum())


@_on_cpu
def ece_floor(
    probs: torch.Tensor,
    n_bins: int = 15,
    adaptive: bool = False,
    n_draws: int = 1000,
    generator: torch.Generator | None = None,
) -> float:
    """The ECE a perfectly calibrated predictor with these confidences would show on this many
    test points: the mean of :func:`ece` over ``n_draws`` label sets in which each top-class
    prediction is correct with probability equal to its confidence (fraction, not %).

    ECE from a finite test set is biased upwards by the bins' sampling noise, most where bins hold
    few points (a small test set, or low confidences spread over many bins): an ECE near this floor
    is calibrated within what the test set can resolve; compare methods by how far above it they are.
    """
    _check_classification(probs, torch.zeros(probs.shape[0], dtype=torch.long))
    if not is_count(n_draws):
        raise ValueError(f"n_draws must be a positive int, got {n_draws!r}")
    conf = probs.double().max(-1).values
    idx = _bin_index(conf, n_bins, adaptive)  # (the bins do not depend on the labels)
    # each draw: every prediction right with probability conf; per bin |Σ (conf − right)| / N
    right = (torch.rand(n_draws, len(conf), generator=generator, dtype=torch.float64) < conf).double()
    gap = torch.zeros(n_draws, n_bins, dtype=torch.float64).index_add_(1, idx, conf - right)
    return float(gap.abs().sum(1).mean() / max(len(conf), 1))


@_on_cpu
def mce(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Maximum calibration error over the non-empty equal-width bins."""
    conf, acc, count = calibration_bins(probs, labels, n_bins)
    return float((conf - acc).abs()[count > 0].max())


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy per row, in nats."""
    p = probs.double().clamp_min(1e-30)
    return -(p * p.log()).sum(-1)


def mutual_information(sample_probs: torch.Tensor) -> torch.Tensor:
    """BALD / epistemic part: H[mean_s p_s] − mean_s H[p_s], for per-sample probabilities (S, B, C)."""
    return entropy(sample_probs.mean(0)) - entropy(sample_probs).mean(0)


@_on_cpu
def aupr(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Average precision for detecting the in-distribution (positive) inputs by a higher score."""
    _check_scores(scores_in, scores_out)
    s = torch.cat([scores_in, scores_out]).double()
    pos = torch.cat([torch.ones(len(scores_in)), torch.zeros(len(scores_out))]).double()
    order = torch.argsort(s, descending=True, stable=True)
    s, pos = s[order], pos[order]
    tp = pos.cumsum(0)
    precision = tp / torch.arange(1, len(s) + 1, dtype=torch.float64)
    # one point per distinct threshold: the last index of every run of tied scores
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    recall_gain = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), tp[last]])) / pos.sum()
    return float((precision[last] * recall_gain).sum())


@_on_cpu
def fpr_at_tpr(scores_in: torch.Tensor, scores_out: torch.Tensor, tpr: float = 0.95) -> float:
    """Fraction of out-of-distribution inputs kept (score ≥ threshold) at the highest threshold
    that keeps at least ``tpr`` of the in-distribution ones: the ROC curve's lowest false-positive
    rate at a true-positive rate ≥ ``tpr`` (as read off ``sklearn.metrics.roc_curve``)."""
    _check_scores(scores_in, scores_out)
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    # the k-th highest in-score keeps k of them (ties keep more); k = ⌈tpr·n⌉, where tpr·n
    # rounds up past an integer (0.95 · 60 = 57.000000000000007) only by round-off
    k = max(1, math.ceil(tpr * len(scores_in) - 1e-9))
    threshold = torch.sort(scores_in.double(), descending=True).values[k - 1]
    return float((scores_out.double() >= threshold).double().mean())


@_on_cpu
def aurc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the risk-coverage curve of selective prediction by confidence (lower is better).

    The mean over k = 1..N of the error rate among the k most confident predictions; within a run
    of tied confidences (which no threshold can separate) the errors count at the tie's mean rate,
    the average over the tie's orderings, so the result does not depend on the inputs' order."""
    _check_classification(probs, labels)
    conf, pred = probs.double().max(-1)
    order = torch.argsort(conf, descending=True, stable=True)
    conf, errors = conf[order], (pred[order] != labels[order]).double()
    _, tie, size = torch.unique_consecutive(conf, return_inverse=True, return_counts=True)
    rate = torch.zeros(len(size), dtype=torch.float64).index_add_(0, tie, errors) / size
    risk = rate[tie].cumsum(0) / torch.arange(1, len(errors) + 1, dtype=torch.float64)
    return float(risk.mean())


@_on_cpu
def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve for telling in- (positive) from out-of-distribution by score.

    Mann-Whitney form with ties counted half: P(score_in > score_out) + ½ P(equal).
    """
    _check_scores(scores_in, scores_out)
    s = torch.cat([scores_in, scores_out]).double()
    ranks = _average_ranks(s)
    n_in, n_out = len(scores_in), len(scores_out)
    r_in = ranks[:n_in].sum()
    return float((r_in - n_in * (n_in + 1) / 2) / (n_in * n_out))


def _average_ranks(s: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    # average the ranks of tied values
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks_sorted = avg[inverse]
    ranks = torch.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def classification_report(
    probs: torch.Tensor, labels: torch.Tensor, probs_ood: torch.Tensor | None = None
) -> dict[str, float]:
    """accuracy, nll, ece, brier and, with OOD probabilities, the OOD detection scores: AUROC from
    the max probability (``ood_auroc``) and from the predictive entropy (``ood_auroc_entropy``),
    AUPR and FPR at 95 % TPR from the max probability (in-distribution is the positive class)."""
    out = {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": ece(probs, labels),
        "brier": brier(probs, labels),
    }
    if probs_ood is not None:
        s_in, s_out = probs.max(-1).values, probs_ood.max(-1).values
        out["ood_auroc"] = auroc(s_in, s_out)
        out["ood_auroc_entropy"] = auroc(-entropy(probs), -entropy(probs_ood))
        out["ood_aupr"] = aupr(s_in, s_out)
        out["ood_fpr95"] = fpr_at_tpr(s_in, s_out, 0.95)
    return out


def regression_report(mean, var, y, y_scale: float = 1.0) -> dict[str, float]:
    """RMSE and Gaussian NLL in the original target units (the inputs are standardised by
    ``y_scale``: RMSE scales by it, the NLL per point shifts by log y_scale), 95 % interval
    coverage (picp) and the quantile calibration error (qce)."""
    if not (is_number(y_scale) and math.isfinite(y_scale) and y_scale > 0):
        raise ValueError(f"y_scale must be a finite number > 0, got {y_scale!r}")
    return {
        "rmse": rmse(mean, y) * y_scale,
        "nll": gaussian_nll(mean, var, y) + math.log(y_scale),
        "picp": picp(mean, var, y),
        "qce": quantile_calibration_error(mean, var, y),
    }


@_on_cpu
def gaussian_nll(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor) -> float:
    """Mean Gaussian negative log-likelihood of ``y`` under ``N(mean, var)``."""
    _check_regression(mean, y, var)
    var = var.double()
    return float((0.5 * (torch.log(2 * torch.pi * var) + (y.double() - mean.double()) ** 2 / var)).mean())


@_on_cpu
def rmse(mean: torch.Tensor, y: torch.Tensor) -> float:
    _check_regression(mean, y)
    return float((mean.double() - y.double()).pow(2).mean().sqrt())


@_on_cpu
def picp(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor, level: float = 0.95) -> float:
    """Prediction-interval coverage: the fraction of ``y`` inside the central ``level`` interval."""
    _check_regression(mean, y, var)
    if not (is_number(level) and 0 < level < 1):  # (95 for 95 % gave a coverage of 0, silently)
        raise ValueError(f"level must be a fraction in (0, 1), got {level!r}")
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2, dtype=torch.float64))
    half = z * var.double().sqrt()
    return float(((y.double() - mean.double()).abs() <= half).double().mean())


@_on_cpu
def quantile_calibration_error(mean: torch.Tensor, var: torch.Tensor, y: torch.Tensor, n_levels=20) -> float:
    """Mean |observed − expected| frequency of ``y`` below the predictive quantiles at ``n_levels``
    levels in (0, 1) (Kuleshov et al., 2018)."""
    _check_regression(mean, y, var)
    if not is_count(n_levels):
        raise ValueError(f"n_levels must be a positive int, got {n_levels!r}")
    u = torch.distributions.Normal(mean.double(), var.double().sqrt()).cdf(y.double()).reshape(-1)
    levels = (torch.arange(1, n_levels + 1, dtype=torch.float64)) / (n_levels + 1)
    observed = (u[None, :] <= levels[:, None]).double().mean(1)
    return float((observed - levels).abs().mean())
