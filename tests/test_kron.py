"""Last-layer KFAC Laplace: closed forms against dense matrices."""

import math

import pytest
import torch
from torch import nn

import effortless as ef
from effortless.posterior import kron
from tests.conftest import per_draw


def _setup(bias=True, n=40, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4, bias=bias)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (n,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    return model, x, y, loader


@pytest.mark.parametrize("bias", [True, False])
def test_glm_covariance_and_log_det_match_dense_kronecker_algebra(bias):
    model, x, y, loader = _setup(bias)
    post = ef.laplace(model, loader, hessian="kfac", subset="last_layer", prior_precision=0.7)
    assert isinstance(post, kron.KronLastLayer)
    Lam = torch.kron(post.G, post.A) + 0.7 * torch.eye(post.mean.numel(), dtype=torch.float64)
    torch.testing.assert_close(post.log_det_precision(), torch.logdet(Lam))
    f, phi = post.features(model, x[:6])
    J = torch.stack([torch.kron(torch.eye(4, dtype=torch.float64)[c], phi) for c in range(4)], 1)  # (B, C, P)
    ref = J @ torch.linalg.inv(Lam) @ J.transpose(1, 2)
    mean, cov = post.predictive_moments(model, x[:6])
    torch.testing.assert_close(cov, ref, atol=1e-12, rtol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(mean, model(x[:6]))


def test_factors_accumulate_over_batches_like_one_big_batch():
    model, x, y, loader = _setup()
    post = ef.laplace(model, loader, hessian="kfac", subset="last_layer")
    one = ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer")
    torch.testing.assert_close(post.A, one.A)
    torch.testing.assert_close(post.G, one.G)


def test_weight_samples_have_the_kronecker_covariance():
    model, x, y, loader = _setup()
    post = ef.laplace(model, loader, hessian="kfac", subset="last_layer", prior_precision=2.0)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.stack([(post.sample(gen) - post.mean).reshape(-1) for _ in range(n)])
    cov = torch.linalg.inv(torch.kron(post.G, post.A) + 2.0 * torch.eye(draws.shape[1], dtype=torch.float64))
    d = torch.diagonal(cov)
    se = ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    assert ((draws.T @ draws / n - cov).abs() <= 5 * se).float().mean() > 0.99


def test_mc_weight_sampling_equals_the_glm_predictive_for_a_last_layer():
    """The network is linear in its last layer: sampling W̄ and the GLM predictive coincide."""
    model, x, y, loader = _setup()
    post = ef.laplace(model, loader, hessian="kfac", subset="last_layer", prior_precision=1.0)
    gen = torch.Generator().manual_seed(0)
    mc = ef.predict(model, post, x[:5], n_samples=20000, generator=gen)
    glm = ef.predict(model, post, x[:5], method="glm", n_samples=20000, generator=gen)
    assert (mc - glm).abs().max() < 5 * math.sqrt(0.25 / 20000) * math.sqrt(2)
    probit = ef.predict(model, post, x[:5], method="probit")
    assert (probit - glm).abs().max() < 0.05


def test_marglik_tuning_maximises_the_evidence():
    model, x, y, loader = _setup()
    post = ef.laplace(model, loader, hessian="kfac", subset="last_layer", prior_precision="marglik")
    with torch.no_grad():
        nll = float(nn.functional.cross_entropy(model(x), y, reduction="sum"))
    best = kron.log_marginal_likelihood(post, nll)
    for factor in (0.5, 0.8, 1.25, 2.0):
        assert kron.log_marginal_likelihood(post, nll, post.prior_precision * factor) < best


def test_last_layer_diag_and_bad_subsets():
    model, x, y, loader = _setup()
    post = ef.laplace(model, loader, hessian="ggn", subset="last_layer")
    assert list(post.mean) == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match="subset"):
        ef.laplace(model, loader, subset="first")
    with pytest.raises(ValueError, match="not both"):  # params= was silently replaced by the last layer
        ef.laplace(model, loader, subset="last_layer", params=["0.weight"])
    with pytest.raises(ValueError, match="nn.Linear"):
        conv = nn.Sequential(nn.Conv1d(1, 1, 1), nn.Flatten())
        ef.laplace(conv, [(torch.randn(2, 1, 3), torch.zeros(2).long())], subset="last_layer")
    for bad in ("evidence", None, True, -1.0, float("nan"), float("inf")):  # True is not 1.0
        with pytest.raises(ValueError, match="prior_precision must be"):
            ef.laplace(model, loader, hessian="kfac", subset="last_layer", prior_precision=bad)
        with pytest.raises(ValueError, match="prior_precision must be"):  # (one check serves both fits)
            ef.laplace(model, loader, hessian="ggn", prior_precision=bad)
        with pytest.raises(ValueError, match="prior_precision must be"):  # (and the posterior from Adam)
            ef.posterior_from_adam(model, torch.optim.Adam(model.parameters()), 8, 8, prior_precision=bad)
    # "auto", BayesAdam's name for the evidence-tuned prior, is "marglik" in both fits (it was refused)
    for kw in ({"hessian": "kfac", "subset": "last_layer"}, {"hessian": "ggn"}):
        auto = ef.laplace(model, loader, prior_precision="auto", **kw).prior_precision
        assert auto == ef.laplace(model, loader, prior_precision="marglik", **kw).prior_precision != 1.0


def test_last_layer_of_a_model_that_is_one_linear_layer():
    """The output layer is the model itself (module name ""): its parameters are 'weight' and 'bias'
    (the fits asked for '.weight', '.bias' and refused the model)."""
    model, x, y, loader = _setup()
    head = model[2]
    wrapped = nn.Sequential(head)
    feats = [(model[1](model[0](xb)).detach(), yb) for xb, yb in loader]
    for hessian in ("kfac", "ggn"):
        bare = ef.laplace(head, feats, hessian=hessian, subset="last_layer", prior_precision="marglik")
        ref = ef.laplace(wrapped, feats, hessian=hessian, subset="last_layer", prior_precision="marglik")
        assert bare.prior_precision == pytest.approx(ref.prior_precision, rel=1e-12)
        f = torch.cat([a for a, _ in feats])
        p_bare, p_ref = (ef.predict(m, q, f, method="probit") for m, q in ((head, bare), (wrapped, ref)))
        torch.testing.assert_close(p_bare, p_ref, rtol=1e-12, atol=1e-12)
        if hessian == "ggn":
            assert list(bare.precision) == ["weight", "bias"]
            torch.testing.assert_close(bare.precision["weight"], ref.precision["0.weight"])


def test_predict_samples_draws_from_the_kronecker_posterior_too():
    model, x, y, loader = _setup()
    post = ef.laplace(model, loader, hessian="kfac", subset="last_layer", prior_precision=1.0)
    x = x[:7]
    g = torch.Generator().manual_seed(2)
    lp = ef.predict_samples(model, post, x, n_samples=6, generator=g)
    ref = ef.predict(model, post, x, n_samples=6, generator=torch.Generator().manual_seed(2))
    assert lp.shape == (x.shape[0], ref.shape[1], 6)
    torch.testing.assert_close(lp.exp().mean(-1), ref)


def test_closed_form_predictive_refuses_a_model_that_changes_the_last_layers_output():
    """A model returning fc(x) / 2 got the covariance of fc's output (4× too large: relative error
    3.0 against the linearised reference), silently; weight samples remain right."""
    torch.manual_seed(0)

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.body(x)) / 2

    model = Scaled()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    post = ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer")
    for method in ("glm", "probit"):
        with pytest.raises(ValueError, match="changes it afterwards"):
            ef.predict(model, post, x, method=method)
    assert ef.predict(model, post, x, method="mc", n_samples=4).shape == (32, 3)


