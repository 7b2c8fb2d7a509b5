import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

import effortless as ef
from effortless import likelihoods


def test_classification_nll_is_cross_entropy():
    f = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    lik = likelihoods.get("classification")
    torch.testing.assert_close(lik.nll(f, y), F.cross_entropy(f, y, reduction="none"))


def test_regression_nll_is_gaussian_log_density():
    f = torch.randn(5, 2, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    lik = likelihoods.get("regression", sigma_noise=0.3)
    ref = -torch.distributions.Normal(f, 0.3).log_prob(y).sum(1)
    torch.testing.assert_close(lik.nll(f, y), ref)


@pytest.mark.parametrize("name", ["classification", "regression"])
def test_hessian_factor_matches_autodiff_hessian(name):
    lik = likelihoods.get(name, sigma_noise=0.7)
    f = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (4,)) if name == "classification" else torch.randn(4, 3, dtype=torch.float64)
    S = lik.hessian_factor(f)
    for b in range(4):
        H = hessian(lambda fb, b=b: lik.nll(fb[None], y[b : b + 1]).sum())(f[b])
        torch.testing.assert_close(S[b] @ S[b].T, H, atol=1e-12, rtol=0)


def test_classification_samples_follow_softmax():
    f = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64).expand(20000, 3)
    g = torch.Generator().manual_seed(1)
    y = likelihoods.get("classification").sample(f, g)
    freq = torch.bincount(y, minlength=3).double() / len(y)
    p = f[0].softmax(-1)
    se = (p * (1 - p) / len(y)).sqrt()
    assert ((freq - p).abs() < 5 * se).all()


def test_regression_samples_have_noise_variance():
    f = torch.zeros(50000, 1, dtype=torch.float64)
    y = likelihoods.get("regression", sigma_noise=2.0).sample(f, torch.Generator().manual_seed(0))
    assert abs(float(y.var()) - 4.0) < 5 * 4.0 * math.sqrt(2 / 50000)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="likelihood"):
        likelihoods.get("poisson")
    for bad in (-1.0, 0.0, float("inf"), float("nan")):  # (inf gave a zero output Hessian, silently)
        with pytest.raises(ValueError, match="sigma_noise"):
            likelihoods.get("regression", sigma_noise=bad)
    with pytest.raises(ValueError, match="sigma_noise"):
        likelihoods.Regression(sigma_noise=True)
    with pytest.raises(ValueError, match="sigma_noise"):  # get() made it float(True) = 1.0 first
        likelihoods.get("regression", sigma_noise=True)
    with pytest.raises(ValueError, match=r"the same noise for every output; got a tensor of shape \(2,\)"):
        likelihoods.get("regression", sigma_noise=torch.tensor([0.5, 2.0]))
    one = likelihoods.get("regression", sigma_noise=torch.tensor(0.5))
    assert type(one.sigma_noise) is float and one.sigma_noise == 0.5
    with pytest.raises(ValueError, match="labels"):
        likelihoods.get("classification").nll(torch.randn(3, 2), torch.randn(3))
    with pytest.raises(ValueError, match="same shape"):
        likelihoods.get("regression").nll(torch.randn(3, 2), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"logits of shape \(B, C\), got \(3, 5, 2\)"):  # a sequence model's
        likelihoods.get("classification").nll(torch.randn(3, 5, 2), torch.zeros(3, 5, dtype=torch.long))


