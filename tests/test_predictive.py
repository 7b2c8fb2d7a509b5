"""The linearised predictive against explicit Jacobians (float64)."""

import math

import pytest
import torch

import effortless as ef
from effortless.curvature import exact
from effortless.posterior import predictive
from tests.conftest import make_batch, make_model, per_draw

ARCHS = ["mlp", "cnn", "residual", "conv1d", "batchnorm", "sequence", "layernorm", "embedding", "shared",
         "recurrent", "inplace", "convvariants", "groupnorm", "decoder", "instancenorm",
         "transformer"]  # fmt: skip


def _posterior(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    prec = {n: 0.5 + 4 * torch.rand(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    return ef.DiagGaussian.from_model(model, prec)


def _reference_cov(model, post, x):
    vec, f = exact._outputs(model)
    J = torch.func.jacrev(lambda th: f(th, x))(vec)  # (B, C, P)
    var = torch.cat([post.variance[n].reshape(-1) for n in exact.flatten(model)[1]])
    return torch.einsum("bcp,bdp,p->bcd", J, J, var)


@pytest.mark.parametrize("arch", ARCHS)
def test_glm_covariance_matches_explicit_jacobians(arch):
    model = make_model(arch)
    x, _ = make_batch(arch, "classification")
    post = _posterior(model)
    mean, cov = predictive.linearised_moments(model, post, x)
    torch.testing.assert_close(cov, _reference_cov(model, post, x), atol=1e-10, rtol=1e-8)
    with torch.no_grad():
        torch.testing.assert_close(mean, model(x))


class _Skips(torch.nn.Module):
    """A Linear with a frozen weight and a trainable bias, and a layer the forward never runs."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.unused = torch.nn.Linear(4, 5), torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)
        self.out = torch.nn.Linear(5, 3)
        self.mid.weight.requires_grad_(False)

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def test_glm_covariance_with_a_frozen_weight_beside_its_bias_and_a_layer_that_does_not_run():
    """The hook path's Linear rule read the weight's variance even where only the bias was in the
    posterior (KeyError), and a planned layer the forward did not run had no saved input
    (KeyError); the frozen weight contributes nothing, the unused layer nothing."""
    torch.manual_seed(0)
    model = _Skips().double()
    x = torch.randn(7, 4, dtype=torch.float64)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    prec = {n: 0.5 + 4 * torch.rand(p.shape, generator=g, dtype=p.dtype) for n, p in trained.items()}
    post = ef.DiagGaussian({n: p.detach().clone() for n, p in trained.items()}, prec)
    _, cov = predictive.linearised_moments(model, post, x)
    params = dict(model.named_parameters())

    def f(th):
        return torch.func.functional_call(model, {**params, **th}, (x,))

    J = torch.func.jacrev(f)({n: p.detach() for n, p in trained.items()})
    ref = sum(torch.einsum("bc...,bd...,...->bcd", J[n], J[n], 1 / prec[n]) for n in trained)
    assert ref.abs().max() > 0
    torch.testing.assert_close(cov, ref, atol=1e-10, rtol=1e-8)


def test_moments_are_taken_at_the_posterior_mean_and_weights_restored():
    model = make_model("mlp")
    x, _ = make_batch("mlp", "classification")
    post = _posterior(model)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the model now sits elsewhere; the predictive must use the posterior mean
    shifted = [p.detach().clone() for p in model.parameters()]
    mean, _ = predictive.linearised_moments(model, post, x)
    for p, b in zip(model.parameters(), before):
        p.data.copy_(b)
    with torch.no_grad():
        torch.testing.assert_close(mean, model(x))
    for p, s in zip(model.parameters(), shifted):
        p.data.copy_(s)
    for p, s in zip(model.parameters(), shifted):
        assert torch.equal(p, s)


def test_glm_samples_converge_and_probit_is_close():
    model = make_model("residual")
    x, _ = make_batch("residual", "classification", n=5)
    post = _posterior(model)
    gen = torch.Generator().manual_seed(0)
    a = ef.predict(model, post, x, method="glm", n_samples=20000, generator=gen)
    b = ef.predict(model, post, x, method="glm", n_samples=20000, generator=gen)
    # two independent MC estimates of the same linearised predictive agree within MC error
    assert (a - b).abs().max() < 5 * math.sqrt(0.25 / 20000) * math.sqrt(2)
    probit = ef.predict(model, post, x, method="probit")
    torch.testing.assert_close(probit.sum(1), torch.ones(5, dtype=torch.float64))
    assert (probit - a).abs().max() < 0.05  # probit approximates the same integral


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_glm_draws_have_the_covariance_also_where_it_is_singular(dtype):
    """Cholesky refused a singular output covariance ("not positive-definite"); ranks 0..C now
    factor exactly (L Lᵀ = cov), positive definite ones as before."""
    g = torch.Generator().manual_seed(0)
    c = 6
    covs = []
    for rank in range(c + 1):
        a = torch.randn(c, rank, generator=g, dtype=torch.float64)
        covs.append(a @ a.T)
    cov = torch.stack(covs).to(dtype)
    L = predictive._factor(cov.clone())
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(L @ L.mT, cov, **tol)
    torch.testing.assert_close(L[-1], torch.linalg.cholesky(cov[-1]), **tol)  # full rank: Cholesky's
    draws = predictive.glm_logits(torch.zeros(c + 1, c, dtype=dtype), cov, n_samples=3, generator=g)
    assert torch.isfinite(draws).all()
    assert torch.equal(draws[:, 0], torch.zeros(3, c, dtype=dtype))  # rank 0: the mean itself
    cov[2, 1, 1] = float("nan")  # an input with NaN: NaN draws for it alone (eigh failed on it)
    draws = predictive.glm_logits(torch.zeros(c + 1, c, dtype=dtype), cov, n_samples=3, generator=g)
    assert torch.isnan(draws[:, 2]).all() and torch.isfinite(draws[:, [0, 1, 3, 4, 5, 6]]).all()


class _Bottleneck(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(4, 1), torch.nn.Linear(1, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x)))


def test_glm_predictive_of_a_posterior_behind_a_bottleneck_matches_weight_space_draws():
    """The posterior over the first layer of a 4-1-5 network reaches the 5 logits through one
    unit: its output covariance has rank 1, and in float32 ``method="glm"`` failed in Cholesky. Now
    it equals the linearised network's softmax averaged over weight-space draws (float64, brute
    force)."""
    torch.manual_seed(0)
    model = _Bottleneck()
    x = torch.randn(6, 4)
    names = ["inp.weight", "inp.bias"]
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    prec = {n: 0.2 + torch.rand(params[n].shape, generator=g, dtype=torch.float64) for n in names}
    mean = {n: params[n].detach().clone() for n in names}
    post = ef.DiagGaussian(mean, {n: p.float() for n, p in prec.items()})
    n, gen = 40000, torch.Generator().manual_seed(2)
    probs = ef.predict(model, post, x, method="glm", n_samples=n, generator=gen)
    model.double()
    x = x.double()
    params = dict(model.named_parameters())
    theta = {k: params[k].detach() for k in names}

    def f(th):
        return torch.func.functional_call(model, {**params, **th}, (x,))

    J = torch.func.jacrev(f)(theta)
    with torch.no_grad():
        f0 = model(x)
    ref = 0
    for k in names:
        z = torch.randn((n, *theta[k].shape), generator=g, dtype=torch.float64) / prec[k].sqrt()
        ref = ref + torch.einsum("bc...,s...->sbc", J[k], z)
    ref = (f0 + ref).softmax(-1).mean(0)
    assert (probs.double() - ref).abs().max() < 5 * math.sqrt(0.25 / n) * math.sqrt(2)


def test_a_posterior_predicts_for_a_model_cast_after_it_was_fitted():
    """A float32 posterior for the model cast to float64 (to evaluate in double precision): the MC
    predictive casts its samples, the linearised one failed in its covariance's matmul ("expected
    m1 and m2 to have the same dtype"). Both now give the float32 model's predictive to float32
    round-off (the covariance against explicit Jacobians in float64)."""
    model = make_model("mlp").float()
    x, _ = make_batch("mlp", "classification")
    post = _posterior(model)
    assert post.variance["0.weight"].dtype == torch.float32
    probs32 = ef.predict(model, post, x.float(), method="probit")
    model.double()
    probs64 = ef.predict(model, post, x, method="probit")
    assert probs64.dtype == torch.float64
    torch.testing.assert_close(probs64, probs32.double(), rtol=1e-5, atol=1e-6)
    mean, cov = predictive.linearised_moments(model, post, x)
    post64 = ef.DiagGaussian({k: v.double() for k, v in post.mean.items()},
                             {k: v.double() for k, v in post.precision.items()})  # fmt: skip
    torch.testing.assert_close(cov, _reference_cov(model, post64, x))
    assert ef.predict_samples(model, post, x, n_samples=3, method="glm").dtype == torch.float64


def test_linearised_predictive_under_bf16_autocast_is_float32_like_the_mc_one():
    """Under bf16 autocast the outputs come in bf16, and the glm draws f + L ξ and their softmax
    were bf16 too (probabilities to 2⁻⁸, log-probabilities for BALD from them); the MC predictive's
    and probit's were float32."""
    model = make_model("mlp").float()
    x, _ = make_batch("mlp", "classification")
    post = _posterior(model)
    x = x.float()
    for method in ("glm", "probit"):
        plain = ef.predict(model, post, x, method=method, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = ef.predict(model, post, x, method=method, generator=torch.Generator().manual_seed(0))
            draws = ef.predict_samples(model, post, x, n_samples=4, method="glm")
        assert auto.dtype == torch.float32 and draws.dtype == torch.float32, method
        torch.testing.assert_close(auto, plain, atol=0.03, rtol=0)  # (the bf16 forward's round-off)


def test_a_one_output_regression_model_gets_its_output_shape_from_every_predictive():
    """A model returning (B,) got (B,) from the MC predictive and (B, 1) from the linearised one:
    compared with (B,) targets, (mean − y)² broadcast to (B, B) without a word."""

    class Squeezed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model("mlp", out=1)

        def forward(self, x):
            return self.net(x).squeeze(-1)

    model = Squeezed()
    x, _ = make_batch("mlp", "regression", out=1)
    post = _posterior(model)
    shapes = {m: [tuple(t.shape) for t in ef.predict(model, post, x, likelihood="regression", method=m)]
              for m in ("mc", "glm")}  # fmt: skip
    assert shapes == {"mc": [(6,), (6,)], "glm": [(6,), (6,)]}
    _, var = ef.predict(model, post, x, likelihood="regression", method="glm", sigma_noise=0.3)
    vec, f = exact._outputs(model)
    J = torch.func.jacrev(lambda th: f(th, x))(vec)  # (B, P): one output per input
    weight_var = torch.cat([post.variance[n].reshape(-1) for n in exact.flatten(model)[1]])
    ref = (J.pow(2) * weight_var).sum(-1) + 0.09
    torch.testing.assert_close(var, ref)
    with pytest.raises(ValueError, match="at least 2 outputs"):
        ef.predict_samples(model, post, x, method="glm")


def test_no_inputs_give_an_empty_predictive_from_every_method():
    """The MC predictive of zero inputs was empty; the linearised one failed in torch.cat of no passes."""
    model = make_model("mlp")
    post = _posterior(model)
    x = torch.zeros(0, 4, dtype=torch.float64)
    for method in ("mc", "glm", "probit"):
        assert ef.predict(model, post, x, method=method).shape == (0, 3)
    assert ef.predict_samples(model, post, x, n_samples=2, method="glm").shape == (0, 3, 2)


def test_regression_glm_variance_includes_noise():
    model = make_model("mlp", out=2)
    x, y = make_batch("mlp", "regression", out=2)
    post = _posterior(model)
    mean, var = ef.predict(model, post, x, method="glm", likelihood="regression", sigma_noise=0.3)
    ref = torch.diagonal(_reference_cov(model, post, x), dim1=-2, dim2=-1) + 0.09
    torch.testing.assert_close(var, ref)
    assert mean.shape == (6, 2)


@pytest.mark.parametrize("method", ["mc", "glm"])
def test_predict_samples_are_the_draws_predict_averages(method):
    model = make_model("mlp")
    x, _ = make_batch("mlp", "classification")
    post = _posterior(model)
    g = torch.Generator().manual_seed(4)
    lp = ef.predict_samples(model, post, x, n_samples=9, method=method, generator=g)
    assert lp.shape == (x.shape[0], model(x).shape[-1], 9)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(x.shape[0], 9, dtype=lp.dtype))
    ref = ef.predict(model, post, x, n_samples=9, method=method, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(lp.exp().mean(-1), ref)
    assert float(lp.std(-1).mean()) > 1e-3  # the draws differ: there is something to average


def test_predict_samples_rejects_bad_input():
    model = make_model("mlp")
    x, _ = make_batch("mlp", "classification")
    post = _posterior(model)
    with pytest.raises(ValueError, match="method"):
        ef.predict_samples(model, post, x, method="probit")
    with pytest.raises(ValueError, match="n_samples"):
        ef.predict_samples(model, post, x, n_samples=0)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "batchnorm", "layernorm"])
def test_mc_predictive_batched_over_samples_equals_one_at_a_time(arch, monkeypatch):
    from effortless import api

    model = make_model(arch).eval()
    x, _ = make_batch(arch, "classification")
    post = _posterior(model)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    batched = ef.predict(model, post, x, n_samples=12, generator=g())
    monkeypatch.setattr(api, "MC_BATCH_NUMBERS", 1)  # chunks of one sample: the sequential path
    sequential = ef.predict(model, post, x, n_samples=12, generator=g())
    torch.testing.assert_close(batched, sequential, rtol=1e-12, atol=1e-12)


def test_mc_batched_path_is_really_taken_and_dropout_falls_back(monkeypatch):
    model = make_model("mlp")
    x, _ = make_batch("mlp", "classification")
    post = _posterior(model)

    def boom(*a, **k):
        raise AssertionError("sequential path used")

    monkeypatch.setattr(ef.DiagGaussian, "sampled", boom)  # the sequential path loads samples with it
    ef.predict(model, post, x, n_samples=8)  # vmap handles a plain MLP
    monkeypatch.undo()
    drop = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Dropout(0.5), torch.nn.Linear(6, 3)).double()
    drop.train()  # random dropout masks: vmap refuses, the loop runs
    post = _posterior(drop)
    with pytest.warns(RuntimeWarning, match="dropout"):  # (deliberate here)
        p = ef.predict(drop, post, x, n_samples=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p.sum(-1), torch.ones(x.shape[0], dtype=p.dtype))


