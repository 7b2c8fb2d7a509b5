"""Laplace evidence and prior tuning against Bayesian linear regression in closed form."""

import math

import pytest
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
    with pytest.raises(ValueError, match="with hessian='kfac' needs subset='last_layer'"):
        ef.laplace(model, [(torch.randn(8, 3), torch.randn(8, 2))], likelihood="regression",
                   hessian="kfac", sigma_noise="marglik")  # fmt: skip
    with pytest.raises(ValueError, match="needs likelihood='regression'"):
        ef.laplace(model, loader, hessian="kfac", subset="last_layer", sigma_noise="marglik")


def _groups_case(scale_mu, scale_h, seed):
    g = torch.Generator().manual_seed(seed)
    mean = {"a": torch.randn(300, generator=g, dtype=torch.float64) * scale_mu,
            "b": torch.randn(20, generator=g, dtype=torch.float64) * scale_mu * 0.1}  # fmt: skip
    curv = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) * scale_h for k, v in mean.items()}
    return mean, curv


# (‖μ‖ scale, curvature scale): the best δ from about 1e-4 to 5e7; where it lies far below the
# start (δ = 1), gradient ascent with Adam stopped 3x-27x too high, hundreds of nats below the maximum
CASES = [(1.0, 100.0), (1e-3, 1e4), (30.0, 1.0), (1e-4, 1e8), (3.0, 1e-3), (100.0, 100.0)]


@pytest.mark.parametrize(("scale_mu", "scale_h"), CASES)
def test_tuned_prior_precision_is_the_evidence_maximum_on_a_dense_grid(scale_mu, scale_h):
    mean, curv = _groups_case(scale_mu, scale_h, 0)
    delta = evidence.tune_prior_precision(0.0, mean, curv)

    def ev(d):
        return evidence.log_marginal_likelihood(0.0, mean, curv, d)

    grid = torch.logspace(-9, 9, 7201, dtype=torch.float64)  # steps of 0.6 %
    values = torch.stack([ev(float(d)) for d in grid])
    i = int(values.argmax())
    assert float(grid[i - 1]) <= delta <= float(grid[i + 1])
    assert float(ev(delta)) >= float(values[i]) - 1e-9
    per = evidence.tune_prior_precision(0.0, mean, curv, per_tensor=True)
    for k in mean:  # separable: each tensor's δ maximises its own terms
        one = evidence.tune_prior_precision(0.0, {k: mean[k]}, {k: curv[k]})
        assert math.isclose(float(per[k]), one, rel_tol=1e-9)
        for f in (1 - 1e-4, 1 + 1e-4):
            moved = dict(per, **{k: per[k] * f})
            assert float(evidence.log_marginal_likelihood(0.0, mean, curv, moved)) < float(
                evidence.log_marginal_likelihood(0.0, mean, curv, per))


@pytest.mark.parametrize(("scale_mu", "scale_h", "n", "rss", "power"),
                         [(1.0, 100.0, 1000, 250.0, 2), (30.0, 1.0, 500, 50.0, 2),
                          (100.0, 100.0, 2000, 2000.0, 2), (0.01, 1e4, 1000, 10.0, 4)])  # fmt: skip
