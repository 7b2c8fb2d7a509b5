import re
import warnings

import pytest
import torch
from torch import nn

import effortless as ef
from effortless import curvature


def _cls_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def _loader(x, y, bs=32):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)


def test_fit_returns_named_posterior_and_learns():
    x, y = _cls_data()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    post = ef.fit(model, _loader(x, y), likelihood="classification", epochs=30, lr=1e-2, progress=False)
    assert list(post.mean) == [n for n, _ in model.named_parameters()]
    probs = ef.predict(model, post, x, n_samples=16, generator=torch.Generator().manual_seed(0))
    assert probs.shape == (96, 2)
    torch.testing.assert_close(probs.sum(1), torch.ones(96))
    assert (probs.argmax(1) == y).float().mean() > 0.9


@pytest.mark.parametrize("hessian", ["reparam", "ggn-mc", "efisher"])
def test_fit_accepts_every_kind_of_estimator(hessian):
    x, y = _cls_data(n=32)
    model = nn.Linear(4, 2)
    post = ef.fit(model, _loader(x, y), epochs=2, hessian=hessian, progress=False)
    assert all((v > 0).all() for v in post.precision.values())


def test_regression_predictive_includes_noise_and_is_wider_off_data():
    x = torch.linspace(-1, 1, 64)[:, None]
    y = torch.sin(3 * x)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
    post = ef.fit(model, _loader(x, y, 16), likelihood="regression", sigma_noise=0.1, epochs=60,
                  lr=1e-2, temperature=1.0, progress=False)  # fmt: skip
    xt = torch.tensor([[0.0], [6.0]])
    mean, var = ef.predict(model, post, xt, n_samples=200, likelihood="regression", sigma_noise=0.1,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert mean.shape == var.shape == (2, 1)
    assert (var >= 0.1**2).all()
    assert var[1] > var[0]  # far from the data the predictive is wider


@pytest.mark.parametrize("noise, sigma, warns", [(0.05, None, True), (0.05, 0.05, False), (1.0, None, False),
                                                 (8.0, None, True)])  # fmt: skip
def test_fit_warns_when_the_default_regression_noise_is_far_from_the_residuals(noise, sigma, warns):
    """σ = 1 (the default) on targets with noise 0.05 weighed the data 400× too little and put 1
    into every predictive variance, silently. Left unset, fit now reads the residuals' size off
    the last epoch's Gaussian NLL and says so; a σ the user passed is theirs, and σ = 1 on noise
    of about 1 is right."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, generator=g)
    y = 0.2 * x @ torch.tensor([[1.0], [2.0], [-1.0]]) + noise * torch.randn(512, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = ef.fit(model, _loader(x, y, 32), likelihood="regression", sigma_noise=sigma, epochs=20,
                      progress=False)  # fmt: skip
    said = [str(w.message) for w in caught if "sigma_noise=1" in str(w.message)]
    assert bool(said) == warns, said
    assert post.sigma_noise == (1.0 if sigma is None else sigma)
    if warns:
        rms = float(re.search(r"RMS ([0-9.e+-]+)", said[0]).group(1))
        with torch.no_grad():
            final = float((model(x) - y).pow(2).mean().sqrt())
        assert 0.7 < rms / final < 1.5, (rms, final)  # (the last epoch's, at its weight samples)


def test_fit_refuses_marglik_noise_and_names_where_it_is_chosen():
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    with pytest.raises(ValueError, match="sigma_noise='marglik'"):
        ef.fit(nn.Linear(3, 1), _loader(x, y, 8), likelihood="regression", sigma_noise="marglik",
               progress=False)  # fmt: skip


def _fitted_regression(noise, bn=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, generator=g)
    y = 0.2 * x @ torch.tensor([[1.0], [2.0], [-1.0]]) + noise * torch.randn(256, 1, generator=g)
    torch.manual_seed(0)
    layers = [nn.Linear(3, 16), *([nn.BatchNorm1d(16)] if bn else []), nn.Tanh(), nn.Linear(16, 1)]
    model = nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        (model(x) - y).pow(2).mean().backward()
        opt.step()
    return model, x, y


@pytest.mark.parametrize("kwargs, noise, warns", [
    ({}, 0.05, True), ({"hessian": "kfac", "subset": "last_layer"}, 0.05, True), ({}, 1.0, False),
    ({"sigma_noise": 1.0}, 0.05, False), ({"sigma_noise": "marglik"}, 0.05, False),
    ({"likelihood": ef.likelihoods.get("regression", 0.05)}, 0.05, False),
])  # fmt: skip
def test_laplace_warns_when_the_default_regression_noise_is_far_from_the_residuals(kwargs, noise, warns):
    """As ef.fit: the default σ = 1 on targets with noise 0.05 gave a posterior and a predictive
    variance for noise 20× the data's, silently. Left unset, one forward pass measures the residuals."""
    model, x, y = _fitted_regression(noise)
    with torch.no_grad():
        rms = float((model(x) - y).pow(2).mean().sqrt())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ef.laplace(model, _loader(x, y, 64), **({"likelihood": "regression"} | kwargs))
    said = [str(w.message) for w in caught if "default sigma_noise" in str(w.message)]
    assert bool(said) == warns, said
    if warns:
        assert f"RMS {rms:.3g}" in said[0]


def test_the_residual_pass_leaves_batchnorm_statistics_alone():
    model, x, y = _fitted_regression(0.05, bn=True)
    bn = model[1]
    before = [b.clone() for b in bn.buffers()]
    with pytest.warns(RuntimeWarning, match="default sigma_noise"):
        ef.laplace(model, _loader(x[:200], y[:200], 50), likelihood="regression", hessian="hessian")
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))