def test_classification_takes_labels_of_every_integer_width():
    """int16 and int8 labels were refused ("expects integer labels of shape (5,), got (5,)
    torch.int16") where int32 and uint8 were taken; all widths give the int64 labels' NLL,
    gradient and training step, float and bool labels are refused."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 3, 1, 2, 3])
    lik = likelihoods.get("classification")
    f = model(x)
    for dtype in (torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16):
        assert torch.equal(lik.nll(f, y.to(dtype)), lik.nll(f, y)), dtype
        assert torch.equal(lik.nll_grad(f, y.to(dtype)), lik.nll_grad(f, y)), dtype
        want = ef.curvature.diag_efisher(model, x, y)
        got = ef.curvature.diag_efisher(model, x, y.to(dtype))
        assert all(torch.equal(got[k], want[k]) for k in want), dtype
    for bad in (y.double(), y.bool()):
        with pytest.raises(ValueError, match="integer labels"):
            lik.nll(f, bad)


def test_regression_outputs_of_more_than_two_dims_are_refused_by_name():
    """A sequence regression model's (B, T, D) outputs: the NLL summed dim 1 only, so BayesAdam's
    training loss (its mean) divided the likelihood by D, silently; ef.laplace failed in a reshape.
    Both now say what shape is expected."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(5, 4, 3), torch.randn(5, 4, 2)
    match = r"regression expects outputs of shape \(B, D\) or \(B,\), got \(5, 4, 2\); flatten"
    with pytest.raises(ValueError, match=match):
        likelihoods.get("regression").nll(model(x), y)
    before = [p.detach().clone() for p in model.parameters()]
    for key in ("reparam", "ggn"):
        opt = ef.BayesAdam(model.parameters(), n_data=5, hessian=key)
        with pytest.raises(ValueError, match=match):
            opt.train_step(model, x, y, likelihood="regression")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(ValueError, match=match):
        ef.laplace(model, [(x, y)], likelihood="regression")


def test_regression_outputs_and_targets_of_shape_b_are_one_output():
    """A regression network that returns (B,) (``.squeeze(-1)``) with (B,) targets: the same NLL and
    curvature as the (B, 1) network."""
    from effortless import curvature

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    flat = torch.nn.Sequential(net, torch.nn.Flatten(0))
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    lik = likelihoods.get("regression", sigma_noise=0.5)
    torch.testing.assert_close(lik.nll(flat(x), y[:, 0]), lik.nll(net(x), y))
    for method in ("exact", "mc"):
        a, b = (
            curvature.diag_ggn(m, x, t, "regression", method=method, sigma_noise=0.5,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
            for m, t in ((net, y), (flat, y[:, 0]))
        )
        for k in a:
            torch.testing.assert_close(b[f"0.{k}"], a[k])


@pytest.mark.parametrize("name", ["classification", "regression"])
def test_closed_form_nll_gradient_matches_autograd(name):
    lik = likelihoods.get(name, sigma_noise=0.7)
    f = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,)) if name == "classification" else torch.randn(6, 4, dtype=torch.float64)
    ref = likelihoods.Likelihood.nll_grad(lik, f, y)  # the generic autograd version
    torch.testing.assert_close(lik.nll_grad(f, y), ref, rtol=1e-12, atol=1e-14)
    assert not f.requires_grad


def test_classification_samples_follow_softmax_row_by_row():
    """Every row its own distribution (the inverse-CDF sampler must not mix rows up)."""
    f = torch.tensor([[3.0, 0.0, -1.0], [-2.0, 0.5, 1.0]], dtype=torch.float64).repeat(10000, 1)
    y = likelihoods.get("classification").sample(f, torch.Generator().manual_seed(2))
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= 2
    for r in range(2):
        freq = torch.bincount(y[r::2], minlength=3).double() / 10000
        p = f[r].softmax(-1)
        se = (p * (1 - p) / 10000).sqrt()
        assert ((freq - p).abs() < 5 * se).all(), (r, freq, p)


@pytest.mark.parametrize("gap", [5.0, 15.0, 40.0, 80.0])
def test_classification_factor_is_accurate_for_confident_predictions(gap):
    """Logits ``gap`` apart in float32, so p_k rounds to 1 (from 40 on, in float64 too): the factor
    squares to diag(p) − p pᵀ to float32 accuracy relative to each row's largest entry, against a
    float64 reference whose diagonal p_i Σ_{j≠i} p_j has no cancellation."""
    f = torch.tensor([[gap, 0, 0, 0, 0], [gap, gap - 1, 0, -1, 2], [0, 1, gap, 0.5, -3]])
    S = likelihoods.get("classification").hessian_factor(f)
    assert S.dtype == torch.float32 and torch.isfinite(S).all()
    p = f.double().softmax(-1)
    H = -p[:, :, None] * p[:, None, :]
    others = torch.stack([torch.cat([p[:, :i], p[:, i + 1 :]], 1).sum(1) for i in range(5)], 1)
    H.diagonal(dim1=1, dim2=2).copy_(p * others)  # p_i (1 − p_i), without forming 1 − p_i
    got = (S @ S.transpose(1, 2)).double()
    for b in range(3):
        torch.testing.assert_close(got[b], H[b], atol=1e-6 * H[b].abs().max().item(), rtol=0)