def test_tuned_prior_and_noise_beat_every_point_of_a_dense_grid(scale_mu, scale_h, n, rss, power):
    mean, curv = _groups_case(scale_mu, scale_h, 1)
    delta, sigma = evidence.tune_prior_and_noise(rss, n, mean, curv, "marglik", power)

    def ev(d, s):
        return float(evidence.log_marginal_likelihood_gaussian(rss, n, mean, curv, d, s, power))

    best = ev(delta, sigma)
    # the evidence on a 201 x 201 grid of (log δ, log σ), vectorised (checked against ev at its top)
    c = torch.cat([v.reshape(-1) for v in curv.values()])
    sq = sum(float(v.pow(2).sum()) for v in mean.values())
    d = torch.logspace(-25, 25, 201, base=math.e, dtype=torch.float64)[:, None]  # (201, 1)
    rows = []
    for s in torch.logspace(-6, 4, 201, base=math.e, dtype=torch.float64).tolist():
        nll = rss / (2 * s**2) + n * (math.log(s) + 0.5 * math.log(2 * math.pi))
        rows.append(-nll - 0.5 * d[:, 0] * sq + 0.5 * c.numel() * d[:, 0].log()
                    - 0.5 * (c / s**power + d).log().sum(1))  # fmt: skip
    grid = torch.stack(rows, 1)  # (δ, σ)
    i, j = divmod(int(grid.argmax()), grid.shape[1])
    top = (float(d[i, 0]), math.exp(-6 + 10 * j / 200))
    assert math.isclose(ev(*top), float(grid[i, j]), rel_tol=1e-10)
    assert best >= float(grid.max()) - 1e-9
    # a stationary point: moving either coordinate by 0.01 % lowers it
    for fd, fs in ((1.0001, 1), (1 / 1.0001, 1), (1, 1.0001), (1, 1 / 1.0001)):
        assert ev(delta * fd, sigma * fs) < best
    # with δ fixed, σ alone is MacKay's σ² = RSS / (n − (a/2) γ)
    fixed, s1 = evidence.tune_prior_and_noise(rss, n, mean, curv, 0.5, power)
    gamma = sum(float((c / s1**power / (c / s1**power + 0.5)).sum()) for c in curv.values())
    assert fixed == 0.5 and math.isclose(s1**2, rss / (n - 0.5 * power * gamma), rel_tol=1e-9)


def test_kfac_prior_tuning_is_the_evidence_maximum():
    from effortless.posterior.kron import KronLastLayer, log_marginal_likelihood

    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 3, generator=g, dtype=torch.float64)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    mean = 40 * torch.randn(3, 6, generator=g, dtype=torch.float64)  # large weights: a small best δ
    post = KronLastLayer("fc", mean, G @ G.T, A @ A.T / 6, 1.0, True)
    from effortless.posterior.kron import _tune

    delta = _tune(post, 0.0)
    grid = torch.logspace(-9, 9, 7201, dtype=torch.float64)
    values = torch.stack([log_marginal_likelihood(post, 0.0, float(d)) for d in grid])
    i = int(values.argmax())
    assert float(grid[i - 1]) <= delta <= float(grid[i + 1]) and delta < 1e-2