class _HeadFirst(nn.Module):
    """Registers its output layer before the body, and an auxiliary Linear it never calls last."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.unused = nn.Linear(6, 6)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("hessian", ["kfac", "ggn"])
def test_last_layer_is_the_layer_that_produces_the_output_not_the_last_registered(hessian):
    """Registration order picked ``unused`` (never called: a posterior at the prior, no uncertainty
    in the predictive) or ``body.0``; the output layer is found by a forward pass."""
    torch.manual_seed(0)
    model = _HeadFirst().double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    assert kron.last_linear(model)[0] == "unused"  # registration order (without a batch)
    assert kron.last_linear(model, x)[0] == "head"
    post = ef.laplace(model, [(x, y)], hessian=hessian, subset="last_layer", prior_precision=1.0)
    if hessian == "kfac":
        assert post.layer == "head"
        mean, cov = post.predictive_moments(model, x[:4])
        assert float(torch.diagonal(cov, dim1=1, dim2=2).min()) > 0
    else:
        assert list(post.mean) == ["head.weight", "head.bias"]
        ref = ef.laplace(model, [(x, y)], hessian=hessian, params=["head.weight", "head.bias"],
                         prior_precision=1.0)  # fmt: skip
        for n in ref.precision:
            torch.testing.assert_close(post.precision[n], ref.precision[n])
    never = _HeadFirst()
    never.forward = lambda x: x.sum(1, keepdim=True)  # calls no Linear
    with pytest.raises(ValueError, match="calls none"):
        kron.last_linear(never, x.float())


def test_last_layer_fit_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(32, 4)
    model.train()
    before = [b.clone() for b in model.buffers()]
    assert kron.last_linear(model, x)[0] == "3"
    for b, v in zip(model.buffers(), before):
        assert torch.equal(b, v)


def test_marglik_with_a_one_shot_iterator_equals_a_list_loader():
    """One pass over the data: the output layer is found on the first batch without losing it, and
    the evidence needs no second pass (the NLL it summed there is a constant of δ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4))
    batches = [(torch.randn(16, 3), torch.randint(0, 4, (16,))) for _ in range(3)]
    for kw in ({}, {"subset": "last_layer"}):
        ref = ef.laplace(model, batches, prior_precision="marglik", **kw)
        once = ef.laplace(model, (b for b in batches), prior_precision="marglik", **kw)
        assert once.prior_precision == pytest.approx(ref.prior_precision, rel=1e-6)
        for n in ref.precision:
            torch.testing.assert_close(once.precision[n], ref.precision[n])


