"""posterior_from_adam: Adam's moments mapped to the per-sample empirical Fisher."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effortless as ef
from effortless.curvature import exact

# Adam's EMAs average the fed minibatch gradients over about 2/(1 − β) = 2,000 steps; 4,000 steps
# (four horizons, bias-corrected) put the mapped Fisher within 2-3 % of the dense one here (the
# tests' tolerances are 15 %), at a fifth of the cost of β = 0.9999 over 20,000 steps.
BETA, STEPS = 0.999, 4000


def _logistic(n=64, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g,
         dtype=torch.float64) > 0).long()  # fmt: skip
    torch.manual_seed(seed)
    model = nn.Linear(d, 2).double()
    return model, X, y


def _per_sample_grads(model, loss, n):
    """Each parameter's gradients of loss(i) for i < n, stacked (n, *shape)."""
    params = list(model.parameters())
    rows = [torch.autograd.grad(loss(i), params) for i in range(n)]
    return [torch.stack(col) for col in zip(*rows)]


def _feed_adam(opt, model, per_sample, batch, steps, generator):
    """Adam steps whose gradient is the mean of ``batch`` per-sample gradients drawn with replacement:
    with lr = 0 the weights stay put, so this is the minibatch gradient a forward and backward would
    give (to round-off), at a fraction of the cost."""
    params = list(model.parameters())
    for _ in range(steps):
        idx = torch.randint(0, len(per_sample[0]), (batch,), generator=generator)
        for p, g in zip(params, per_sample):
            p.grad = g[idx].mean(0)
        opt.step()
    return opt


def _run_adam(model, X, y, batch, steps, opt_cls=torch.optim.Adam, seed=0, **kw):
    """lr = 0: the weights stay put, so Adam's EMAs average gradients at one fixed θ over
    minibatches drawn with replacement (where E ū² = m² + (F − m²)/B holds exactly)."""
    opt = opt_cls(model.parameters(), lr=0.0, betas=(BETA, BETA), **kw)
    per_sample = _per_sample_grads(model, lambda i: F.cross_entropy(model(X[i, None]), y[i, None]), len(X))
    return _feed_adam(opt, model, per_sample, batch, steps, torch.Generator().manual_seed(seed))