def test_laplace_sums_the_curvature_over_the_loader():
    x, y = _cls_data(n=64)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = x.double()
    post = ef.laplace(model, _loader(x, y, 16), hessian="ggn", prior_precision=2.0)
    ref = curvature.diag_ggn(model, x, y)
    for k in ref:
        torch.testing.assert_close(post.precision[k], ref[k] + 2.0)
        torch.testing.assert_close(post.mean[k], dict(model.named_parameters())[k].detach())
    last = ef.laplace(model, _loader(x, y, 16), hessian="efisher", params=["2.weight", "2.bias"])
    assert list(last.mean) == ["2.weight", "2.bias"]


@pytest.mark.parametrize("fit", ["classification", "regression-marglik-noise"])
def test_laplace_names_a_non_finite_curvature(fit):
    """NaN in the data (or the weights) made a NaN precision, which DiagGaussian then refused as
    "must be positive everywhere", hiding the cause."""
    x, y = _cls_data(n=32)
    x[5, 2] = float("nan")
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2 if fit == "classification" else 1))
    if fit == "classification":
        call = lambda: ef.laplace(model, _loader(x, y), hessian="ggn")  # noqa: E731
    else:
        yr = y.float()[:, None]
        call = lambda: ef.laplace(model, _loader(x, yr), likelihood="regression", sigma_noise="marglik")  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"not finite for '0.weight' and \d+ more"):
        call()


def test_bad_arguments_raise_value_errors():
    x, y = _cls_data(n=8)
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="hessian"):
        ef.laplace(model, _loader(x, y), hessian="reparam")
    with pytest.raises(ValueError, match="prior_precision"):
        ef.laplace(model, _loader(x, y), prior_precision=-1.0)
    with pytest.raises(ValueError, match="epochs"):
        ef.fit(model, _loader(x, y), epochs=0)
    post = ef.DiagGaussian.from_model(model, 1.0)
    with pytest.raises(ValueError, match="n_samples"):
        ef.predict(model, post, x, n_samples=0)
    with pytest.raises(ValueError, match="method"):
        ef.predict(model, post, x, method="laplace")
    # an empty loader would leave the prior alone as the "posterior": refused on every path
    for kw in ({}, {"prior_precision": "marglik"}, {"subset": "last_layer", "hessian": "kfac"}):
        with pytest.raises(ValueError, match="no batches"):
            ef.laplace(model, [], **kw)
    with pytest.raises(ValueError, match="no data"):
        ef.laplace(model, [], likelihood="regression", sigma_noise="marglik")


def test_a_one_output_model_is_refused_as_a_classifier():
    """softmax over one logit is 1 for every input: predictive, samples and training refuse it."""
    x = torch.randn(16, 4)
    model = nn.Linear(4, 1)
    post = ef.DiagGaussian.from_model(model, 10.0)
    for method in ("mc", "glm", "probit"):
        with pytest.raises(ValueError, match="at least 2 outputs"):
            ef.predict(model, post, x, method=method)
    with pytest.raises(ValueError, match="at least 2 outputs"):
        ef.predict_samples(model, post, x, n_samples=2)
    with pytest.raises(ValueError, match="at least 2 outputs"):
        ef.BayesAdam(model.parameters(), n_data=16).train_step(model, x, torch.zeros(16, dtype=torch.long))
    mean, var = ef.predict(model, post, x, likelihood="regression")  # as regression it is fine
    assert mean.shape == var.shape == (16, 1)