CALLS = ["diag_ggn", "diag_ggn-mc", "kfac", "laplace", "laplace-kfac-ll", "train_step-ggn"]


@pytest.mark.parametrize("call", CALLS)
def test_labels_beyond_the_models_outputs_are_refused(call):
    """The GGN and KFAC estimators do not read the labels: a 3-output model on 8-class labels got a
    posterior without complaint (and the empirical Fisher an IndexError)."""
    import effortless as ef

    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(0, 8, (16,))
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    run = {
        "diag_ggn": lambda: ef.curvature.diag_ggn(model, x, y, likelihood="classification"),
        "diag_ggn-mc": lambda: ef.curvature.diag_ggn(model, x, y, likelihood="classification", method="mc"),
        "kfac": lambda: ef.curvature.kfac(model, x, y, likelihood="classification"),
        "laplace": lambda: ef.laplace(model, [(x, y)]),
        "laplace-kfac-ll": lambda: ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer"),
        "train_step-ggn": lambda: ef.BayesAdam(model.parameters(), n_data=16, hessian="ggn").train_step(
            model, x, y
        ),
    }[call]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\) .* got labels from 0 to 7"):
        run()
    y.remainder_(3)  # the same call with labels in range goes through
    run()


def test_label_range_check_accepts_empty_batches_and_every_class():
    lik = likelihoods.get("classification")
    lik.check(torch.randn(0, 3), torch.zeros(0, dtype=torch.long))
    lik.check(torch.randn(3, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="from -1 to 2"):
        lik.check(torch.randn(3, 3), torch.tensor([-1, 1, 2]))


def test_16_bit_outputs_are_computed_on_in_float32_as_autocast_runs_torchs_losses():
    """A model under bf16 autocast returns bf16 outputs. The regression NLL was computed in bf16 (a
    residual of 0.05 on targets near 10 keeps about one significant bit: the training gradient was
    33 % off), its Monte-Carlo cotangents too, and the classification labels for the MC GGN came
    from a bf16 cumulative softmax that never drew a class below 1/256. torch's own losses run in
    float32 under autocast; these now do too (returning gradients in the outputs' dtype)."""
    g = torch.Generator().manual_seed(0)
    reg = likelihoods.get("regression", sigma_noise=0.05)
    f = (10 + 0.1 * torch.randn(4096, 1, generator=g)).bfloat16()
    y = f.double() + 0.05 * torch.randn(4096, 1, generator=g, dtype=torch.float64)
    fb = f.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.nn.functional.linear(fb, torch.ones(1, 1))  # bf16, the values of f
        (grad,) = torch.autograd.grad(reg.nll(out, y.float()).sum(), fb)
    assert out.dtype == torch.bfloat16
    exact = (f.double() - y) / 0.05**2
    assert float((grad - exact).norm() / exact.norm()) < 0.01  # (0.33 in bf16)
    grads = reg.nll_grad(f, reg.sample(f, torch.Generator().manual_seed(1)))  # MC cotangents: −ξ/σ
    assert grads.dtype == torch.bfloat16
    assert abs(float(grads.double().pow(2).mean()) * 0.05**2 - 1) < 0.06  # E ξ² = 1 (1.11 in bf16)
    cls = likelihoods.get("classification")
    logits = torch.tensor([[4.0, 0.0, -1.0, -2.0, -3.0, 1.0, 2.0, 0.5, -0.5, 3.0]])  # (exact in bf16)
    p = logits.double().softmax(-1)[0]
    labels = cls.sample(logits.bfloat16().expand(100_000, -1), torch.Generator().manual_seed(2))
    freq = torch.bincount(labels, minlength=10).double() / len(labels)
    assert float(freq[4]) > 0.5 * float(p[4])  # p = 0.0006: never drawn from the bf16 cumulative sum
    torch.testing.assert_close(freq, p, atol=0.004, rtol=0)
    S = cls.hessian_factor(logits.bfloat16())
    assert S.dtype == torch.bfloat16
    torch.testing.assert_close(S.double(), cls.hessian_factor(logits.double()), atol=4e-3, rtol=1e-2)