def test_fed_gradients_are_the_minibatch_gradients():
    """The shortcut the tests take: the mean of per-sample gradients is what backward gives."""
    model, X, y = _logistic()
    per_sample = _per_sample_grads(model, lambda i: F.cross_entropy(model(X[i, None]), y[i, None]), len(X))
    idx = torch.tensor([3, 3, 17, 40])
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    for p, g in zip(model.parameters(), per_sample):
        torch.testing.assert_close(g[idx].mean(0), p.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("batch", [1, 8])
def test_recovers_the_dense_empirical_fisher(batch):
    model, X, y = _logistic()
    opt = _run_adam(model, X, y, batch, STEPS)
    post = ef.posterior_from_adam(model, opt, n_data=len(X), batch_size=batch, prior_precision=1.0)
    ref = exact.diag(model, X, y, "efisher")  # Σ_b g_b², the N·F the mapping should give
    for k in ref:
        tol = 0.02 * float(ref[k].max())
        torch.testing.assert_close(post.precision[k] - 1.0, ref[k], rtol=0.15, atol=tol)


def test_plain_second_moment_would_be_wrong_by_the_batch_size():
    """The test above can fail: v̂ itself (no batch-size mapping) is off by about B."""
    model, X, y = _logistic()
    opt = _run_adam(model, X, y, 16, STEPS)
    ref = exact.diag(model, X, y, "efisher")["weight"]
    v = opt.state[model.weight]["exp_avg_sq"] / (1 - BETA**STEPS) * len(X)
    assert float((v / ref).median()) < 0.3


def test_implied_precision_does_not_move_with_the_batch_size():
    model, X, y = _logistic(seed=1)
    small = ef.posterior_from_adam(model, _run_adam(model, X, y, 4, STEPS, seed=2), len(X), 4)
    large = ef.posterior_from_adam(model, _run_adam(model, X, y, 32, STEPS, seed=3), len(X), 32)
    for k in small.precision:
        torch.testing.assert_close(small.precision[k], large.precision[k], rtol=0.15, atol=0.5)


def test_l2_weight_decay_is_removed_and_adamw_needs_no_correction():
    """The L2 term λθ shifts every per-sample gradient; the mapping removes it (Adam), AdamW keeps it
    out of the moments. Without the correction the estimate is off by far more than the tolerance."""
    model, X, y = _logistic()
    ref = exact.diag(model, X, y, "efisher")
    wd = 1.0
    adam = _run_adam(model, X, y, 8, STEPS, weight_decay=wd)
    adamw = _run_adam(model, X, y, 8, STEPS, opt_cls=torch.optim.AdamW, weight_decay=wd)
    for opt in (adam, adamw):
        post = ef.posterior_from_adam(model, opt, n_data=len(X), batch_size=8)
        torch.testing.assert_close(post.precision["weight"] - 1.0, ref["weight"], rtol=0.15,
                                   atol=0.02 * float(ref["weight"].max()))  # fmt: skip
    # uncorrected: F̂ of the total gradient g + λθ
    st = adam.state[model.weight]
    m = st["exp_avg"] / (1 - BETA**STEPS)
    v = st["exp_avg_sq"] / (1 - BETA**STEPS)
    raw = (8 * v - 7 * m.pow(2)) * len(X)
    assert not torch.allclose(raw, ref["weight"], rtol=0.15, atol=0.02 * float(ref["weight"].max()))


def test_marglik_and_clear_errors():
    model, X, y = _logistic()
    opt = _run_adam(model, X, y, 8, 200)
    post = ef.posterior_from_adam(model, opt, n_data=64, batch_size=8, prior_precision="marglik")
    assert post.prior_precision > 0
    with pytest.raises(ValueError, match="Adam"):
        ef.posterior_from_adam(model, torch.optim.SGD(model.parameters(), lr=0.1), 64, 8)
    with pytest.raises(ValueError, match="at least one step"):
        ef.posterior_from_adam(model, torch.optim.Adam(model.parameters()), 64, 8)
    with pytest.raises(ValueError, match="batch_size"):
        ef.posterior_from_adam(model, opt, 64, 0)


def test_frozen_weights_are_left_out_and_what_cannot_be_mapped_is_refused():
    model, X, y = _logistic()
    model.bias.requires_grad_(False)

    def trained(**kw):
        opt = torch.optim.Adam([model.weight], **kw)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(X), y).backward()
            opt.step()
        return opt

    opt = trained()
    post = ef.posterior_from_adam(model, opt, n_data=64, batch_size=64)
    assert list(post.precision) == ["weight"]
    model.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="'bias' is not in the optimizer"):
        ef.posterior_from_adam(model, opt, 64, 64)
    model.bias.requires_grad_(False)
    for kw in ({"amsgrad": True}, {"maximize": True}):
        with pytest.raises(ValueError, match="amsgrad / maximize"):
            ef.posterior_from_adam(model, trained(**kw), 64, 64)
    with pytest.raises(ValueError, match="n_data"):
        ef.posterior_from_adam(model, opt, 0, 64)


def test_a_parameter_that_never_had_a_gradient_gets_the_prior_with_a_warning():
    """Adam makes a parameter's state at its first gradient: a layer the forward never uses has
    none, and the posterior was refused with "take at least one step first" after many steps."""
    model, X, y = _logistic()
    spare = nn.Linear(2, 2).double()
    opt = torch.optim.Adam([*model.parameters(), *spare.parameters()])
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    whole = nn.ModuleDict({"used": model, "spare": spare})
    with pytest.warns(RuntimeWarning, match=r"\['spare.weight', 'spare.bias'\] never received a gradient"):
        post = ef.posterior_from_adam(whole, opt, n_data=64, batch_size=64, prior_precision=2.0)
    alone = ef.posterior_from_adam(model, opt, n_data=64, batch_size=64, prior_precision=2.0)
    for k in ("weight", "bias"):
        assert torch.equal(post.precision[f"used.{k}"], alone.precision[k])
        assert torch.equal(post.precision[f"spare.{k}"], torch.full_like(spare.get_parameter(k), 2.0))