class _DictBatches(torch.utils.data.Dataset):
    def __init__(self, x, y, extra=False):
        self.x, self.y, self.extra = x, y, extra

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i], self.y[i], i) if self.extra else {"x": self.x[i], "y": self.y[i]}


@pytest.mark.parametrize("extra", [False, True], ids=["dict", "triple"])
def test_batches_that_are_not_pairs_are_refused_by_name(extra):
    """A dict batch unpacked into its two keys ('str' object has no attribute 'to'); a third
    element failed with 'too many values to unpack'."""
    x, y = _cls_data(n=16)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    loader = torch.utils.data.DataLoader(_DictBatches(x, y, extra), batch_size=8)
    got = "list of 3" if extra else r"dict with keys \['x', 'y'\]"
    calls = [
        lambda: ef.fit(model, loader, epochs=1, progress=False),
        lambda: ef.laplace(model, loader),
        lambda: ef.laplace(model, loader, hessian="kfac", subset="last_layer"),
        lambda: curvature.accumulate(model, loader, hessian="kfac"),
        lambda: curvature.accumulate(model, loader, hessian="ggn"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=f"pair, got a {got}"):
            call()


def test_fit_refuses_an_iterator_used_up_after_the_first_epoch():
    x, y = _cls_data(n=16)
    model = nn.Linear(4, 2)
    def once():
        return ((x[i : i + 8], y[i : i + 8]) for i in range(0, 16, 8))

    with pytest.raises(ValueError, match="len"):
        ef.fit(model, once(), epochs=2, n_data=16, progress=False)
    with pytest.raises(ValueError, match="no batches in epoch 2"):
        ef.fit(model, once(), epochs=2, n_data=16, scheduler=None, progress=False)


def test_fit_on_an_empty_dataset_says_so():
    x, y = _cls_data(n=16)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]), batch_size=4)
    with pytest.raises(ValueError, match="dataset is empty"):
        ef.fit(nn.Linear(4, 2), empty, epochs=1, progress=False)


def test_fit_and_laplace_name_what_they_cannot_do():
    x, y = _cls_data(n=16)
    model = nn.Linear(4, 2)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return ((x[i : i + 8], y[i : i + 8]) for i in range(0, 16, 8))

    with pytest.raises(ValueError, match="n_data: the loader has no dataset length"):
        ef.fit(model, torch.utils.data.DataLoader(Stream(), batch_size=None), epochs=1, progress=False)
    with pytest.raises(ValueError, match="scheduler must be 'cosine' or None"):
        ef.fit(model, _loader(x, y), epochs=1, scheduler="linear", progress=False)
    with pytest.raises(ValueError, match="the loader yielded no batches"):
        ef.laplace(model, [], hessian="ggn", subset="last_layer")


def test_laplace_warns_when_dropout_is_active():
    x, y = _cls_data(n=16)
    model = nn.Sequential(nn.Linear(4, 5), nn.Dropout(0.5), nn.Tanh(), nn.Linear(5, 2))
    with pytest.warns(RuntimeWarning, match="dropout '1' is active"):
        ef.laplace(model, _loader(x, y))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ef.laplace(model, _loader(x, y))


