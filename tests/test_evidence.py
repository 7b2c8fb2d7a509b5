"""Laplace evidence and prior tuning against Bayesian linear regression in closed form."""

import math

import torch
from torch import nn

import effortless as ef
from effortless.posterior import evidence


def _orthogonal_design(n=200, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    scales = 1 + 4 * torch.rand(d, generator=g, dtype=torch.float64)
    return q * scales * math.sqrt(n / d), g  # XᵀX diagonal: the diagonal Laplace is exact


def _closed_form_log_evidence(X, y, sigma, delta):
    n = X.shape[0]
    cov = sigma**2 * torch.eye(n, dtype=X.dtype) + X @ X.T / delta
    return torch.distributions.MultivariateNormal(torch.zeros(n, dtype=X.dtype), cov).log_prob(y[:, 0])


def _laplace_at_map(X, y, sigma, delta):
    A = X.T @ X / sigma**2 + delta * torch.eye(X.shape[1], dtype=X.dtype)
    w = torch.linalg.solve(A, X.T @ y / sigma**2)
    model = nn.Linear(X.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w.T)
    return model


def test_log_marginal_likelihood_equals_closed_form_evidence():
    X, g = _orthogonal_design()
    sigma, delta = 0.7, 3.0
    y = X @ torch.randn(20, 1, generator=g, dtype=torch.float64) / math.sqrt(delta) + sigma * torch.randn(
        200, 1, generator=g, dtype=torch.float64
    )
    model = _laplace_at_map(X, y, sigma, delta)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=50)
    post = ef.laplace(model, loader, likelihood="regression", hessian="ggn", prior_precision=delta,
                      sigma_noise=sigma)  # fmt: skip
    with torch.no_grad():
        nll = float(ef.likelihoods.get("regression", sigma).nll(model(X), y).sum())
    curvature = {k: v - delta for k, v in post.precision.items()}
    got = evidence.log_marginal_likelihood(nll, post.mean, curvature, delta)
    torch.testing.assert_close(got, _closed_form_log_evidence(X, y, sigma, delta), rtol=1e-10, atol=1e-8)


def test_marglik_recovers_the_true_prior_precision():
    X, g = _orthogonal_design(n=1000, d=400, seed=1)
    sigma, delta_true = 0.5, 4.0
    w = torch.randn(400, 1, generator=g, dtype=torch.float64) / math.sqrt(delta_true)
    y = X @ w + sigma * torch.randn(1000, 1, generator=g, dtype=torch.float64)
    model = _laplace_at_map(X, y, sigma, 1.0)  # a MAP with the wrong prior; tuning fixes δ
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=250)
    for _ in range(3):  # alternate MAP and evidence (MacKay's fixed point), as a user would
        post = ef.laplace(model, loader, likelihood="regression", prior_precision="marglik",
                          sigma_noise=sigma)  # fmt: skip
        model = _laplace_at_map(X, y, sigma, post.prior_precision)
    assert abs(post.prior_precision / delta_true - 1) < 0.2, post.prior_precision


def test_per_tensor_tuning_returns_one_value_per_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    post = ef.laplace(model, loader, prior_precision="marglik-layer")
    assert set(post.prior_precision) == {n for n, _ in model.named_parameters()}
    assert all(float(v) > 0 for v in post.prior_precision.values())


def _data(n, d, sigma, delta, seed):
    X, g = _orthogonal_design(n=n, d=d, seed=seed)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64) / math.sqrt(delta)
    return X, X @ w + sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)


def test_gaussian_evidence_in_sigma_equals_closed_form():
    """At the MAP for (δ, σ), the evidence computed from the σ = 1 curvature and the RSS is the exact
    evidence of Bayesian linear regression, for several σ (so its σ-dependence is right)."""
    X, y = _data(200, 20, 0.7, 3.0, 2)
    delta = 3.0
    unit = {"weight": X.pow(2).sum(0, keepdim=True)}  # the GGN at σ = 1
    for sigma in (0.3, 0.7, 2.0):
        model = _laplace_at_map(X, y, sigma, delta)
        with torch.no_grad():
            rss = float((model(X) - y).pow(2).sum())
        mean = {"weight": model.weight.detach()}
        got = evidence.log_marginal_likelihood_gaussian(rss, 200, mean, unit, delta, sigma)
        torch.testing.assert_close(got, _closed_form_log_evidence(X, y, sigma, delta), rtol=1e-10, atol=1e-8)


def test_marglik_recovers_the_true_noise_and_prior():
    sigma_true, delta_true = 0.3, 4.0
    X, y = _data(2000, 300, sigma_true, delta_true, 3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=500)
    model = _laplace_at_map(X, y, 1.0, 1.0)  # wrong σ and δ; MacKay iterations as a user would run them
    for _ in range(4):
        post = ef.laplace(model, loader, likelihood="regression", prior_precision="marglik",
                          sigma_noise="marglik")  # fmt: skip
        model = _laplace_at_map(X, y, post.sigma_noise, post.prior_precision)
    assert abs(post.sigma_noise / sigma_true - 1) < 0.1, post.sigma_noise
    assert abs(post.prior_precision / delta_true - 1) < 0.2, post.prior_precision
    # the precision is the σ-scaled curvature plus δ
    expected = X.pow(2).sum(0, keepdim=True) / post.sigma_noise**2 + post.prior_precision
    torch.testing.assert_close(post.precision["weight"], expected)
    # the empirical Fisher scales as 1/σ⁴ and lands on the same noise level
    ef_post = ef.laplace(model, loader, likelihood="regression", hessian="efisher",
                         prior_precision=post.prior_precision, sigma_noise="marglik")  # fmt: skip
    assert abs(ef_post.sigma_noise / sigma_true - 1) < 0.1, ef_post.sigma_noise


def test_noise_tuning_rejects_classification_and_kfac():
    import pytest

    model = nn.Linear(3, 2)
    loader = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    with pytest.raises(ValueError, match="regression"):
        ef.laplace(model, loader, sigma_noise="marglik")
    with pytest.raises(ValueError, match="kfac"):
        ef.laplace(model, [(torch.randn(8, 3), torch.randn(8, 2))], likelihood="regression",
                   hessian="kfac", sigma_noise="marglik")  # fmt: skip