def test_mc_batches_of_samples_are_bounded_by_the_inputs_they_hold(monkeypatch):
    """The batched path ran every sample at once whatever the number of inputs: predicting 60,000
    inputs of a 79k-weight MLP took 1.5 GB more than one sample at a time (and was no faster).
    Calls now hold at most MC_VMAP_INPUTS inputs × samples (the samples together, the inputs in
    pieces); every sample sees every input once, and the predictive is the same."""
    from effortless import api

    model = make_model("mlp")
    x, _ = make_batch("mlp", "classification", n=6)
    post = _posterior(model)
    whole = ef.predict(model, post, x, n_samples=8, generator=torch.Generator().manual_seed(0))
    calls = []
    forward = api._vmapped
    record = lambda *a: calls.append((len(a[3]), len(a[4]))) or forward(*a)  # noqa: E731  (samples, inputs)
    monkeypatch.setattr(api, "_vmapped", record)
    for bound, inputs in ((3 * len(x), x), (16, torch.cat([x] * 4)), (5, x)):
        monkeypatch.setattr(api, "MC_VMAP_INPUTS", bound)
        calls.clear()
        got = ef.predict(model, post, inputs, n_samples=8, generator=torch.Generator().manual_seed(0))
        assert all(s * n <= bound for s, n in calls), calls
        assert sum(s * n for s, n in calls) == 8 * len(inputs)  # each sample on each input once
        torch.testing.assert_close(got, whole if len(inputs) == len(x) else whole.repeat(4, 1))