class _DictOutput(torch.nn.Module):
    """Returns its logits in a dict, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def forward(self, x):
        return {"logits": self.fc(x)}


def test_a_model_returning_a_dict_is_told_to_return_a_tensor():
    """It failed deep inside with "'dict' object has no attribute 'dim'" (or a torch.stack/cat
    error), in every function that reads the model's output."""
    from effortless import curvature

    torch.manual_seed(0)
    model, x, y = _DictOutput(), torch.randn(16, 4), torch.randint(0, 3, (16,))
    post = ef.DiagGaussian.from_model(model, 10.0)
    opt = ef.BayesAdam(model.parameters(), n_data=16)
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    ggn_opt = ef.BayesAdam(model.parameters(), n_data=16, hessian="ggn")
    calls = {
        "diag_ggn": lambda: curvature.diag_ggn(model, x, y),
        "diag_efisher": lambda: curvature.diag_efisher(model, x, y),
        "diag_hessian": lambda: curvature.diag_hessian(model, x, y),
        "gvp": lambda: curvature.operators.gvp(model, x, y, ones),
        "laplace": lambda: ef.laplace(model, [(x, y)]),
        "last-layer kfac": lambda: ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer"),
        "predict mc": lambda: ef.predict(model, post, x, n_samples=4),
        "predict glm": lambda: ef.predict(model, post, x, method="glm"),
        "train_step": lambda: opt.train_step(model, x, y),
        "train_step ggn": lambda: ggn_opt.train_step(model, x, y),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="returned a dict with keys \\['logits'\\]"):
            call()
            pytest.fail(name)


