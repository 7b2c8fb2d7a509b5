import io
import math

import pytest
import torch
from torch import nn

import effortless as ef


def _post():
    model = nn.Linear(3, 2).double()
    prec = {n: torch.full_like(p, 4.0) for n, p in model.named_parameters()}
    prec["weight"][0, 0] = 100.0
    return model, ef.DiagGaussian.from_model(model, prec)


def test_samples_have_the_right_moments():
    model, q = _post()
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([q.sample(g)["weight"] for _ in range(20000)])
    n = draws.shape[0]
    sd = q.precision["weight"].rsqrt()
    assert ((draws.mean(0) - q.mean["weight"]).abs() < 5 * sd / math.sqrt(n)).all()
    assert ((draws.var(0) / sd**2 - 1).abs() < 5 * math.sqrt(2 / n)).all()


def test_sampled_context_restores_weights_even_on_error():
    model, q = _post()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError), q.sampled(model, torch.Generator().manual_seed(0)):
        assert not torch.equal(model.weight, before["weight"])
        raise RuntimeError("boom")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def test_state_dict_round_trip_with_weights_only_load():
    _, q = _post()
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    q2 = ef.DiagGaussian({"weight": torch.zeros(2, 3)}, {"weight": torch.ones(2, 3)})
    q2.load_state_dict(torch.load(buf, weights_only=True))
    assert list(q2.mean) == list(q.mean)
    for k in q.mean:
        assert torch.equal(q2.mean[k], q.mean[k]) and torch.equal(q2.precision[k], q.precision[k])


