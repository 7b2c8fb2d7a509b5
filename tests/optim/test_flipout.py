"""Flipout noise for per-rank samples under DDP (``distributed="flipout"``), without a process group:
the sign draws, the marginals of the ranks' samples, and the unbiasedness of the curvature
estimate ḡ ⊙ Σ_r ε_r / σ built from them, on a quadratic whose Hessian is known."""

import math

import pytest
import torch

from effortless.optim.bayesadam import flipout_signs, random_signs


def _gen_for(seed, q):
    return torch.Generator().manual_seed(seed * 7919 + q)


def test_random_signs_are_balanced_independent_and_reproducible():
    n = 200_003  # not a multiple of 8 or 64
    s = random_signs(n, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert s.shape == (n,) and set(s.unique().tolist()) == {-1.0, 1.0}
    bound = 5 / math.sqrt(n)
    assert abs(float(s.mean())) < bound
    for lag in (1, 7, 8, 63, 64):  # bits within a byte, across bytes and across words
        assert abs(float((s[lag:] * s[:-lag]).mean())) < bound, lag
    assert torch.equal(s, random_signs(n, torch.Generator().manual_seed(0), dtype=torch.float64))
    assert not torch.equal(s, random_signs(n, torch.Generator().manual_seed(1), dtype=torch.float64))


def test_every_rank_computes_the_same_sum_of_signs():
    outs = [flipout_signs(5, r, 3, 1000, _gen_for, dtype=torch.float64) for r in range(3)]
    total = sum(own for own, _ in outs)
    for _, t in outs:
        assert torch.equal(t, total)
    assert not torch.equal(outs[0][0], outs[1][0])


@pytest.mark.parametrize("world", [2, 3])
def test_flipout_curvature_estimate_is_unbiased_and_gradient_variance_matches_independent(world):
    """K independent copies of a 4-d quadratic ½θᵀAθ − bᵀθ (A dense) in one draw. Each "rank"
    takes the gradient at μ + σ ⊙ ζ ⊙ s_r; DDP averages them. Checks: ε_r ~ N(0, 1) marginally and
    uncorrelated across ranks; E[ḡ ⊙ Σ_r ε_r / σ] = diag(A); Cov(ḡ) = A diag(σ²) A / R, what
    independent per-rank draws give (a shared sample would give R times that)."""
    d, K = 4, 50_000
    g = torch.Generator().manual_seed(0)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = m @ m.T + d * torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    sigma = torch.rand(d, generator=g, dtype=torch.float64) * 0.5 + 0.1
    zeta = torch.randn(K, d, generator=g, dtype=torch.float64)
    signs = [flipout_signs(11, r, world, K * d, _gen_for, dtype=torch.float64) for r in range(world)]
    eps = [zeta * own.view(K, d) for own, _ in signs]
    total = signs[0][1].view(K, d)
    grads = [(mu + sigma * e) @ A - b for e in eps]  # A symmetric
    gbar = sum(grads) / world
    est = gbar * zeta * total / sigma

    for e in eps:  # marginals N(0, 1)
        assert abs(float(e.mean())) < 5 / math.sqrt(K * d)
        assert abs(float(e.var()) - 1) < 5 * math.sqrt(2 / (K * d))
    corr = float((eps[0] * eps[1]).mean())
    assert abs(corr) < 5 / math.sqrt(K * d)  # uncorrelated across ranks

    se = est.std(0) / math.sqrt(K)
    assert torch.all((est.mean(0) - A.diagonal()).abs() < 5 * se), (est.mean(0), A.diagonal())

    cov = torch.cov(gbar.T)
    expected = A @ torch.diag(sigma**2) @ A / world
    rel = float(torch.linalg.norm(cov - expected) / torch.linalg.norm(expected))
    assert rel < 0.05, rel
    shared = A @ torch.diag(sigma**2) @ A  # what one shared sample would give: R× larger
    assert float(torch.linalg.norm(cov - shared) / torch.linalg.norm(shared)) > 0.3