def test_fit_counts_the_examples_the_loader_trains_on(monkeypatch):
    """A DataLoader over the whole dataset with a SubsetRandomSampler (a train/validation split)
    trains on the subset; n_data was len(dataset), silently counting the held-out examples."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(100, 4), torch.randint(0, 3, (100,)))
    model = torch.nn.Linear(4, 3)
    seen, init = [], ef.BayesAdam.__init__

    def spy(self, *a, **kw):
        seen.append(kw["n_data"])
        init(self, *a, **kw)

    monkeypatch.setattr(ef.BayesAdam, "__init__", spy)
    ef.fit(model, DataLoader(ds, batch_size=20, shuffle=True), epochs=1, progress=False)
    ef.fit(model, DataLoader(ds, batch_size=20, sampler=SubsetRandomSampler(range(70))), epochs=1,
           progress=False)  # fmt: skip
    from torch.utils.data import BatchSampler

    from effortless.data import loader  # (batches gathered whole: a BatchSampler as the sampler)

    ef.fit(model, loader(*ds.tensors, batch_size=20), epochs=1, progress=False)
    ef.fit(model, DataLoader(ds, sampler=BatchSampler(SubsetRandomSampler(range(60)), 20, False),
                             batch_size=None), epochs=1, progress=False)  # fmt: skip
    assert seen == [100, 70, 100, 60]
    with pytest.raises(ValueError, match="WeightedRandomSampler .* pass n_data="):
        ef.fit(model, DataLoader(ds, batch_size=20, sampler=WeightedRandomSampler(torch.ones(100), 50)),
               epochs=1, progress=False)  # fmt: skip


def test_laplace_with_an_indefinite_hessian_says_why():
    """The Hessian diagonal is negative in places away from a minimum: the error named only
    "precision must be positive"."""
    from tests.conftest import make_batch, make_model

    model = make_model("attention")
    x, y = make_batch("attention", "classification", n=16)
    for hessian in ("hessian", "hutchinson"):
        with pytest.raises(ValueError, match="has negative diagonal entries .* hessian='ggn'"):
            ef.laplace(model, [(x, y)], hessian=hessian, prior_precision=1e-3)
    assert ef.laplace(model, [(x, y)], hessian="ggn", prior_precision=1e-3).numel() > 0


def test_predict_warns_when_dropout_is_active():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
    post = ef.DiagGaussian.from_model(model, 100.0)
    x = torch.randn(5, 4)
    for call in (lambda: ef.predict(model, post, x, n_samples=2),
                 lambda: ef.predict_samples(model, post, x, n_samples=2)):  # fmt: skip
        with pytest.warns(RuntimeWarning, match="dropout '1' is active") as rec:
            call()
        assert rec[0].filename == __file__  # points at the caller
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ef.predict(model, post, x, n_samples=2)


def test_fit_records_the_regression_noise_for_predict():
    """ef.fit(likelihood='regression', sigma_noise=0.1) then ef.predict without sigma_noise used
    σ = 1 in the predictive variance (100× the noise variance here), silently."""
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 64)[:, None]
    y = x.sin() + 0.1 * torch.randn_like(x)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    post = ef.fit(model, [(x, y)], likelihood="regression", sigma_noise=0.1, epochs=3, n_data=64,
                  progress=False)  # fmt: skip
    assert post.sigma_noise == 0.1
    assert ef.laplace(model, [(x, y)], likelihood="regression", sigma_noise=0.1).sigma_noise == 0.1
    g = torch.Generator().manual_seed(0)
    _, var = ef.predict(model, post, x, likelihood="regression", n_samples=4, generator=g)
    _, ref = ef.predict(model, post, x, likelihood="regression", n_samples=4, sigma_noise=0.1,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(var, ref)


def test_bayesadam_posterior_carries_train_steps_regression_noise_through_a_checkpoint():
    torch.manual_seed(0)
    x, y = torch.randn(32, 2), torch.randn(32, 1)
    model = torch.nn.Linear(2, 1)
    opt = ef.BayesAdam(model.parameters(), n_data=32)
    assert not hasattr(opt.posterior(), "sigma_noise")  # nothing known: predict's σ = 1
    opt.train_step(model, x, y, likelihood="regression", sigma_noise=0.3)
    assert opt.posterior().sigma_noise == 0.3
    fresh = ef.BayesAdam(model.parameters(), n_data=32)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.posterior().sigma_noise == 0.3


def test_fit_with_an_optimizer_refuses_settings_it_would_ignore():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    opt = ef.BayesAdam(model.parameters(), n_data=8)
    for kw in ({"lr": 1e-2}, {"n_data": 100}, {"hessian": "ggn"}):
        with pytest.raises(ValueError, match="would be ignored with optimizer="):
            ef.fit(model, data, epochs=1, optimizer=opt, progress=False, **kw)
    ef.fit(model, data, epochs=1, optimizer=opt, progress=False)  # continuing as is works


def test_posteriors_record_their_likelihood_and_predict_checks_it():
    """A 2-output regression posterior passed to ef.predict without likelihood= came back as softmax
    probabilities, and a classification posterior predicted with likelihood='regression' as
    (mean, variance) of its logits: numbers either way, no error."""
    torch.manual_seed(0)
    x, yr, yc = torch.randn(32, 4), torch.randn(32, 2), torch.randint(0, 2, (32,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reg = ef.laplace(model, [(x, yr)], likelihood="regression")
    cls = ef.laplace(model, [(x, yc)], likelihood="classification")
    kfac = ef.laplace(model, [(x, yr)], likelihood="regression", hessian="kfac", subset="last_layer")
    noise = ef.laplace(model, [(x, yr)], likelihood="regression", sigma_noise="marglik")
    opt = ef.BayesAdam(model.parameters(), n_data=32)
    opt.train_step(model, x, yr, likelihood="regression")
    fitted = ef.fit(model, [(x, yc)], likelihood="classification", epochs=1, n_data=32, progress=False)
    assert (reg.likelihood, kfac.likelihood, noise.likelihood) == ("regression",) * 3
    assert (cls.likelihood, fitted.likelihood) == ("classification",) * 2
    fresh = ef.BayesAdam(model.parameters(), n_data=32)
    fresh.load_state_dict(opt.state_dict())  # the optimizer's checkpoint keeps it
    trained = fresh.posterior()
    assert trained.likelihood == "regression"
    saved = ef.DiagGaussian({}, {})
    saved.load_state_dict(reg.state_dict())
    assert saved.likelihood == saved.to(torch.float64).likelihood == "regression"
    assert type(kfac).from_state_dict(kfac.state_dict()).likelihood == "regression"
    for post in (reg, kfac, trained, saved):
        g = torch.Generator().manual_seed(0)
        out = ef.predict(model, post, x, n_samples=3, generator=g)  # the posterior's likelihood
        assert isinstance(out, tuple) and out[0].shape == out[1].shape == (32, 2)
        with pytest.raises(ValueError, match="fitted with likelihood='regression'"):
            ef.predict(model, post, x, n_samples=3, likelihood="classification")
        with pytest.raises(ValueError, match="likelihood='regression'"):
            ef.predict_samples(model, post, x, n_samples=3)
    with pytest.raises(ValueError, match="fitted with likelihood='classification'"):
        ef.predict(model, cls, x, likelihood="regression")
    probs = ef.predict(model, cls, x, n_samples=3)
    assert probs.shape == (32, 2) and torch.allclose(probs.sum(-1), torch.ones(32))
    one = torch.nn.Linear(4, 1)  # nothing recorded, one output: the message names ef.predict
    with pytest.raises(ValueError, match="at least 2 outputs .* use ef.predict"):
        ef.predict_samples(one, ef.DiagGaussian.from_model(one, 10.0), x, n_samples=2)
    unknown = ef.DiagGaussian.from_model(model, 10.0)  # nothing recorded: classification unless told
    assert ef.predict(model, unknown, x, n_samples=2).shape == (32, 2)
    assert len(ef.predict(model, unknown, x, n_samples=2, likelihood="regression")) == 2


def test_non_tensor_inputs_get_a_clear_error():
    """A DataLoader, a list of batches or a NumPy array as x failed with "'DataLoader' object has
    no attribute 'device'"; an empty batch in train_step with a ZeroDivisionError."""
    model = torch.nn.Linear(4, 3)
    post = ef.DiagGaussian.from_model(model, 10.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(10, 4)), batch_size=4)
    for fn in (ef.predict, ef.predict_samples):
        with pytest.raises(TypeError, match="got DataLoader .*torch.cat"):
            fn(model, post, loader)
        with pytest.raises(TypeError, match="got ndarray .*torch.as_tensor"):
            fn(model, post, torch.randn(3, 4).numpy())
    opt = ef.BayesAdam(model.parameters(), n_data=10)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="x must be a tensor"):
        opt.train_step(model, x.numpy(), y)
    with pytest.raises(ValueError, match="empty batch"):
        opt.train_step(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="one label or target row per input"):
        opt.train_step(model, x, y[:2])
    assert opt.state_dict()["state"] == {}  # nothing was drawn or stepped
    opt.train_step(model, x, y)
    with pytest.raises(TypeError, match="its inputs are a ndarray"):
        ef.laplace(model, [(x.numpy(), y)])
    with pytest.raises(TypeError, match="its targets are a list"):
        ef.fit(model, [(x, y.tolist())], n_data=3, epochs=1, progress=False)