def test_invalid_posteriors_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        ef.DiagGaussian({"a": torch.zeros(2)}, {"a": torch.tensor([1.0, 0.0])})
    with pytest.raises(ValueError, match="same keys"):
        ef.DiagGaussian({"a": torch.zeros(2)}, {"b": torch.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        ef.DiagGaussian({"a": torch.zeros(2)}, {"a": torch.ones(3)})
    model, q = _post()
    with pytest.raises(ValueError, match="shape"), q.sampled(nn.Linear(5, 5)):
        pass
    with pytest.raises(ValueError, match="do not match"), q.sampled(nn.Sequential(nn.Linear(3, 2))):
        pass


def test_from_model_takes_a_number_per_tensor_and_names_wrong_keys():
    """A dict of per-tensor numbers (per-layer prior precisions) was refused by shape; a misspelt
    name was ignored when the others were all there, or failed as a bare KeyError."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    q = ef.DiagGaussian.from_model(model, {"0.weight": 2.0, "0.bias": torch.tensor(3.0),
                                           "1.weight": torch.full((1, 2), 4.0), "1.bias": 5})  # fmt: skip
    assert torch.equal(q.precision["0.weight"], torch.full((2, 3), 2.0))
    assert torch.equal(q.precision["0.bias"], torch.full((2,), 3.0))
    assert torch.equal(q.precision["1.bias"], torch.full((1,), 5.0))
    with pytest.raises(ValueError, match=r"no entry for \['1.bias'\]"):
        ef.DiagGaussian.from_model(model, {"0.weight": 1.0, "0.bias": 1.0, "1.weight": 1.0})
    with pytest.raises(ValueError, match=r"\['1.biass'\] are not the model's parameters"):
        ef.DiagGaussian.from_model(model, {"0.weight": 1.0, "0.bias": 1.0, "1.weight": 1.0, "1.bias": 1.0,
                                           "1.biass": 1.0})  # fmt: skip
    model[0].requires_grad_(False)  # a frozen parameter's entry is left out, as before
    q = ef.DiagGaussian.from_model(model, {"0.weight": 1.0, "0.bias": 1.0, "1.weight": 1.0, "1.bias": 1.0})
    assert list(q.precision) == ["1.weight", "1.bias"]


def test_positional_keys_match_trainable_parameters_in_order():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    opt = ef.BayesAdam(model.parameters(), n_data=10)
    q = opt.posterior()
    assert list(q.mean) == ["0", "1", "2", "3"]
    with q.mean_loaded(model):
        pass


def test_positional_posterior_matches_the_optimizers_parameters_not_the_models_order():
    """BayesAdam given plain parameters keys its posterior by position in the optimizer; with the
    param groups in another order than the model's (or a subset), same-shaped layers were matched
    to each other's posterior, silently."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6))
    x, y = torch.randn(16, 6), torch.randint(0, 6, (16,))
    groups = [{"params": model[2].parameters()}, {"params": model[0].parameters(), "lr": 1e-2}]
    opt = ef.BayesAdam(groups, n_data=16, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.train_step(model, x, y)
    post = opt.posterior()
    assert list(post.mean) == ["0", "1", "2", "3"]
    names = {"0": "2.weight", "1": "2.bias", "2": "0.weight", "3": "0.bias"}
    named = ef.DiagGaussian({names[k]: v for k, v in post.mean.items()},
                            {names[k]: v for k, v in post.precision.items()})  # fmt: skip
    got = ef.predict(model, post, x, n_samples=8, generator=torch.Generator().manual_seed(1))
    ref = ef.predict(model, named, x, n_samples=8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, ref)
    subset = ef.BayesAdam(model[2].parameters(), n_data=16)  # a subset: it errored before
    subset.train_step(model, x, y)
    assert ef.predict(model, subset.posterior(), x, n_samples=2).shape == (16, 6)
    # keyed by the model's names on request: what a saved posterior needs
    keyed, now = opt.posterior(model), opt.posterior()
    assert list(keyed.mean) == ["2.weight", "2.bias", "0.weight", "0.bias"]
    for k, n in names.items():
        assert torch.equal(keyed.mean[n], now.mean[k]) and torch.equal(keyed.precision[n], now.precision[k])
    with pytest.raises(ValueError, match="posterior: the optimizer holds parameters"):
        opt.posterior(torch.nn.Linear(6, 6))
    # to() keeps the parameters a positional posterior matches by (it fell back to the model's order)
    moved = post.to(torch.float32)
    got = ef.predict(model, moved, x, n_samples=8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, ref)


def test_recorded_noise_and_prior_survive_state_dict_and_to_and_predict_uses_the_noise():
    """ef.laplace(sigma_noise='marglik') records σ; predict used σ = 1 unless told, and a saved
    posterior lost σ and δ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.linspace(-2, 2, 64)[:, None]
    y = 3 * torch.sin(2 * x) + 0.3 * torch.randn_like(x)  # untrained: σ (the residual) ≈ 2
    post = ef.laplace(model, [(x, y)], likelihood="regression", prior_precision="marglik-layer",
                      sigma_noise="marglik")  # fmt: skip
    assert abs(post.sigma_noise - 1.0) > 0.1
    kw = {"likelihood": "regression", "method": "glm"}
    _, var = ef.predict(model, post, x, **kw)
    _, var_given = ef.predict(model, post, x, sigma_noise=post.sigma_noise, **kw)
    _, var_one = ef.predict(model, post, x, sigma_noise=1.0, **kw)
    torch.testing.assert_close(var, var_given)
    assert not torch.allclose(var, var_one)
    buf = io.BytesIO()
    torch.save(post.state_dict(), buf)
    buf.seek(0)
    loaded = ef.DiagGaussian({"a": torch.zeros(1)}, {"a": torch.ones(1)})
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    for q in (loaded, post.to(torch.float64)):
        assert q.sigma_noise == post.sigma_noise
        assert set(q.prior_precision) == set(post.prior_precision)
        for k in post.prior_precision:
            assert float(q.prior_precision[k]) == float(post.prior_precision[k])
    plain = ef.DiagGaussian({"a": torch.zeros(1)}, {"a": torch.ones(1)})
    loaded.load_state_dict(plain.state_dict())  # nothing recorded: nothing left over either
    assert not hasattr(loaded, "sigma_noise") and not hasattr(loaded, "prior_precision")


def test_a_saved_posterior_matches_the_bare_model_under_a_wrappers_prefix():
    """Keys from a torch.compile'd ("_orig_mod.") or DDP ("module.") model, saved and loaded, did not
    match the bare model ("do not match" error); the reverse too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    before = net[0].weight.detach().clone()

    def posterior(prefix):
        named = list(net.named_parameters())
        return ef.DiagGaussian({prefix + n: p.detach() + 1 for n, p in named},
                               {prefix + n: torch.full_like(p, 1e8) for n, p in named})  # fmt: skip

    for prefix in ("_orig_mod.", "module."):
        q = posterior(prefix)
        with q.mean_loaded(net):
            torch.testing.assert_close(net[0].weight, q.mean[prefix + "0.weight"])
        bare = posterior("")
        wrapped = nn.Module()
        wrapped.module = net
        with bare.mean_loaded(wrapped if prefix == "module." else torch.compile(net)):
            torch.testing.assert_close(net[0].weight, bare.mean["0.weight"])
    assert torch.equal(net[0].weight, before)


def test_a_given_sample_of_the_wrong_shape_or_keys_is_refused_and_nothing_changes():
    model = nn.Linear(3, 2)
    q = ef.DiagGaussian.from_model(model, 10.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad = {"weight": torch.zeros(1), "bias": torch.zeros(2)}  # copy_ broadcast it before
    with pytest.raises(ValueError, match=r"sample\['weight'\] has shape \(1,\), the parameter \(2, 3\)"):
        q.sampled(model, sample=bad).__enter__()
    with pytest.raises(ValueError, match=r"sample has no tensor for \['bias'\]"):
        q.sampled(model, sample={"weight": torch.zeros(2, 3)}).__enter__()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with q.sampled(model, sample={"weight": torch.ones(2, 3), "bias": torch.ones(2)}):
        assert bool((model.weight == 1).all())
