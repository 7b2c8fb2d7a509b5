"""GGN-vector products, CG and full-precision posterior samples against dense references."""

import warnings

import pytest
import torch

from effortless.curvature import exact, operators
from tests.conftest import make_batch, make_model


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


@pytest.mark.parametrize("arch", ["mlp", "cnn", "layernorm", "shared"])
@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_gvp_matches_dense_ggn(arch, lik):
    model = make_model(arch)
    x, y = make_batch(arch, lik)
    G = exact.ggn(model, x, y, lik, sigma_noise=0.5)
    vec, names, shapes = exact.flatten(model)
    v = torch.randn_like(vec)
    got = operators.gvp(model, x, y, exact._unflatten(v, names, shapes), lik, sigma_noise=0.5)
    torch.testing.assert_close(_flat(got), G @ v, atol=1e-10, rtol=1e-8)


def test_cg_solves_the_damped_ggn_system():
    model = make_model("residual")
    x, y = make_batch("residual", "classification")
    A = exact.ggn(model, x, y) + 0.5 * torch.eye(exact.flatten(model)[0].numel(), dtype=torch.float64)
    vec, names, shapes = exact.flatten(model)
    b = torch.randn_like(vec)

    def matvec(v):
        g = operators.gvp(model, x, y, v)
        return {k: g[k] + 0.5 * v[k] for k in v}

    sol, info = operators.cg(matvec, exact._unflatten(b, names, shapes), tol=1e-10, maxiter=500)
    torch.testing.assert_close(_flat(sol), torch.linalg.solve(A, b), atol=1e-7, rtol=1e-6)
    assert info["residual"] <= 1e-10 and info["iterations"] <= vec.numel() + 5


def _whitened(draws, precision):
    """Two distances of the draws' second moment from that of N(0, precision⁻¹), after whitening
    by precision = LLᵀ (which makes exact draws standard normal): ‖W − I‖²_F for W the empirical
    second moment of Lᵀx (any error: scale, correlations, a missing term) and |tr W / P − 1| (scale)."""
    w = draws @ torch.linalg.cholesky(precision)
    W = w.T @ w / len(draws)
    eye = torch.eye(W.shape[0], dtype=W.dtype)
    return float((W - eye).pow(2).sum()), abs(float(torch.diagonal(W).mean()) - 1)


def test_cg_samples_have_the_inverse_precision_as_covariance():
    """Empirical covariance of CG-drawn samples converges to (G + δI)⁻¹ (a stochastic test).

    The whitened distances are compared with their distribution for exact N(0, I) draws of the
    same count (simulated here, cheap: no CG). With 400 draws on a GGN several times the prior,
    they tell the right covariance from one 10 % off in scale, from G/2 or 2G in place of G, and
    from δ² in place of δ; each entry is also checked within 5 standard errors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    x = 3 * torch.randn(12, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    delta = 0.5
    P = exact.flatten(model)[0].numel()
    G, eye = exact.ggn(model, x, y), torch.eye(P, dtype=torch.float64)
    precision = G + delta * eye
    gen = torch.Generator().manual_seed(0)
    n = 400
    draws = torch.stack([_flat(operators.sample_precision(model, x, y, delta, generator=gen, tol=1e-8)[0])
                         for _ in range(n)])  # fmt: skip
    null_gen = torch.Generator().manual_seed(1)
    null = torch.tensor([_whitened(torch.randn(n, P, generator=null_gen, dtype=torch.float64), eye)
                         for _ in range(2000)])  # fmt: skip
    dist, scale = _whitened(draws, precision)
    assert dist <= float(null[:, 0].quantile(0.999)) and scale <= float(null[:, 1].quantile(0.999))
    wrongs = (1.1 * precision, precision / 1.1, G / 2 + delta * eye, 2 * G + delta * eye, G + delta**2 * eye)
    for wrong in wrongs:  # the test's power: each is beyond every exact draw set
        d, s = _whitened(draws, wrong)
        assert d > float(null[:, 0].max()) or s > float(null[:, 1].max())
    cov = torch.linalg.inv(precision)
    emp = draws.T @ draws / n
    # each entry's standard error: sqrt((Σ_ii Σ_jj + Σ_ij²) / n)
    d = torch.diagonal(cov)
    se = ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    assert ((emp - cov).abs() <= 5 * se).float().mean() > 0.99
    assert draws.mean(0).abs().max() < 5 * (d.max() / n) ** 0.5


def test_sample_precision_validates_the_prior():
    model = make_model("mlp")
    x, y = make_batch("mlp", "classification")
    with pytest.raises(ValueError, match="prior_precision"):
        operators.sample_precision(model, x, y, 0.0)


def test_gvp_and_hvp_agree_with_curvlinops():
    """An independent implementation (curvlinops, installed with scripts/setup.sh --peers)."""
    curvlinops = pytest.importorskip("curvlinops")
    from effortless.curvature import functional

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    params = list(model.parameters())
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    lossf = torch.nn.CrossEntropyLoss(reduction="sum")
    pairs = [(operators.gvp, curvlinops.GGNLinearOperator),
             (functional.hvp, curvlinops.HessianLinearOperator)]  # fmt: skip
    for ours, Op in pairs:
        theirs = Op(model, lossf, params, [(x, y)], check_deterministic=False) @ list(v.values())
        for (n, a), b in zip(ours(model, x, y, v).items(), theirs):
            torch.testing.assert_close(a, b, msg=n)


def _diag_op(d):
    return lambda v: {"w": d * v["w"]}


def test_cg_warns_when_maxiter_ends_above_tol():
    d = torch.logspace(0, 8, 50, dtype=torch.float64)
    b = {"w": torch.ones(50, dtype=torch.float64)}
    with pytest.warns(RuntimeWarning, match="not converged after maxiter=5"):
        _, info = operators.cg(_diag_op(d), b, maxiter=5)
    assert info["iterations"] == 5 and info["residual"] > 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged: silent
        sol, info = operators.cg(_diag_op(d.sqrt().sqrt()), b, tol=1e-10, maxiter=500)
    torch.testing.assert_close(sol["w"], 1 / d.sqrt().sqrt(), rtol=1e-8, atol=0)


def test_cg_refuses_operators_that_are_not_positive_definite():
    b = {"w": torch.ones(3, dtype=torch.float64)}
    singular = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)  # b has a part in its null space
    with pytest.raises(ValueError, match="not positive definite"):
        operators.cg(_diag_op(singular), b)
    with pytest.raises(ValueError, match="not positive definite"):
        indefinite = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
        operators.cg(_diag_op(indefinite), b, x0={"w": torch.ones(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="not positive definite"):
        operators.cg(lambda v: {"w": v["w"] * float("nan")}, b)


def test_cg_right_hand_sides_zero_and_non_finite():
    d = torch.tensor([1.0, 2.0], dtype=torch.float64)
    zero = {"w": torch.zeros(2, dtype=torch.float64)}
    sol, info = operators.cg(_diag_op(d), zero, x0={"w": torch.ones(2, dtype=torch.float64)})
    assert torch.equal(sol["w"], zero["w"]) and info == {"iterations": 0, "residual": 0.0}
    with pytest.raises(ValueError, match="non-finite"):
        operators.cg(_diag_op(d), {"w": torch.tensor([1.0, float("nan")], dtype=torch.float64)})