def test_predictives_and_laplace_fits_run_inside_inference_mode():
    """Lightning's validation, test and predict loops run in torch.inference_mode(), where autograd
    cannot save tensors: the linearised predictive, predict_samples(method="glm"), the Laplace
    fits and the curvature functions failed with "Inference tensors do not track version counter".
    Inside it they now give what they give outside, and train_step (which trains) is refused by
    name there; under no_grad it runs as a closure does (it failed: no grad_fn)."""
    x, y = _cls_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    loader = _loader(x, y)
    post = ef.laplace(model, loader)
    calls = {
        "probit": lambda: ef.predict(model, post, x, method="probit"),
        "glm": lambda: ef.predict(model, post, x, method="glm", generator=torch.Generator().manual_seed(0)),
        "glm draws": lambda: ef.predict_samples(model, post, x, n_samples=4, method="glm",
                                                generator=torch.Generator().manual_seed(0)),  # fmt: skip
        "laplace": lambda: ef.laplace(model, loader, hessian="efisher").precision["0.weight"],
        "last-layer kfac": lambda: ef.predict(
            model, ef.laplace(model, loader, hessian="kfac", subset="last_layer"), x, method="probit"
        ),
        "diag_ggn": lambda: curvature.diag_ggn(model, x, y)["2.weight"],
    }
    for name, call in calls.items():
        expected = call()
        with torch.inference_mode():
            got = call()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9, msg=name)
    twins = []
    for context in (torch.enable_grad, torch.no_grad):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        gen = torch.Generator().manual_seed(0)
        opt = ef.BayesAdam(net.parameters(), n_data=96, hessian="ggn", generator=gen)
        with context():
            opt.train_step(net, x, y)
        twins.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*twins))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="train_step trains.*inference_mode"):
        opt.train_step(net, x, y)
    assert all(torch.equal(a, b) for a, b in zip(twins[1], net.parameters()))


def test_fit_shows_progress_per_batch_where_the_loader_has_a_length(capsys):
    """The bar counted epochs, so it stood still through a long epoch (one epoch of a large data
    set: 0/1 until the end); with a length it counts batches, and shows the epoch and the loss."""
    pytest.importorskip("tqdm")
    x, y = _cls_data(n=64)
    ef.fit(nn.Linear(4, 2), _loader(x, y, bs=16), epochs=3)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "12/12" in err and "batch" in err and "epoch=3/3" in err and "loss=" in err
    ef.fit(nn.Linear(4, 2), iter([(x, y)]), epochs=1, scheduler=None, n_data=64)  # (no length: epochs)
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "1/1" in err and "epoch" in err and "batch" not in err
    ef.fit(nn.Linear(4, 2), _loader(x, y, bs=16), epochs=1, progress=False)
    assert capsys.readouterr().err == ""


