"""Acquisition functions: small pure functions of a (N, C, S) tensor of predictive log-probabilities.

``log_probs[n, c, s] = log p(y = c | x_n, θ_s)`` for N pool points, C classes and S posterior
samples (weight draws, dropout masks, ensemble members, or output-space draws of a linearised
predictive): what :func:`effortless.predict_samples` returns, and the layout baal's heuristics
use (as probabilities); batchbald_redux takes it transposed, (N, S, C). Each scoring function
returns one score per point, higher = more worth a label; :func:`select` turns scores into a
batch of indices; :func:`batchbald` chooses a batch jointly.

With ``p̄ = mean_s p_s``:

* ``max_entropy``: H[p̄], the total predictive uncertainty;
* ``bald``: H[p̄] − mean_s H[p_s], the mutual information between the label and the weights
  (Houlsby et al. 2011): zero when the samples agree, large when each is confident but they
  disagree;
* ``variation_ratios``: 1 − max_c p̄_c;
* ``mean_std``: mean over classes of the standard deviation of p_c over samples;
* ``random``: uniform scores (the baseline);
* ``batchbald``: greedy maximisation of the joint mutual information I(y_1..y_K; θ)
  (Kirsch et al. 2019), exact while the label configurations of the chosen points number at most
  ``max_configs``, estimated from ``n_configs`` sampled configurations after that.

Example:
    >>> import torch
    >>> agree = torch.tensor([[0.9, 0.1]] * 4).T.log()          # (C=2, S=4): all samples agree
    >>> disagree = torch.tensor([[0.99, 0.01], [0.01, 0.99]] * 2).T.log()
    >>> scores = bald(torch.stack([agree, disagree]))
    >>> round(float(scores[0]), 6), bool(scores[1] > 0.6)
    (0.0, True)
"""

from __future__ import annotations

import math

import torch

from .._checks import is_count

__all__ = [
    "ACQUISITIONS", "random", "max_entropy", "bald", "variation_ratios", "mean_std", "batchbald",
    "select", "predictive_entropy", "expected_entropy",
]  # fmt: skip


def _check(log_probs: torch.Tensor) -> torch.Tensor:
    if not isinstance(log_probs, torch.Tensor) or log_probs.ndim != 3:
        shape = tuple(log_probs.shape) if isinstance(log_probs, torch.Tensor) else type(log_probs).__name__
        raise ValueError(f"log_probs must be a (N, C, S) tensor of log-probabilities, got {shape}")
    if not log_probs.is_floating_point():
        raise ValueError(f"log_probs must be floating point, got {log_probs.dtype}")
    if log_probs.numel() and not bool((log_probs <= 1e-4).all()):
        raise ValueError("log_probs must be log-probabilities (<= 0); did you pass logits or probabilities?")
    lp = log_probs.double()
    if lp.numel():  # each sample's classes sum to 1: catches the (N, S, C) layout and a wrong-dim softmax
        err = float(torch.logsumexp(lp, 1).abs().max())
        if not err <= 1e-3:  # (NaN too)
            raise ValueError(
                f"log_probs[n, :, s] must be normalised over the classes (dim 1), but logsumexp over dim 1 "
                f"is off by up to {err:.3g}: is the layout (N, S, C) (batchbald_redux's)? pass "
                "log_probs.permute(0, 2, 1)"
            )
    return lp


def _entropy(log_p: torch.Tensor, dim: int) -> torch.Tensor:
    return -(log_p.exp() * log_p).nan_to_num().sum(dim)  # 0·log 0 = 0


