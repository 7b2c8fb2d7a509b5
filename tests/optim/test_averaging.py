"""BayesAdam's averaged means (``averaging``): the posterior mean is a polynomial-decay average
of the mean iterates; training itself is untouched."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effortless as ef


def _data(n=64, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(d, c, generator=g, dtype=torch.float64)).argmax(1)
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _step(opt, model, x, y):
    opt.zero_grad()
    with opt.sampled_params(train=True):
        F.cross_entropy(model(x), y).backward()
    opt.step()


def _trained(steps, **kw):
    """Data, a model and its optimizer after ``steps`` steps."""
    x, y = _data()
    model = _model()
    opt = _opt(model, **kw)
    for _ in range(steps):
        _step(opt, model, x, y)
    return x, y, model, opt


def _opt(model, **kw):
    kw = {"n_data": 64, "lr": 0.05, "generator": torch.Generator().manual_seed(1), **kw}
    return ef.BayesAdam(model.named_parameters(), **kw)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 1.0])
def test_posterior_mean_is_the_polynomial_decay_average_of_the_iterates(fraction):
    """Against the recursion written out in float64: after step t the average moves towards μ_t
    by (η+1)/(t+η), η = 1/fraction − 1 (fraction 1: the plain mean of all iterates)."""
    x, y = _data()
    model = _model()
    opt = _opt(model, averaging=fraction)
    eta = 1 / fraction - 1
    iterates = []
    for _ in range(30):
        _step(opt, model, x, y)
        iterates.append({n: p.detach().clone() for n, p in model.named_parameters()})
    ref = dict(iterates[0])
    for t, mu in enumerate(iterates[1:], start=2):
        w = (eta + 1) / (t + eta)
        ref = {n: (1 - w) * ref[n] + w * mu[n] for n in ref}
    if fraction == 1.0:  # (the recursion is the running mean)
        for n in ref:
            torch.testing.assert_close(ref[n], torch.stack([it[n] for it in iterates]).mean(0))
    post = opt.posterior()
    for n, p in model.named_parameters():
        torch.testing.assert_close(post.mean[n], ref[n], rtol=1e-12, atol=1e-14)
        assert not torch.allclose(post.mean[n], p.detach(), atol=1e-6)  # not the last iterate
        assert torch.equal(p.detach(), iterates[-1][n])  # the parameters hold the last iterate


def test_training_is_unchanged_by_averaging():
    """The running means (the parameters) are bitwise those of a run without averaging; without
    it the posterior's mean is the last iterate."""
    x, y = _data()
    m1, m2 = _model(), _model()
    o1, o2 = _opt(m1, averaging=None), _opt(m2, averaging=0.1)
    for _ in range(20):
        _step(o1, m1, x, y)
        _step(o2, m2, x, y)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
        assert torch.equal(o1.posterior().mean[n], p1.detach())
        assert torch.equal(o1.posterior().precision[n], o2.posterior().precision[n])
    assert all("mean_avg" not in st for st in o1.state.values())


def test_evaluation_samples_are_drawn_around_the_average():
    """sampled_params(train=False) draws N(μ̄, σ²): at a tiny temperature every weight sits at the
    average, far (relative to σ) from the last iterate."""
    x, y, model, opt = _trained(30, averaging=0.1, temperature=1e-10)
    post = opt.posterior()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with opt.sampled_params(train=False):
        for n, p in model.named_parameters():
            assert (post.mean[n] - live[n]).abs().max() > 1e-3  # (the check below can tell them apart)
            torch.testing.assert_close(p.detach(), post.mean[n], rtol=0, atol=1e-6)
    probs = ef.predict(model, post, x, n_samples=4)
    with post.mean_loaded(model):
        torch.testing.assert_close(probs, model(x).softmax(-1), rtol=0, atol=1e-6)


def test_evaluation_sample_at_temperature_zero_is_the_average():
    x, y, model, opt = _trained(10, averaging=0.1, temperature=0.0)
    live = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="never estimated"):  # (reparam at T = 0: h is hess_init)
        post = opt.posterior()
    with opt.sampled_params(train=False):
        for n, p in model.named_parameters():
            assert torch.equal(p.detach(), post.mean[n])
    for p, q in zip(model.parameters(), live):
        assert torch.equal(p.detach(), q)  # restored


def test_load_averaged_means_and_fit_end_at_the_posterior_mean():
    x, y, model, opt = _trained(10, averaging=0.1)
    post = opt.posterior()
    opt.load_averaged_means()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), post.mean[n])
    model2 = _model()
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    post2 = ef.fit(model2, loader, epochs=3, n_data=64, progress=False, lr=0.05)
    for n, p in model2.named_parameters():
        assert torch.equal(p.detach(), post2.mean[n])


def test_resume_with_averaging_is_bit_identical():
    x, y, model, opt = _trained(7, averaging=0.2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    saved_model, saved_opt = saved["model"], saved["opt"]
    for _ in range(8):
        _step(opt, model, x, y)
    m2 = _model(seed=5)
    m2.load_state_dict(saved_model)
    o2 = _opt(m2, averaging=0.2, generator=torch.Generator().manual_seed(99))
    o2.load_state_dict(saved_opt)
    for _ in range(8):
        _step(o2, m2, x, y)
    a, b = opt.posterior(), o2.posterior()
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    for n in a.mean:
        assert torch.equal(a.mean[n], b.mean[n])
        assert torch.equal(a.precision[n], b.precision[n])


def test_checkpoint_from_before_averaging_resumes_without_it():
    """A state dict without the `averaging` hyperparameter (older checkpoints) trained on the last
    iterate: loaded into an optimizer with the default, it goes on without averaging."""
    x, y, model, opt = _trained(5, averaging=None)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["averaging"]
    o2 = _opt(model)  # default averaging
    o2.load_state_dict(sd)
    assert all(g["averaging"] is None for g in o2.param_groups)
    _step(o2, model, x, y)
    post = o2.posterior()
    for n, p in model.named_parameters():
        assert torch.equal(post.mean[n], p.detach())


def test_averaging_switched_off_frees_the_buffer_and_skipped_steps_leave_it():
    x, y, model, opt = _trained(5, averaging=0.1, nonfinite="skip")
    before = {p: opt.state[p]["mean_avg"].clone() for p in model.parameters()}
    opt.zero_grad()
    with opt.sampled_params(train=True):
        (F.cross_entropy(model(x), y) * float("nan")).backward()
    opt.step()  # skipped: the average is untouched
    assert opt.skipped_steps == 1
    for p in model.parameters():
        assert torch.equal(opt.state[p]["mean_avg"], before[p])
    opt.param_groups[0]["averaging"] = None
    _step(opt, model, x, y)
    assert all("mean_avg" not in opt.state[p] for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(opt.posterior().mean[n], p.detach())


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True, "0.1", float("nan")])
def test_invalid_averaging_is_refused(bad):
    with pytest.raises(ValueError, match="averaging"):
        _opt(_model(), averaging=bad)
    opt = _opt(_model())
    opt.param_groups[0]["averaging"] = bad
    with pytest.raises(ValueError, match="averaging"), opt.sampled_params(train=False):
        pass