def test_curvature_of_a_model_with_nothing_trainable_is_refused_by_name():
    """torch said "`inputs` argument to `grad()` cannot be empty" from inside the estimator."""
    x, y = _cls_data(n=8)
    model = nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of the model has requires_grad=False"):
        ef.laplace(model, _loader(x, y))
    with pytest.raises(ValueError, match="every parameter of the model has requires_grad=False"):
        curvature.diag_ggn(model, x, y)
    with pytest.raises(ValueError, match="params: no parameter names given"):
        curvature.diag_efisher(nn.Linear(4, 2), x, y, params=[])
    with pytest.raises(ValueError, match=r"names, got the string 'bias' \(use \['bias'\]\)"):
        ef.laplace(nn.Linear(4, 2), _loader(x, y), params="bias")  # (was: unknown names ['b', 'i', 'a', 's'])
    assert set(curvature.diag_ggn(model, x, y, params=["bias"])) == {"bias"}  # (named: taken, frozen or not)


def test_counts_take_numpy_ints_and_refuse_bools():
    """np.int64 counts (an array's size, arithmetic on one) were refused with "must be a positive
    int, got 2"; True passed as 1. A checkpoint keeps plain ints (weights_only loads refuse NumPy)."""
    import io

    import numpy as np

    x, y = _cls_data(n=16)
    model = nn.Linear(4, 2)
    post = ef.fit(model, _loader(x, y, bs=8), epochs=np.int64(1), progress=False)
    assert ef.predict(model, post, x, n_samples=np.int64(3)).shape == (16, 2)
    assert ef.predict_samples(model, post, x, n_samples=np.int64(3)).shape == (16, 2, 3)
    sizes = {"n_data": 16, "mc_samples": 2, "noise_reuse": 2, "batch_size": 8}
    counts = {k: np.int64(v) for k, v in sizes.items()}
    opt = ef.BayesAdam(model.parameters(), hessian="gradsq", **counts)
    opt.train_step(model, x[:8], y[:8], accumulate=np.int64(2))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    adam = torch.optim.Adam(model.parameters())
    torch.nn.functional.cross_entropy(model(x), y).backward()
    adam.step()
    ef.posterior_from_adam(model, adam, n_data=np.int64(16), batch_size=np.int64(16))
    probs = ef.predict(model, post, x)
    assert ef.metrics.ece(probs, y, n_bins=np.int64(5)) >= 0
    for bad in (
        lambda: ef.fit(model, _loader(x, y), epochs=True, progress=False),
        lambda: ef.predict(model, post, x, n_samples=True),
        lambda: ef.BayesAdam(model.parameters(), n_data=16, mc_samples=True),
        lambda: ef.metrics.ece(probs, y, n_bins=True),
        lambda: ef.posterior_from_adam(model, adam, n_data=16, batch_size=True),
    ):
        with pytest.raises(ValueError, match="positive int|batch_size|n_bins|epochs|n_samples"):
            bad()