def predictive_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H[mean_s p_s], shape (N,)."""
    lp = _check(log_probs)
    mean_lp = torch.logsumexp(lp, -1) - math.log(lp.shape[-1])
    return _entropy(mean_lp, -1)


def expected_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """mean_s H[p_s], shape (N,)."""
    return _entropy(_check(log_probs), 1).mean(-1)


def max_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return predictive_entropy(log_probs)


def bald(log_probs: torch.Tensor) -> torch.Tensor:
    return (predictive_entropy(log_probs) - expected_entropy(log_probs)).clamp_min(0.0)


def variation_ratios(log_probs: torch.Tensor) -> torch.Tensor:
    return 1.0 - _check(log_probs).exp().mean(-1).max(-1).values


def mean_std(log_probs: torch.Tensor) -> torch.Tensor:
    return _check(log_probs).exp().std(-1, unbiased=False).mean(-1)


def random(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    lp = _check(log_probs)
    return torch.rand(lp.shape[0], generator=generator, dtype=torch.float64)


def batchbald(
    log_probs: torch.Tensor,
    k: int,
    max_configs: int = 4096,
    n_configs: int = 2048,
    generator: torch.Generator | None = None,
    chunk_numbers: int = 2**23,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy BatchBALD: ``k`` indices and the joint mutual information after each pick.

    Each step adds the point maximising ``I(y_chosen, y_n; θ) = H(y_chosen, y_n) − Σ H(y_i | θ)``.
    The joint entropy sums over label configurations of the chosen points: exactly while there are
    at most ``max_configs`` of them (C^|chosen|), else by importance sampling over ``n_configs``
    configurations drawn from the joint predictive (redrawn after each pick, from ``generator``).
    With ``k = 1`` this is BALD.
    """
    lp = _check(log_probs).cpu()  # (its configurations and joint are built on the CPU)
    n, c, s = lp.shape
    if not (is_count(k) and k <= n):
        raise ValueError(f"k must be an int in [1, {n}] (the number of pool points), got {k!r}")
    if max_configs < 1 or n_configs < 1:
        raise ValueError(f"max_configs and n_configs must be >= 1, got {max_configs}, {n_configs}")
    p = lp.exp()  # (N, C, S)
    cond = expected_entropy(lp)  # (N,)
    chosen: list[int] = []
    scores: list[float] = []
    joint = torch.ones(1, s, dtype=torch.float64)  # P[m, s] = Π_chosen p_s(ŷ_m,i): configurations × samples
    sampled = False
    available = torch.ones(n, dtype=torch.bool)
    for _ in range(k):
        m = joint.shape[0]
        h = torch.empty(n, dtype=torch.float64)
        step = max(1, chunk_numbers // (m * c))
        weight = joint.mean(-1)  # p(ŷ_m) under the joint predictive (sampled mode)
        joint_t = joint.T / s  # (S, M)
        for i in range(0, n, step):
            chunk = p[i : i + step]
            q = (chunk.reshape(-1, s) @ joint_t).view(len(chunk), c, m)  # p(y_n = c, ŷ_m)
            plogq = q.xlogy_(q)  # q log q in place (0 where q = 0)
            if sampled:  # ŷ_m ~ p(ŷ): H ≈ −mean_m Σ_c q(c, ŷ_m) log q(c, ŷ_m) / p(ŷ_m)
                h[i : i + step] = -(plogq.sum(1) @ weight.reciprocal()) / m
            else:
                h[i : i + step] = -plogq.sum((-2, -1))
        score = h - cond - (cond[chosen].sum() if chosen else 0.0)
        score[~available] = -math.inf
        best = int(score.argmax())
        chosen.append(best)
        scores.append(float(score[best]))
        available[best] = False
        if len(chosen) == k:
            break
        if m * c <= max_configs and not sampled:
            joint = (joint[:, None, :] * p[best][None, :, :]).reshape(m * c, s)
        else:
            sampled = True
            joint = _sample_configs(p[chosen], n_configs, generator)
    return torch.tensor(chosen), torch.tensor(scores, dtype=torch.float64)


def _sample_configs(p_chosen: torch.Tensor, n_configs: int, generator) -> torch.Tensor:
    """Draw label configurations of the chosen points from their joint predictive; return their
    likelihood under every sample, (n_configs, S)."""
    k, c, s = p_chosen.shape
    which = torch.randint(0, s, (n_configs,), generator=generator)  # θ_s ~ uniform over samples
    probs = p_chosen[:, :, which].permute(2, 0, 1).reshape(-1, c)  # (n_configs·k, C)
    labels = torch.multinomial(probs, 1, generator=generator).reshape(n_configs, k)
    # P[m, s] = Π_i p_s(ŷ_m,i | x_i)
    picked = p_chosen[torch.arange(k)[None, :], labels, :]  # (n_configs, k, S)
    return picked.prod(1)


ACQUISITIONS = {
    "random": random,
    "max-entropy": max_entropy,
    "bald": bald,
    "variation-ratios": variation_ratios,
    "mean-std": mean_std,
    "batchbald": batchbald,
}


def select(
    name: str, log_probs: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices (into the N points) of the ``k`` points to label next, by acquisition ``name``.

    Scoring functions take the top ``k`` (ties broken at random by ``generator``); ``batchbald``
    selects jointly.
    """
    if name not in ACQUISITIONS:
        raise ValueError(f"acquisition must be one of {sorted(ACQUISITIONS)}, got {name!r}")
    n = log_probs.shape[0] if isinstance(log_probs, torch.Tensor) else 0
    if not (is_count(k) and k <= n):
        raise ValueError(f"k must be an int in [1, {n}] (the number of pool points), got {k!r}")
    if name == "batchbald":
        return batchbald(log_probs, k, generator=generator)[0]
    if isinstance(log_probs, torch.Tensor):  # (scored and tie-broken on the CPU, with a CPU generator)
        log_probs = log_probs.detach().cpu()
    if name == "random":
        scores = random(log_probs, generator)
    else:
        scores = ACQUISITIONS[name](log_probs)
        # random tie-break, far below any real score difference
        scores = scores + 1e-9 * torch.rand(n, generator=generator, dtype=torch.float64)
    return scores.topk(k).indices