def test_linear_regression_at_the_least_squares_solution_recovers_efisher_and_ggn():
    """Well-specified linear regression (noise sd 1, Gaussian NLL ½(y − xθ)²): at the least-squares
    θ̂, Adam's moments map to the dense per-sample empirical Fisher Σ r²x², and because E r² = σ² that
    is the exact GGN Σ x² (which does not depend on θ) up to the residuals' sampling error."""
    g = torch.Generator().manual_seed(3)
    n, d = 2000, 3
    f64 = torch.float64
    X = torch.randn(n, d, generator=g, dtype=f64) * torch.tensor([0.5, 1.0, 2.0], dtype=f64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=f64) + torch.randn(n, generator=g, dtype=f64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y[:, None]).solution.T)
    opt = torch.optim.Adam(model.parameters(), lr=0.0, betas=(BETA, BETA))
    with torch.no_grad():  # per-sample gradients of ½(y − xθ)², in closed form: −(y − xθ) x
        per_sample = [-(y - model(X).squeeze(1))[:, None, None] * X[:, None, :]]
    check = _per_sample_grads(model, lambda i: 0.5 * (y[i] - model(X[i : i + 1]).squeeze()).pow(2), 3)
    torch.testing.assert_close(per_sample[0][:3], check[0])
    _feed_adam(opt, model, per_sample, 16, STEPS, g)
    post = ef.posterior_from_adam(model, opt, n_data=n, batch_size=16, prior_precision=1.0)
    implied = post.precision["weight"] - 1.0
    ef_ref = exact.diag(model, X, y[:, None], "efisher", likelihood="regression")["weight"]
    ggn_ref = X.pow(2).sum(0, keepdim=True)  # the GGN diagonal Σ x², checked by brute force on 200 rows
    dense = exact.diag(model, X[:200], y[:200, None], "ggn", likelihood="regression")["weight"]
    torch.testing.assert_close(dense, X[:200].pow(2).sum(0, keepdim=True))
    torch.testing.assert_close(implied, ef_ref, rtol=0.1, atol=0.0)
    torch.testing.assert_close(implied, ggn_ref, rtol=0.15, atol=0.0)


def test_a_bf16_models_moments_are_mapped_in_float32():
    """B·v̂ − (B − 1)·m̂² cancels; in bf16 arithmetic the precision came out a few per cent off the
    same moments mapped in float64 (5 % quantile of the ratio 0.94). Now within bf16's rounding of
    the result, in the model's dtype."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3)).bfloat16()
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 10, generator=g).bfloat16()
    y = (x[:, 0].float() > 0).long() + (x[:, 1].float() > 0).long()
    for i in range(0, 4096, 128):
        adam.zero_grad()
        F.cross_entropy(model(x[i : i + 128]).float(), y[i : i + 128]).backward()
        adam.step()
    post = ef.posterior_from_adam(model, adam, n_data=4096, batch_size=128, prior_precision=1e-6)
    for name, p in model.named_parameters():
        st, t = adam.state[p], float(adam.state[p]["step"])
        v = st["exp_avg_sq"].double() / (1 - 0.999**t)
        m = st["exp_avg"].double() / (1 - 0.9**t)
        ref = (128 * v - 127 * m.pow(2)).clamp_min(0) * 4096 + 1e-6
        assert post.precision[name].dtype == torch.bfloat16
        ratio = post.precision[name].double() / ref
        assert (ratio - 1).abs().max() < 2**-7, (name, float(ratio.min()), float(ratio.max()))