@pytest.mark.parametrize("dims", [1, 2])
def test_sampled_convolutions_run_one_draw_at_a_time_on_cpu_a_frozen_backbone_batched(dims, monkeypatch):
    """vmap runs a convolution with per-sample weights as a grouped convolution, 1.3-2.8× slower on
    CPU than one draw at a time (LeNet, MNIST-1D CNN; the active-learning BALD scores spent most of
    their time there). Such posteriors now run one draw at a time, the per-draw reference exactly;
    with the convolutions frozen under a sampled two-layer head the batched path stays (the
    backbone runs once)."""
    from effortless import api

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(1, 2, 3) if dims == 1 else torch.nn.Conv2d(1, 2, 3)
    model = torch.nn.Sequential(conv, torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.LazyLinear(8),
                                torch.nn.Tanh(), torch.nn.Linear(8, 3))  # fmt: skip
    shape = (1, 7) if dims == 1 else (1, 5, 5)
    n = api.MC_CONV_VMAP_NUMBERS // math.prod(shape) + 1  # (just above the batched path's bound)
    x = torch.randn(n, *shape)
    model(x)  # (the lazy layer's shape)
    model.eval()
    tries = []
    vmapped = api._vmapped
    monkeypatch.setattr(api, "_vmapped", lambda *a: tries.append(1) or vmapped(*a))
    post = ef.DiagGaussian.from_model(model, 50.0)
    got = ef.predict_samples(model, post, x, 6, generator=torch.Generator().manual_seed(3))
    assert not tries
    assert torch.equal(got, per_draw(model, post, x, 6, 3).log_softmax(-1).permute(1, 2, 0))
    small = x[: n - 1]  # (few numbers: batched, where vmap was faster on the small CNN)
    got = ef.predict_samples(model, post, small, 6, generator=torch.Generator().manual_seed(3))
    assert tries
    ref = per_draw(model, post, small, 6, 3).log_softmax(-1).permute(1, 2, 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    tries.clear()
    conv.requires_grad_(False)
    head = ef.DiagGaussian.from_model(model, 50.0)
    got = ef.predict_samples(model, head, x, 6, generator=torch.Generator().manual_seed(3))
    assert tries
    ref = per_draw(model, head, x, 6, 3).log_softmax(-1).permute(1, 2, 0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_parametrized_convolution_counts_as_sampled():
    """weight_norm keeps the convolution's weight in a submodule (parametrizations.weight.original*)."""
    from torch.nn.utils.parametrizations import weight_norm

    from effortless import api

    conv = weight_norm(torch.nn.Conv2d(1, 2, 3))
    model = torch.nn.Sequential(conv, torch.nn.Flatten(), torch.nn.Linear(18, 3))
    assert api._samples_conv(model, ef.DiagGaussian.from_model(model, 10.0)._match(model))
    model[0].requires_grad_(False)
    assert not api._samples_conv(model, ef.DiagGaussian.from_model(model, 10.0)._match(model))


def test_predictions_leave_batchnorm_statistics_alone_and_glm_refuses_batch_statistics():
    """An MC predictive in training mode updated BatchNorm's running statistics once per weight
    sample; the linearised one failed deep in torch.func (BatchNorm1d) or used per-sample
    statistics (BatchNorm2d)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))  # fmt: skip
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    model.eval()
    post = ef.laplace(model, [(x, y)])
    model.train()
    before = [b.clone() for b in model.buffers()]
    ef.predict(model, post, x, n_samples=4)
    ef.predict_samples(model, post, x, 4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    for method in ("glm", "probit"):
        with pytest.raises(ValueError, match="couples the samples"):
            ef.predict(model, post, x, method=method)
    model.eval()
    assert ef.predict(model, post, x, method="glm").shape == (32, 3)


def _bn_net():
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 3)).double()  # fmt: skip


def test_bn_data_recomputes_batchnorm_statistics_for_each_weight_sample():
    """With bn_data, each weight sample predicts with BatchNorm statistics recomputed at its own
    weights (reference: load the same draw, torch's swa_utils.update_bn, eval forward, float64);
    without it the running statistics of other weights are used and it warns. The model's
    buffers, modes and momenta are as they were; predict_samples draws the same."""
    import copy

    torch.manual_seed(0)
    model = _bn_net()
    x, data = torch.randn(16, 5, dtype=torch.float64), torch.randn(300, 5, dtype=torch.float64) * 2 + 1
    model.train()
    for _ in range(3):
        model(torch.randn(64, 5, dtype=torch.float64))  # running statistics of other inputs
    model.eval()
    post = ef.DiagGaussian.from_model(model, precision=4.0)
    post.from_training = True  # (as BayesAdam's and Adam's posteriors: the warning is for them)
    before = [b.clone() for b in model.buffers()]
    bn = model[1]
    got = ef.predict(model, post, x, n_samples=5, generator=torch.Generator().manual_seed(3), bn_data=data)
    gen, ref = torch.Generator().manual_seed(3), 0
    for _ in range(5):
        m = copy.deepcopy(model)
        draw = post.sample(gen)
        with torch.no_grad():
            for k, p in m.named_parameters():
                p.copy_(draw[k])
        torch.optim.swa_utils.update_bn(list(data.split(256)), m)  # (batches of 256, as bn_data's)
        m.eval()
        ref = ref + m(x).softmax(-1) / 5
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert not bn.training and bn.momentum == 0.1
    with pytest.warns(RuntimeWarning, match="pass bn_data="):
        stale = ef.predict(model, post, x, n_samples=5, generator=torch.Generator().manual_seed(3))
    assert (stale - ref).abs().max() > 1e-2  # (the statistics matter here: the test can fail)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, data[:, 0]), batch_size=256)
    logp = ef.predict_samples(model, post, x, 5, generator=torch.Generator().manual_seed(3), bn_data=loader)
    torch.testing.assert_close(logp.exp().mean(-1), ref, rtol=1e-12, atol=1e-12)


def test_bn_data_is_checked_and_the_warning_only_where_it_applies():
    import warnings

    model = _bn_net().eval()
    x = torch.randn(8, 5, dtype=torch.float64)
    post = ef.DiagGaussian.from_model(model, precision=4.0)
    post.from_training = True
    with pytest.raises(ValueError, match="method='mc' only"):
        ef.predict(model, post, x, method="glm", bn_data=x)
    with pytest.warns(RuntimeWarning, match="use method='mc' with bn_data="):
        ef.predict(model, post, x, method="glm")
    with pytest.raises(TypeError, match="bn_data must be a tensor of inputs or an iterable"):
        ef.predict(model, post, x, bn_data=3)
    with pytest.raises(TypeError, match="bn_data must be"):
        ef.predict(model, post, x, bn_data=[{"x": x}])
    with pytest.raises(ValueError, match="at least one batch of 2"):
        ef.predict(model, post, x, bn_data=x[:1])
    plain = torch.nn.Linear(5, 3).double()
    with pytest.warns(RuntimeWarning, match="bn_data is ignored"):
        ef.predict(plain, ef.DiagGaussian.from_model(plain, precision=4.0), x, bn_data=x)
    model.train()
    with pytest.warns(RuntimeWarning, match="bn_data is ignored.*in training mode"):
        ef.predict(model, post, x, n_samples=2, bn_data=x)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ef.predict(plain, ef.DiagGaussian.from_model(plain, precision=4.0), x)  # no BatchNorm
        model.train()  # batch statistics: nothing stale
        ef.predict(model, post, x, n_samples=2)
        model.eval()
        ef.predict(model, post, x, n_samples=2, bn_data=x)
        del post.from_training  # a posterior fitted on the eval-mode network (ef.laplace): no warning
        ef.predict(model, post, x, n_samples=2)
    state = ef.BayesAdam(model.parameters(), n_data=10).posterior(model).state_dict()
    assert state["from_training"] is True  # (kept with a saved posterior)


def test_fit_leaves_batchnorm_statistics_of_its_posterior_mean():
    """ef.fit ends at the averaged means; the running statistics, collected at the training
    samples, are recomputed there (one pass over the loader, as torch's update_bn)."""
    import copy

    torch.manual_seed(0)
    x, y = torch.randn(256, 5), torch.randint(0, 3, (256,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    model = _bn_net().float()
    ef.fit(model, loader, epochs=3, progress=False)
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(loader, ref)
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var)
    assert model[1].momentum == 0.1
    # a one-shot iterator is used up by its one epoch: the statistics stay the training ones, said
    model = _bn_net().float()
    with pytest.warns(RuntimeWarning, match="not recomputed at the posterior mean"):
        ef.fit(model, iter(list(loader)), epochs=1, n_data=256, scheduler=None, progress=False)
    assert model[1].num_batches_tracked == 4 and model[1].running_mean.abs().sum() > 0  # (not reset)


def test_linearised_moments_are_computed_in_chunks_with_the_same_result(monkeypatch):
    """The hook path held C output gradients for every input at once (3.7 GB for 60,000 inputs of
    784-512-256-10); chunks of inputs bound it, with the same moments."""
    from effortless.experiments.memory import PeakMemory
    from effortless.posterior import predictive

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))
    post = ef.DiagGaussian.from_model(model, 50.0)
    x = torch.randn(600, 20)
    whole = predictive.linearised_moments(model, post, x)
    peaks = []
    for chunk in (10_000, 100):
        monkeypatch.setattr(predictive, "MOMENT_CHUNK", chunk)
        with PeakMemory([*model.parameters(), x, *post.mean.values(), *post.precision.values()]) as mem:
            got = predictive.linearised_moments(model, post, x)
        peaks.append(mem.peak_bytes)
        for a, b in zip(got, whole):
            torch.testing.assert_close(a, b)
    assert peaks[1] < 0.5 * peaks[0]


def test_weight_samples_are_used_inside_one_autocast_region(monkeypatch):
    """torch.autocast caches each parameter's bf16 cast until its outermost region exits, keyed by
    the parameter: samples loaded in place inside one region ran on the first cast. ef.predict
    under bf16 autocast averaged one sample (probabilities 0.59 off), and a forward inside
    sampled_params()/sampled() after one outside it saw the mean."""
    import effortless.api as api

    torch.manual_seed(0)
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    kron = ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer")
    diag = ef.laplace(model, [(x, y)])
    monkeypatch.setattr(api, "MC_VMAP_MAX_CPU", 0)  # the diagonal posterior's sample-by-sample path
    for post in (kron, diag):
        ref = ef.predict(model, post, x, n_samples=8, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ef.predict(model, post, x, n_samples=8, generator=torch.Generator().manual_seed(0))
            lp = ef.predict_samples(model, post, x, n_samples=2)
        assert (got - ref).abs().max() < 0.02
        # float32 as the batched path's and the linearised ones' (these draws run one at a time and
        # came in bf16: probabilities to 2⁻⁸)
        assert got.dtype == lp.dtype == torch.float32
    opt = ef.BayesAdam(model.parameters(), n_data=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        at_mean = model(x)
        with opt.sampled_params(train=True):
            sampled = model(x)
        with diag.sampled(model, torch.Generator().manual_seed(0)):
            sampled2 = model(x)
        again = model(x)
    assert not torch.equal(at_mean, sampled) and not torch.equal(at_mean, sampled2)
    assert torch.equal(at_mean, again)


def test_linearised_moments_passes_are_sized_by_the_models_footprint(monkeypatch):
    """After a first pass, the hook path's passes keep C × (saved numbers + per-sample gradients of
    layers without a covariance rule) per sample under the budget: 1,024-input passes of a 28×28
    CNN held 3.3 GB. The moments do not depend on the passes."""
    from effortless.curvature import functional
    from effortless.posterior import predictive

    model = make_model("cnn")
    x, _ = make_batch("cnn", "classification", n=23)
    post = _posterior(model)
    ref = _reference_cov(model, post, x)
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    monkeypatch.setattr(functional, "HOOK_FIRST", 4)
    monkeypatch.setattr(functional, "HOOK_BUDGET", 4000)
    mean, cov = predictive.linearised_moments(model, post, x)
    torch.testing.assert_close(cov, ref, atol=1e-10, rtol=1e-8)
    assert calls[0] == 4 and sum(calls[1:]) == 19 and max(calls[1:]) < 19, calls


def test_mc_predictive_of_a_head_on_a_frozen_backbone_runs_the_backbone_once_per_input(monkeypatch):
    """A posterior over a two-layer head (the backbone frozen): with more inputs than the batched
    path took at once, every sample ran the whole network alone (10,000 inputs, 32 samples, a
    784-1024-1024 backbone: 11.2 s). The inputs are split instead, and under vmap the backbone
    runs once per input (0.74 s there); the predictive is the per-draw one to round-off."""
    import effortless.api as api

    monkeypatch.setattr(api, "MC_VMAP_INPUTS", 64)  # (2**14 in use: 100 inputs × 8 samples exceed 64)
    torch.manual_seed(0)
    back = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU()).double().requires_grad_(False)
    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    model = torch.nn.Sequential(back, head)
    x = torch.randn(100, 6, dtype=torch.float64)
    post = _posterior(model)  # (the trainable parameters: the head's)
    assert list(post.mean) == ["1.0.weight", "1.0.bias", "1.2.weight", "1.2.bias"]
    rows = []
    handle = back[0].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    got = ef.predict(model, post, x, n_samples=8, generator=torch.Generator().manual_seed(1))
    handle.remove()
    assert sum(rows) == 100  # each input through the backbone once (it was 8 × 100)
    torch.testing.assert_close(got, per_draw(model, post, x, 8, 1).softmax(-1).mean(0))


def test_mc_predictive_keeps_the_inputs_whole_for_training_mode_batchnorm(monkeypatch):
    """Training-mode BatchNorm normalises with the batch's statistics: the inputs split into pieces
    (the batched path's bound) would have changed every prediction; they stay whole there."""
    import effortless.api as api

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3)).double().train()  # fmt: skip
    x = torch.randn(40, 5, dtype=torch.float64)
    post = _posterior(model)
    whole = ef.predict(model, post, x, n_samples=4, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(api, "MC_VMAP_INPUTS", 16)  # (4 samples: pieces of 4 inputs otherwise)
    split = ef.predict(model, post, x, n_samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(split, whole)
    model.eval()[1].track_running_stats = False  # (eval mode without running statistics: the same)
    model[1].running_mean = model[1].running_var = None
    monkeypatch.setattr(api, "MC_VMAP_INPUTS", 2**14)
    whole = ef.predict(model, post, x, n_samples=4, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(api, "MC_VMAP_INPUTS", 16)
    split = ef.predict(model, post, x, n_samples=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(split, whole)


def test_mc_predictive_tries_vmap_once_for_a_model_it_cannot_run(monkeypatch):
    """A model with data-dependent control flow: vmap fails; with the inputs in pieces it was tried
    (and failed) on every piece, each piece then run draw by draw. One try; then the draws go
    through the whole input one at a time, the same predictive."""
    import effortless.api as api

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)

        def forward(self, z):
            h = torch.relu(self.a(z))
            return self.b(h * 2.0 if float(h.mean()) > 1e9 else h)

    torch.manual_seed(0)
    model = Branchy().double()
    x = torch.randn(40, 5, dtype=torch.float64)
    post = _posterior(model)
    monkeypatch.setattr(api, "MC_VMAP_INPUTS", 16)  # (8 samples: pieces of 2 inputs)
    tries, inputs = [], []
    vmapped, one = api._vmapped, api._one_at_a_time
    monkeypatch.setattr(api, "_vmapped", lambda *a: tries.append(1) or vmapped(*a))
    monkeypatch.setattr(api, "_one_at_a_time", lambda *a: inputs.append(len(a[3])) or one(*a))
    got = ef.predict(model, post, x, n_samples=8, generator=torch.Generator().manual_seed(0))
    assert len(tries) == 1 and inputs == [40]
    torch.testing.assert_close(got, per_draw(model, post, x, 8, 0).softmax(-1).mean(0))