def test_state_dict_round_trip_with_weights_only_load_and_to():
    import io

    model, x, y, loader = _setup()
    post = ef.laplace(model, loader, hessian="kfac", subset="last_layer", prior_precision="marglik")
    buf = io.BytesIO()
    torch.save(post.state_dict(), buf)
    buf.seek(0)
    loaded = kron.KronLastLayer.from_state_dict(torch.load(buf, weights_only=True))
    assert loaded.layer == post.layer and loaded.prior_precision == post.prior_precision
    for a, b in zip(loaded.predictive_moments(model, x[:5]), post.predictive_moments(model, x[:5])):
        torch.testing.assert_close(a, b)
    moved = post.to(torch.float32)
    assert moved.G.dtype == torch.float32 and moved.prior_precision == post.prior_precision


def test_closed_form_predictive_refuses_an_output_changed_in_place_after_the_layer():
    """``z = fc(h); z.div_(T)`` changed the saved layer output along with the model's, so the
    check that nothing follows the layer passed and the covariance missed the 1/T² scale."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.fc = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            z = self.fc(torch.tanh(self.l1(x)))
            z.div_(2.0)
            return z

    torch.manual_seed(0)
    model = Scaled()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    post = ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer", prior_precision=1.0)
    with pytest.raises(ValueError, match="changes it afterwards"):
        ef.predict(model, post, x, method="probit")
    assert ef.predict(model, post, x, n_samples=4).shape == (16, 3)  # weight samples still work


def test_last_layer_refuses_a_hidden_linear_when_the_output_has_no_layer():
    """GPT-style: the logits are F.linear(h, embedding.weight), so no nn.Linear produces them; the
    last Linear called (a hidden one) was taken as the "last layer", silently."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix = nn.Embedding(10, 6), nn.Linear(6, 6)

        def forward(self, t):
            return nn.functional.linear(torch.tanh(self.mix(self.emb(t).mean(1))), self.emb.weight)

    torch.manual_seed(0)
    model, t, y = Tied(), torch.randint(0, 10, (8, 4)), torch.randint(0, 10, (8,))
    for hessian in ("kfac", "ggn"):
        with pytest.raises(ValueError, match="no nn.Linear produces the model's output .* 'mix'"):
            ef.laplace(model, [(t, y)], hessian=hessian, subset="last_layer")


def test_non_finite_data_is_named_and_a_nan_input_row_predicts_nan_alone():
    """A NaN input in the fit's loader made eigh fail ("ill-conditioned or has too many repeated
    eigenvalues"); a NaN target in the σ fit went on to the evidence. Both are named now, as the
    diagonal fit names them. At prediction, a NaN input row made the closed form refuse the model
    ("changes [the last layer's output] afterwards": NaN ≠ NaN); it predicts NaN for that row only,
    as the MC and diagonal predictives do."""
    model, x, y, _ = _setup()
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="factors A and G summed over the loader are not finite"):
        ef.laplace(model, [(x, y), (bad, y)], hessian="kfac", subset="last_layer", prior_precision="marglik")
    reg = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    t = torch.randn(len(x), 1, dtype=torch.float64)
    t[2] = float("nan")
    with pytest.raises(FloatingPointError, match="residual sum of squares over the loader is not finite"):
        ef.laplace(reg, [(x, t)], likelihood="regression", hessian="kfac", subset="last_layer",
                   sigma_noise="marglik")  # fmt: skip
    post = ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer")
    for method in ("glm", "probit"):
        probs = ef.predict(model, post, bad[:6], method=method, generator=torch.Generator().manual_seed(0))
        assert torch.isnan(probs[3]).all() and torch.isfinite(probs[[0, 1, 2, 4, 5]]).all(), method
        clean = ef.predict(model, post, x[:6], method=method, generator=torch.Generator().manual_seed(0))
        if method == "probit":  # (deterministic: the other rows as without the NaN row)
            torch.testing.assert_close(probs[[0, 1, 2, 4, 5]], clean[[0, 1, 2, 4, 5]])