def _half_case(dtype, n=4096, bs=8):
    """An MLP and 512 small batches, in float64 (the reference) and cast to ``dtype``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    half = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    half.load_state_dict(model.state_dict())
    half.to(dtype)
    # the reference model sits at the half model's (rounded) weights and sees its (rounded) inputs
    model.load_state_dict({k: v.double() for k, v in half.state_dict().items()})
    x = x.to(dtype)
    batches = [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]
    return model, half, x.double(), y, batches


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_laplace_of_a_half_precision_model_sums_in_float32(dtype):
    """The curvature of a 16-bit model was summed in its dtype: over 512 batches a bf16 running sum
    stalls (each batch's term under half its spacing), and the precision came out 9-49 % low. Now
    within a percent of the float64 sum (the batches' own products are still 16-bit), in the
    model's dtype; and the evidence's δ is that of the float64 curvature."""
    model, half, x, y, batches = _half_case(dtype)
    ref = ef.laplace(model, [(x, y)], prior_precision=1e-6)
    post = ef.laplace(half, batches, prior_precision=1e-6)
    for k, v in ref.precision.items():
        assert post.precision[k].dtype == dtype
        ratio = post.precision[k].double() / v
        assert (ratio - 1).abs().max() < 0.02, (k, float(ratio.min()), float(ratio.max()))
    tuned = ef.laplace(half, batches, prior_precision="marglik")
    assert tuned.prior_precision == pytest.approx(ef.laplace(model, [(x, y)], prior_precision="marglik")
                                                  .prior_precision, rel=0.02)  # fmt: skip
    sums = curvature.accumulate(half, batches)
    assert all(t.dtype == torch.float32 for t in sums.values())
    for k, v in ref.precision.items():
        assert ((sums[k].double() + 1e-6) / v - 1).abs().max() < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_last_layer_kfac_of_a_half_precision_model(dtype):
    """The last-layer KFAC fit of a 16-bit model failed ("linalg_eigh_cpu" not implemented for
    'BFloat16') after summing its factors in bf16; they are summed in float32, the factors within
    a percent of the float64 fit's, and its predictive runs."""
    model, half, x, y, batches = _half_case(dtype)
    ref = ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer", prior_precision="marglik")
    post = ef.laplace(half, batches, hessian="kfac", subset="last_layer", prior_precision="marglik")
    for got, want in ((post.A, ref.A), (post.G, ref.G)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0.02, atol=0.02 * float(want.abs().max()))
    assert post.prior_precision == pytest.approx(ref.prior_precision, rel=0.02)
    probs = ef.predict(half, post, x[:5].to(dtype), method="glm", generator=torch.Generator().manual_seed(0))
    want = ef.predict(model, ref, x[:5], method="probit")
    assert (probs.double() - want).abs().max() < 0.05
    factors = curvature.accumulate(half, batches, hessian="kfac")
    assert all(A.dtype == G.dtype == torch.float32 for A, G in factors.values())


def test_regression_evidence_of_a_bf16_model_matches_the_float64_fit():
    """σ and δ by the evidence for a bf16 regression model match the float64 fit's (the last-layer
    KFAC fit failed in bf16 eigh; the residuals are now widened to float32 before they are taken)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 3, generator=g, dtype=torch.float64).bfloat16()
    half = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
    half.load_state_dict(model.state_dict())
    half.bfloat16()
    model.load_state_dict({k: v.double() for k, v in half.state_dict().items()})
    with torch.no_grad():
        y = (model(x.double()) + 0.3 * torch.randn(2048, 1, generator=g, dtype=torch.float64)).bfloat16()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 2048, 16)]
    for kw in ({"hessian": "ggn"}, {"hessian": "kfac", "subset": "last_layer"}):
        post = ef.laplace(half, batches, likelihood="regression", prior_precision="marglik",
                          sigma_noise="marglik", **kw)  # fmt: skip
        ref = ef.laplace(model, [(x.double(), y.double())], likelihood="regression",
                         prior_precision="marglik", sigma_noise="marglik", **kw)  # fmt: skip
        assert post.sigma_noise == pytest.approx(ref.sigma_noise, rel=0.01), kw
        assert post.prior_precision == pytest.approx(ref.prior_precision, rel=0.03), kw


def test_fit_puts_the_learning_rate_back_and_starts_its_schedule_from_it():
    """fit's cosine schedule ended at lr = 0 and left it there: a later fit(optimizer=...) with
    scheduler=None trained nothing (the weights did not move). And LambdaLR starts from a group's
    'initial_lr' when one is there (another scheduler's), not from its lr."""
    x, y = _cls_data(n=64)

    def run(stale=None, second=False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = ef.BayesAdam(model.parameters(), n_data=64, generator=torch.Generator().manual_seed(1))
        if stale is not None:
            opt.param_groups[0]["initial_lr"] = stale
        ef.fit(model, _loader(x, y, 16), optimizer=opt, epochs=2, progress=False)
        if second:  # a second fit at a constant learning rate
            ef.fit(model, _loader(x, y, 16), optimizer=opt, epochs=1, progress=False, scheduler=None)
        return opt, [p.detach().clone() for p in model.parameters()]

    opt, first = run()
    assert opt.param_groups[0]["lr"] == 1e-3 and "initial_lr" not in opt.param_groups[0]
    _, both = run(second=True)
    assert max(float((a - b).abs().max()) for a, b in zip(first, both)) > 1e-5  # the second fit trained
    stale_opt, stale = run(stale=1.0)  # a stale 'initial_lr' neither sets the schedule nor is lost
    assert all(torch.equal(a, b) for a, b in zip(first, stale))
    assert stale_opt.param_groups[0]["initial_lr"] == 1.0 and stale_opt.param_groups[0]["lr"] == 1e-3