def test_a_maximiser_beyond_the_search_range_is_said():
    mean = {"w": torch.zeros(5, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    curv = {"w": torch.ones(5, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    with pytest.warns(RuntimeWarning, match=r"best prior precision for w lies beyond 1e12 \(the mean"):
        per = evidence.tune_prior_precision(0.0, mean, curv, per_tensor=True)
    assert math.isclose(float(per["w"]), 1e12, rel_tol=1e-9) and 0.1 < float(per["b"]) < 10
    with pytest.warns(RuntimeWarning, match="noise sigma for the model's outputs lies beyond 1e-12"):
        evidence.tune_prior_and_noise(0.0, 100, {"b": torch.ones(2)}, {"b": torch.ones(2)}, 1.0)
    # curvature with negative entries (Hutchinson's): δ cannot go below them, and says so
    neg = {"w": torch.tensor([-2.0, 1.0, 1.0], dtype=torch.float64)}
    with pytest.warns(RuntimeWarning, match="below the size of the curvature's negative entries"):
        d = evidence.tune_prior_precision(0.0, {"w": torch.full((3,), 5.0, dtype=torch.float64)}, neg)
    assert 2.0 < d < 2.0001


@pytest.mark.parametrize("prior", ["marglik", 0.7])
def test_last_layer_kfac_chooses_the_noise_by_the_evidence(prior):
    """For one output and a linear model the last-layer KFAC is the exact GGN, so the Laplace
    evidence at the weights (fixed) is −RSS/2σ² − n log σ − ½δ‖w‖² + ½P log δ − ½ log det(XᵀX/σ² + δI)
    up to constants; the σ (and δ) chosen must maximise it, checked on a dense grid with the dense
    log-determinant. σ by the evidence was refused with KFAC before."""
    g = torch.Generator().manual_seed(4)
    n, d = 300, 5
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 1, generator=g,
                                                                                       dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    with torch.no_grad():  # near, not at, the MAP: the evidence is taken at the weights as they are
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.T * 0.9)
        model.bias.fill_(0.05)
    loader = [(X[:150], y[:150]), (X[150:], y[150:])]
    post = ef.laplace(model, loader, likelihood="regression", hessian="kfac", subset="last_layer",
                      prior_precision=prior, sigma_noise="marglik")  # fmt: skip
    Xb = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    w = torch.cat([model.weight.detach(), model.bias.detach()[:, None]], 1).reshape(-1)
    rss = float((Xb @ w - y[:, 0]).pow(2).sum())

    def ev(delta, sigma):
        prec = Xb.T @ Xb / sigma**2 + delta * torch.eye(d + 1, dtype=torch.float64)
        return (-rss / (2 * sigma**2) - n * math.log(sigma) - 0.5 * delta * float(w @ w)
                + 0.5 * (d + 1) * math.log(delta) - 0.5 * float(torch.logdet(prec)))  # fmt: skip

    best = ev(post.prior_precision, post.sigma_noise)
    deltas = torch.logspace(-4, 3, 141).tolist() if prior == "marglik" else [0.7]
    grid = max(ev(dl, sg) for dl in deltas for sg in torch.logspace(-1.5, 0.5, 201).tolist())
    assert best >= grid - 1e-9
    assert 0.2 < post.sigma_noise < 0.45
    if prior != "marglik":
        assert post.prior_precision == 0.7
    # the posterior's precision is XᵀX/σ² + δI, in its Kronecker eigenbasis
    dense = Xb.T @ Xb / post.sigma_noise**2 + post.prior_precision * torch.eye(d + 1, dtype=torch.float64)
    kron_prec = (post.QA * post.eigenvalues()[0]) @ post.QA.T
    torch.testing.assert_close(kron_prec, dense)
    mean, var = ef.predict(model, post, X[:4], method="glm")  # the recorded σ is the default
    ref = (Xb[:4] @ torch.linalg.solve(dense, Xb[:4].T)).diag() + post.sigma_noise**2
    torch.testing.assert_close(var.reshape(-1), ref)


def test_per_tensor_prior_and_noise_is_a_stationary_maximum():
    mean, curv = _groups_case(30.0, 1.0, 2)  # (the per-tensor δ far below 1 for "a")
    delta, sigma = evidence.tune_prior_and_noise(50.0, 500, mean, curv, "marglik", per_tensor=True)

    def ev(d, s):
        return float(evidence.log_marginal_likelihood_gaussian(50.0, 500, mean, curv, d, s))

    best = ev(delta, sigma)
    assert float(delta["a"]) < 0.01
    for k in delta:
        for f in (1.0001, 1 / 1.0001):
            assert ev(dict(delta, **{k: delta[k] * f}), sigma) < best
    for f in (1.0001, 1 / 1.0001):
        assert ev(delta, sigma * f) < best


def test_an_inflated_noise_from_the_diagonal_is_said_and_the_last_layer_kfac_gets_it_right():
    """On 40 points of sin(2x) + N(0, 0.1²) with a 1-50-1 MLP the all-weights diagonal counts more
    effective parameters than there are points, and the evidence's σ comes out 44x the residuals'
    (4.06): a warning says so and names the fit that does not overcount, whose σ is the true 0.1."""
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 40)[:, None]
    y = torch.sin(2 * x) + 0.1 * torch.randn(40, 1)
    model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(1000):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    kw = dict(likelihood="regression", prior_precision="marglik", sigma_noise="marglik")
    with pytest.warns(RuntimeWarning, match=r"sigma_noise [\d.]+ is [\d.]+x the residuals'.*'last_layer'"):
        diag = ef.laplace(model, [(x, y)], **kw)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for the Kronecker fit
        kfac = ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer", **kw)
    assert diag.sigma_noise > 1.0 and 0.08 < kfac.sigma_noise < 0.12