class _Scaled(nn.Module):
    """The last layer's output scaled after it: the closed form's condition fails."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(3, 5), nn.Tanh()), nn.Linear(5, 4)

    def forward(self, x):
        return 2.0 * self.head(self.body(x))


def test_mc_predictive_runs_the_network_once_with_the_same_numbers():
    """ef.predict(method='mc') of a last-layer posterior ran the whole network once per draw; only
    the last layer varies, so it runs it once and each draw is one F.linear: the same numbers,
    bitwise, for (B, C) logits and a (B,) regression output. A model that changes the layer's output
    afterwards, or draws dropout masks per sample, still runs the network per draw."""
    model, x, y, loader = _setup()
    post = ef.laplace(model, loader, hessian="kfac", subset="last_layer", prior_precision=1.0)
    got = ef.predict(model, post, x[:7], n_samples=9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, per_draw(model, post, x[:7], 9, 3).softmax(-1).mean(0))
    calls = []
    handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    post.draws(model, x[:7], 9)
    handle.remove()
    assert len(calls) == 1  # one forward pass for all nine draws

    torch.manual_seed(1)
    reg = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0)).double()
    t = torch.randn(len(x), dtype=torch.float64)
    rpost = ef.laplace(reg, [(x, t)], likelihood="regression", hessian="kfac", subset="last_layer")
    mean, var = ef.predict(reg, rpost, x[:7], n_samples=9, generator=torch.Generator().manual_seed(4))
    ref = per_draw(reg, rpost, x[:7], 9, 4)
    assert mean.shape == (7,) and torch.equal(mean, ref.mean(0))
    torch.testing.assert_close(var, ref.var(0, unbiased=False) + rpost.sigma_noise**2, rtol=0, atol=0)

    torch.manual_seed(2)
    scaled = _Scaled().double()
    spost = ef.laplace(scaled, loader, hessian="kfac", subset="last_layer", prior_precision=1.0)
    assert spost.draws(scaled, x[:7], 3) is None
    got = ef.predict(scaled, spost, x[:7], n_samples=5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, per_draw(scaled, spost, x[:7], 5, 5).softmax(-1).mean(0))
    dropout = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Linear(5, 4)).double()
    dpost = ef.laplace(dropout.eval(), loader, hessian="kfac", subset="last_layer")
    assert dpost.draws(dropout.train(), x[:7], 3) is None
    assert dpost.draws(dropout.eval(), x[:7], 3) is not None


def test_a_diagonal_last_layer_posterior_also_runs_the_network_once(monkeypatch):
    """ef.laplace(subset='last_layer') with a diagonal hessian: its MC predictive ran the network
    per draw (batched); the draws now go through the layer alone, the same draws and, against
    loading each into the layer, the same numbers bitwise. A posterior beyond one layer, or a
    layer that runs twice, keeps the network path."""
    model, x, y, loader = _setup()
    post = ef.laplace(model, loader, hessian="ggn", subset="last_layer", prior_precision=1.0)
    assert list(post.mean) == ["2.weight", "2.bias"]
    import effortless.api as api

    monkeypatch.setattr(api, "MC_VMAP_MAX_CPU", 0)  # (the network path: one forward per draw)
    calls = []
    handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    got = ef.predict(model, post, x[:7], n_samples=9, generator=torch.Generator().manual_seed(3))
    handle.remove()
    assert len(calls) == 1
    assert torch.equal(got, per_draw(model, post, x[:7], 9, 3).softmax(-1).mean(0))
    only_bias = ef.laplace(model, loader, hessian="ggn", params=["2.bias"])
    got = ef.predict(model, only_bias, x[:7], n_samples=4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, per_draw(model, only_bias, x[:7], 4, 4).softmax(-1).mean(0))
    both = ef.laplace(model, loader, hessian="ggn", params=["0.bias", "2.bias"])  # (two layers vary)
    got = ef.predict(model, both, x[:7], n_samples=4, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, per_draw(model, both, x[:7], 4, 4).softmax(-1).mean(0))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.sq = nn.Linear(3, 4), nn.Linear(4, 4)

        def forward(self, z):
            return self.sq(torch.tanh(self.sq(self.inp(z))))

    twice = Twice().double()
    tpost = ef.laplace(twice, loader, hessian="ggn", params=["sq.weight", "sq.bias"])
    with pytest.raises(ValueError, match="to run once in the forward, it ran 2 times"):
        kron.layer_io(twice, "sq", x[:7])
    got = ef.predict(twice, tpost, x[:7], n_samples=3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, per_draw(twice, tpost, x[:7], 3, 5).softmax(-1).mean(0))
