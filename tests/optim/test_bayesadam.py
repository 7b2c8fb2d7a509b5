import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effortless as ef
from effortless import curvature
from effortless.curvature import estimators, exact
from effortless.optim.bayesadam import hess_beta_at


def _data(n=64, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, c, generator=g, dtype=torch.float64)
    y = (x @ w).argmax(1)  # learnable labels
    return x, y


def _mlp(seed=0, d=5, c=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, c)).double()


def _loop_step(opt, model, x, y):
    opt.zero_grad()
    with opt.sampled_params(train=True):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    opt.step()
    return loss


# -- reduces to a known deterministic rule ------------------------------------------------------


def test_temperature_zero_is_exactly_adam_with_l2():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    n, delta = 64, 3.0
    adam = torch.optim.Adam(m1.parameters(), lr=1e-2, weight_decay=delta / n)
    ba = ef.BayesAdam(m2.parameters(), n_data=n, lr=1e-2, prior_precision=delta, temperature=0.0)
    for _ in range(25):
        adam.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        adam.step()
        _loop_step(ba, m2, x, y)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("fused", [False, True])
def test_temperature_zero_follows_adam_under_one_cycle_momentum(fused):
    """OneCycleLR cycles β₁ in the param groups every step (``cycle_momentum``): the step must read
    the group's betas each time (compiled kernels included), as torch.optim.Adam does."""
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    n, delta, steps = 64, 3.0, 20
    adam = torch.optim.Adam(m1.parameters(), lr=1e-2, weight_decay=delta / n)
    ba = ef.BayesAdam(m2.parameters(), n_data=n, lr=1e-2, prior_precision=delta, temperature=0.0,
                      averaging=None, fused=fused)  # fmt: skip
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=steps) for o in (adam, ba)]
    for _ in range(steps):
        adam.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        adam.step()
        _loop_step(ba, m2, x, y)
        for sched in scheds:
            sched.step()
    assert ba.param_groups[0]["betas"][0] != 0.9  # (the schedule moved it)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("foreach", [True, False])
def test_eager_mean_update_by_fused_adam_equals_the_foreach_ops(foreach, monkeypatch):
    """The eager path moves μ, m and v with PyTorch's fused Adam kernel where it can; the
    ``_foreach`` ops it replaces (still run on other devices, mixed dtypes, non-contiguous
    tensors) give the same update to float64 round-off, and neither touches the gradients."""
    from effortless.optim import bayesadam as ba

    x, y = _data()
    models = [_mlp(), _mlp()]
    opts = [ef.BayesAdam(m.parameters(), n_data=64, fused=False, foreach=foreach, temperature=0.5,
                         generator=torch.Generator().manual_seed(3)) for m in models]  # fmt: skip
    calls = []
    real = ba._FUSED_ADAM
    monkeypatch.setattr(ba, "_FUSED_ADAM", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(5):
        _loop_step(opts[0], models[0], x, y)
    monkeypatch.setattr(ba, "_FUSED_ADAM", None)
    for _ in range(5):
        opts[1].zero_grad()
        with opts[1].sampled_params(train=True):
            F.cross_entropy(models[1](x), y).backward()
        grads = [p.grad.clone() for p in models[1].parameters()]
        opts[1].step()
        for p, g in zip(models[1].parameters(), grads):
            assert torch.equal(p.grad, g)
    assert calls  # (the first optimizer ran the fused kernel, the second the _foreach ops)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
        for k in ("hess", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opts[0].state[p][k], opts[1].state[q][k], rtol=1e-11, atol=1e-15)


def test_eager_step_leaves_the_gradients_alone():
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, fused=False)
    opt.zero_grad()
    with opt.sampled_params(train=True):
        F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_one_reparam_step_matches_hand_written_reference():
    """The kernel against the formulas written out by hand (float64, noise on)."""
    x, y = _data()
    model = _mlp()
    n, delta, lr, b1, b2, hinit, T = 64, 2.0, 0.05, 0.9, 0.99, 0.3, 0.5
    gen = torch.Generator().manual_seed(7)
    gen_copy = torch.Generator().manual_seed(7)
    opt = ef.BayesAdam(
        model.parameters(), n_data=n, lr=lr, betas=(b1, b2), prior_precision=delta,
        hess_init=hinit, temperature=T, generator=gen, hess_beta=0.9,
    )  # fmt: skip
    mu0 = [p.detach().clone() for p in model.parameters()]
    # expected sample, gradient and update, by hand
    sigma = math.sqrt(T / (n * hinit + delta))
    noise = [sigma * torch.randn(p.shape, generator=gen_copy, dtype=p.dtype) for p in mu0]
    ref = _mlp()
    with torch.no_grad():
        for p, m, e in zip(ref.parameters(), mu0, noise):
            p.copy_(m + e)
    F.cross_entropy(ref(x), y).backward()
    _loop_step(opt, model, x, y)
    beta = hess_beta_at(0.9, 1, nonnegative=False)
    assert beta == 0.5  # running average with hess_init counted once
    for p, m, e, r in zip(model.parameters(), mu0, noise, ref.parameters()):
        g = r.grad + delta / n * m
        m1 = (1 - b1) * g
        v1 = (1 - b2) * g * g
        mu = m - lr * (m1 / (1 - b1)) / ((v1 / (1 - b2)).sqrt() + 1e-8)
        torch.testing.assert_close(p.detach(), mu, rtol=1e-12, atol=1e-14)
        hhat = r.grad * e / sigma**2
        d = hinit - hhat
        h = hinit - (1 - beta) * d + 0.5 * (1 - beta) ** 2 * d**2 / (hinit + delta / n)
        torch.testing.assert_close(opt.state[p]["hess"], h, rtol=1e-10, atol=1e-14)


# -- Bayesian linear regression: the closed-form posterior ---------------------------------------


def _blr(n=200, d=4, sigma=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)
    y = X @ w + sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return X, y


def _blr_posterior(X, y, sigma, delta):
    A = X.T @ X / sigma**2 + delta * torch.eye(X.shape[1], dtype=X.dtype)
    return torch.linalg.solve(A, X.T @ y / sigma**2), A


def test_bayesian_linear_regression_precision_and_mean():
    X, y = _blr()
    sigma, delta, n = 0.5, 50.0, X.shape[0]
    m_exact, A = _blr_posterior(X, y, sigma, delta)
    sd = torch.diagonal(A).rsqrt()
    m_mle, _ = _blr_posterior(X, y, sigma, 0.0)
    assert ((m_mle - m_exact)[:, 0].abs() / sd).max() > 2  # the prior matters: the test can tell
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    opt = ef.BayesAdam(model.named_parameters(), n_data=n, hessian="ggn", prior_precision=delta, lr=0.05,
                       temperature=1.0, generator=torch.Generator().manual_seed(0))  # fmt: skip
    steps = 1500
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.train_step(model, X, y, likelihood="regression", sigma_noise=sigma)
        sched.step()
    post = opt.posterior()
    # precision: N·h + δ = diag(XᵀX)/σ² + δ (the GGN is constant for a linear model)
    torch.testing.assert_close(post.precision["weight"][0], torch.diagonal(A), rtol=1e-12, atol=0)
    # mean: the exact posterior mean, within a fraction of the posterior std
    err = (post.mean["weight"][0] - m_exact[:, 0]).abs() / sd
    assert err.max() < 0.2, err


def test_laplace_at_exact_map_gives_closed_form_precision():
    X, y = _blr()
    sigma, delta = 0.5, 2.0
    m_exact, A = _blr_posterior(X, y, sigma, delta)
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(m_exact.T)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=64)
    post = ef.laplace(model, loader, likelihood="regression", hessian="ggn", prior_precision=delta,
                      sigma_noise=sigma)  # fmt: skip
    torch.testing.assert_close(post.precision["weight"][0], torch.diagonal(A), rtol=1e-13, atol=0)
    torch.testing.assert_close(post.mean["weight"], m_exact.T)


# -- estimators plug into the optimizer as the table says ----------------------------------------


@pytest.mark.parametrize("key", ["ggn", "efisher"])
def test_first_model_side_estimate_is_the_batch_average(key):
    """At temperature 0 the sample is the mean, so h after one step is the estimator there / B."""
    x, y = _data(n=16)
    model = _mlp()
    ref = exact.diag(model, x, y, key)
    opt = ef.BayesAdam(model.parameters(), n_data=100, hessian=key, temperature=0.0)
    opt.train_step(model, x, y)
    for p, r in zip(model.parameters(), ref.values()):
        torch.testing.assert_close(opt.state[p]["hess"], r / 16, rtol=1e-10, atol=1e-15)


def test_gradsq_estimate_is_batch_times_squared_gradient():
    x, y = _data(n=16)
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=100, hessian="gradsq", temperature=0.0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="batch_size"):
        opt.step()
    opt.batch_size = 16
    opt.step()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(opt.state[p]["hess"], 16 * g**2)


@pytest.mark.parametrize("key", sorted(estimators.ESTIMATORS))
def test_train_step_runs_for_every_key_and_learns(key):
    x, y = _data(n=128)
    model = _mlp()
    opt = ef.BayesAdam(model.named_parameters(), n_data=128, hessian=key, lr=0.02, mc_samples=2)
    with torch.no_grad():
        first = float(F.cross_entropy(model(x), y))
        for _ in range(60):
            with torch.enable_grad():
                opt.train_step(model, x, y)
        assert float(F.cross_entropy(model(x), y)) < first - 0.1  # the loss at the mean went down
    post = opt.posterior()
    assert list(post.mean) == [n for n, _ in model.named_parameters()]
    for k, v in post.precision.items():
        assert torch.isfinite(v).all() and (v > 0).all(), k
    if key in ("efisher", "ggn", "ggn-mc", "gradsq"):
        assert not any(torch.equal(v, torch.full_like(v, 1 + 128 * 0.1)) for v in post.precision.values())


def test_model_side_key_through_step_raises():
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, hessian="ggn")
    with pytest.raises(RuntimeError, match="train_step"):
        _loop_step(opt, model, x, y)


def test_step_without_a_sample_raises():
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="sampled_params"):
        opt.step()


def test_several_samples_in_the_user_loop_equal_train_step():
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1 = ef.BayesAdam(m1.parameters(), n_data=64, generator=torch.Generator().manual_seed(3))
    o2 = ef.BayesAdam(m2.parameters(), n_data=64, mc_samples=3, generator=torch.Generator().manual_seed(3))
    for _ in range(5):
        o1.zero_grad()
        for _ in range(3):
            with o1.sampled_params(train=True):
                F.cross_entropy(m1(x), y).backward()
        o1.step()
        o2.train_step(m2, x, y)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(o1.state[p1]["hess"], o2.state[p2]["hess"], rtol=1e-10, atol=1e-15)


# -- state: resume, exceptions, non-finite values ------------------------------------------------


@pytest.mark.parametrize("key,mc", [("reparam", 1), ("reparam", 2), ("ggn-mc", 1), ("gradsq", 1)])
def test_resume_is_bit_identical(key, mc):
    x, y = _data(n=96)

    def make(seed_gen):
        model = _mlp().float()
        opt = ef.BayesAdam(model.named_parameters(), n_data=96, hessian=key, mc_samples=mc,
                           generator=torch.Generator().manual_seed(seed_gen))  # fmt: skip
        sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
        return model, opt, sched

    def run(model, opt, sched, steps, start=0):
        for i in range(start, start + steps):
            xb, yb = x[(i % 3) * 32 : (i % 3 + 1) * 32].float(), y[(i % 3) * 32 : (i % 3 + 1) * 32]
            opt.train_step(model, xb, yb)
            sched.step()

    ref = make(11)
    run(*ref, 10)
    a = make(11)
    run(*a, 4)
    buf = io.BytesIO()
    torch.save({"model": a[0].state_dict(), "opt": a[1].state_dict(), "sched": a[2].state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = make(999)  # a different generator seed: the checkpoint must restore it
    b[0].load_state_dict(ckpt["model"])
    b[1].load_state_dict(ckpt["opt"])
    b[2].load_state_dict(ckpt["sched"])
    run(*b, 6, start=4)
    for (n, p), q in zip(ref[0].named_parameters(), b[0].parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(ref[0].parameters(), b[0].parameters()):
        for k in ("exp_avg", "exp_avg_sq", "hess"):
            assert torch.equal(ref[1].state[p][k], b[1].state[q][k]), k
        assert ref[1].state[p]["step"] == b[1].state[q]["step"] == 10


def test_resume_keeps_the_product_dtype(monkeypatch):
    """bf16 curvature products change the numbers; a checkpoint restores them into an optimizer
    built without the option, and the resumed run is bitwise the uninterrupted one."""
    from effortless.curvature import engine

    monkeypatch.setattr(engine, "LOWP_MIN_MACS", 0)  # the tiny MLP's products take the bf16 path
    x, y = _data(n=96)
    x = x.float()

    def make(**kw):
        model = _mlp().float()
        return model, ef.BayesAdam(model.parameters(), n_data=96, hessian="ggn", fused=False,
                                   generator=torch.Generator().manual_seed(5), **kw)  # fmt: skip

    def run(model, opt, steps):
        for _ in range(steps):
            opt.train_step(model, x[:32], y[:32])

    ref, exact32 = make(product_dtype=torch.bfloat16), make()
    run(*ref, 6)
    run(*exact32, 6)
    assert not all(torch.equal(p, q) for p, q in zip(ref[0].parameters(), exact32[0].parameters()))
    a = make(product_dtype=torch.bfloat16)
    run(*a, 3)
    buf = io.BytesIO()
    torch.save({"model": a[0].state_dict(), "opt": a[1].state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b = make()  # no product_dtype given: the checkpoint's comes back
    b[0].load_state_dict(ckpt["model"])
    b[1].load_state_dict(ckpt["opt"])
    assert b[1].product_dtype == torch.bfloat16
    run(*b, 3)
    for p, q in zip(ref[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_other_estimators_and_plain_adam():
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=10, hessian="ggn")
    other = ef.BayesAdam(model.parameters(), n_data=10)
    with pytest.raises(ValueError, match="hessian"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="BayesAdam"):
        other.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())


def test_load_state_dict_rejects_a_model_of_other_shapes():
    """As many tensors but other shapes: torch's own check passes; the state must not load."""
    x, y = _data()
    small = nn.Sequential(nn.Linear(5, 8), nn.Linear(8, 3)).double()
    wide = nn.Sequential(nn.Linear(5, 9), nn.Linear(9, 3)).double()
    opt = ef.BayesAdam(small.named_parameters(), n_data=64)
    opt.train_step(small, x, y)
    other = ef.BayesAdam(wide.named_parameters(), n_data=64)
    other.train_step(wide, x, y)
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(9, 5\).*\(8, 5\)"):
        other.load_state_dict(opt.state_dict())
    after = other.state_dict()
    for i, st in before["state"].items():  # nothing was loaded
        assert all(torch.equal(v, after["state"][i][k]) if torch.is_tensor(v) else v == after["state"][i][k]
                   for k, v in st.items())  # fmt: skip
    plain = ef.BayesAdam(small.parameters(), n_data=64)
    plain.train_step(small, x, y)
    with pytest.raises(ValueError, match="parameter #0 has shape"):
        ef.BayesAdam(wide.parameters(), n_data=64).load_state_dict(plain.state_dict())


def test_exception_inside_context_restores_weights_exactly():
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64)
    _loop_step(opt, model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KeyError), opt.sampled_params(train=True):
        assert not torch.equal(next(model.parameters()), before[0])  # a sample is loaded
        F.cross_entropy(model(x), y).backward()
        raise KeyError("boom")
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    # the failed sample was not recorded; the next iteration works
    _loop_step(opt, model, x, y)


def test_contexts_cannot_nest_and_eval_sampling_leaves_no_trace():
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64)
    with opt.sampled_params(train=False), pytest.raises(RuntimeError, match="nested"):  # noqa: SIM117
        with opt.sampled_params():
            pass
    with opt.sampled_params(train=False):
        model(x)
    assert opt._n_samples == 0


def test_evaluation_samples_leave_training_as_it_was_and_resume_exactly():
    """sampled_params(train=False) drew from the training sampler's generator, so evaluating at a
    sample between steps changed every later training sample (as the Lightning metrics callback
    once did). Evaluation samples now have a generator of their own, saved in the checkpoint."""
    x, y = _data()

    def run(evaluate: bool, resume_at: int | None = None):
        model = _mlp()
        opt = ef.BayesAdam(model.parameters(), n_data=64, generator=torch.Generator().manual_seed(0))
        looks = []
        for t in range(6):
            if resume_at == t:
                buf = io.BytesIO()
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
                buf.seek(0)
                saved = torch.load(buf, weights_only=True)
                model = _mlp()
                model.load_state_dict(saved["model"])
                opt = ef.BayesAdam(model.parameters(), n_data=64)
                opt.load_state_dict(saved["opt"])
            _loop_step(opt, model, x, y)
            if evaluate:
                with opt.sampled_params(train=False):
                    looks.append([p.detach().clone() for p in model.parameters()])
        return [p.detach().clone() for p in model.parameters()], looks

    plain, _ = run(False)
    evaluated, looks = run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, evaluated))
    assert not torch.equal(looks[0][0], looks[1][0])  # (each evaluation draws anew)
    resumed, looks_resumed = run(True, resume_at=3)
    assert all(torch.equal(a, b) for a, b in zip(evaluated, resumed))
    assert all(torch.equal(a, b) for la, lb in zip(looks, looks_resumed) for a, b in zip(la, lb))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_continues_exactly_as_the_original(how):
    """torch's Optimizer pickles only its defaults, state and parameter groups: a deep copy of
    BayesAdam lacked its settings (AttributeError: 'hessian' at the next step) and, once it held
    the hook engine's plans, could not be copied at all. Copied with its model (one memo, so the
    copy's parameters are the copied model's), it continues bit for bit as the original."""
    import pickle

    x, y = _data()
    model = _mlp()
    gen = torch.Generator().manual_seed(0)
    opt = ef.BayesAdam(model.parameters(), n_data=64, hessian="ggn", generator=gen)
    for _ in range(3):
        opt.train_step(model, x, y)
    both = (model, opt)
    model2, opt2 = copy.deepcopy(both) if how == "deepcopy" else pickle.loads(pickle.dumps(both))
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    for _ in range(3):
        opt.train_step(model, x, y)
        opt2.train_step(model2, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert all(torch.equal(opt.state[p]["hess"], opt2.state[q]["hess"])
               for p, q in zip(model.parameters(), model2.parameters()))  # fmt: skip


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    # everything but the sampler's scratch buffer of unit noise ("noise"), which a new draw refills
    state = {
        id(p): {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and k != "noise"}
        for p in opt.state
    }
    return params, state, opt.generator.get_state()


def _assert_unchanged(model, opt, snap):
    params, state, _ = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for p in opt.state:
        for k, v in state[id(p)].items():
            assert torch.equal(opt.state[p][k], v), k


@pytest.mark.parametrize("where", ["loss", "input"])
def test_nonfinite_raises_and_leaves_state_untouched(where):
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64)
    _loop_step(opt, model, x, y)
    snap = _snapshot(model, opt)
    xbad = x.clone()
    xbad[0, 0] = float("nan") if where == "input" else 0.0
    with pytest.raises(FloatingPointError, match="not taken"):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            loss = F.cross_entropy(model(xbad), y) * (float("inf") if where == "loss" else 1.0)
            loss.backward()
        opt.step()
    _assert_unchanged(model, opt, snap)
    with pytest.raises(FloatingPointError):
        opt.train_step(model, xbad if where == "input" else x * float("inf"), y)
    _assert_unchanged(model, opt, snap)

    def closure(bad=True):  # the step(closure) path (Lightning's automatic optimisation)
        opt.zero_grad()
        if not bad:
            loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(xbad), y) * (float("inf") if where == "loss" else 1.0)
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="not taken"):
        opt.step(closure)
    _assert_unchanged(model, opt, snap)
    assert torch.isfinite(opt.step(lambda: closure(bad=False)))  # and training continues


def test_nonfinite_skip_drops_the_step():
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, nonfinite="skip")
    _loop_step(opt, model, x, y)
    snap = _snapshot(model, opt)
    opt.train_step(model, x * float("nan"), y)
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1
    _loop_step(opt, model, x, y)  # and training continues


@pytest.mark.parametrize("hessian,fused", [("reparam", False), ("efisher", True)])
def test_a_rejected_step_leaves_every_noise_buffer_holding_its_noise(hessian, fused):
    """An unused tensor (no gradient) beside one whose gradient is NaN: after the dropped step each
    buffer holds ε = (θ − μ)/σ of the sample just drawn, converted once (an antithetic mirror draws
    μ − σε from it next)."""
    from effortless.optim.bayesadam import _inv_sigma

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = _mlp(), nn.Linear(2, 2).double()

        def forward(self, x):
            return self.body(x)

    x, y = _data()
    model = WithUnused()
    params = list(model.parameters())
    opt = ef.BayesAdam(params, n_data=64, hessian=hessian, nonfinite="skip", fused=fused, temperature=0.5,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    opt.train_step(model, x, y)
    mu = [p.detach().clone() for p in params]
    inv_sigma = [_inv_sigma(opt.state[p]["hess"], 64, 1.0, 0.5) for p in params]
    seen = []
    model.register_forward_pre_hook(lambda *_: seen.append([p.detach().clone() for p in params]))
    model.body[0].weight.register_hook(lambda g: g * float("nan"))
    opt.train_step(model, x, y)
    assert opt.skipped_steps == 1
    for p, m, s, theta in zip(params, mu, inv_sigma, seen[-1]):
        assert not torch.equal(theta, m)  # a sample was drawn
        torch.testing.assert_close(opt.state[p]["noise"], (theta - m) * s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused,mc", [(False, 2), (True, 2), (False, 3), (True, 3)])
def test_antithetic_samples_average_their_reparam_estimates(fused, mc):
    """mc_samples=2 and 3 against a reference built from what each sample saw: θ_i, g_i and
    ĥ = (1/S) Σ_i g_i (θ_i − μ) / σ², applied by the functional kernel."""
    from effortless.optim.bayesadam import _inv_sigma, bayesadam_update

    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, mc_samples=mc, temperature=0.5, fused=fused,
                       generator=torch.Generator().manual_seed(0), antithetic=True)  # fmt: skip
    opt.train_step(model, x, y)  # one step first: h is no longer uniform
    params = list(model.parameters())
    before = {p: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params}
    step = opt.state[params[0]]["step"] + 1
    mu = [p.detach().clone() for p in params]
    thetas, grads = [], []
    model.register_forward_pre_hook(lambda *_: thetas.append([p.detach().clone() for p in params]))
    for p in params:
        p.register_hook(lambda g, p=p: grads.append((p, g.detach().clone())))
    opt.train_step(model, x, y)
    assert len(thetas) == mc
    per_sample = [{p: g for p, g in grads[i * len(params) : (i + 1) * len(params)]} for i in range(mc)]
    for i, p in enumerate(params):
        st = before[p]
        inv_var = _inv_sigma(st["hess"], 64, 1.0, 0.5) ** 2
        gs = [per_sample[k][p] for k in range(mc)]
        hhat = sum(g * (thetas[k][i] - mu[i]) for k, g in enumerate(gs)) * inv_var / mc
        ref_mu, ref = mu[i].clone(), {k: v.clone() for k, v in st.items()}
        gbar = sum(gs) / mc
        bayesadam_update([ref_mu], [gbar], [ref["exp_avg"]], [ref["exp_avg_sq"]], [ref["hess"]],
                         [hhat], [None], [None], noise_sign=1.0, step=step, hess_step=step, lr=1e-3,
                         beta1=0.9, beta2=0.999, eps=1e-8, hess_beta=0.999, n_data=64.0, prior_precision=1.0,
                         temperature=0.5, nonnegative=False)  # fmt: skip
        torch.testing.assert_close(opt.state[p]["hess"], ref["hess"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.detach(), ref_mu, rtol=1e-12, atol=1e-14)
    # a pair is antithetic: θ_b − μ = −(θ_a − μ). The phase runs on across steps: after a first step
    # of three samples (+, −, +) the second starts with a mirror, so its pair is samples 1 and 2
    a = 0 if mc == 2 else 1
    for i in range(len(params)):
        torch.testing.assert_close(thetas[a + 1][i] - mu[i], -(thetas[a][i] - mu[i]), rtol=1e-10, atol=1e-12)


# -- PyTorch conventions ---------------------------------------------------------------------------


def test_param_groups_schedulers_frozen_params_and_zero_grad():
    x, y = _data()
    model = _mlp()
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    head = model[2].weight.detach().clone()
    opt = ef.BayesAdam(
        [
            {"params": [model[0].weight, model[0].bias], "lr": 0.01},
            {"params": [model[2].weight], "lr": 0.0},  # lr 0: the mean must not move
            {"params": [model[2].bias]},
        ],
        n_data=64,
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    for _ in range(3):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            assert torch.equal(model[0].bias, frozen)  # frozen parameters are not sampled
            F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert torch.equal(model[0].bias, frozen)
    assert torch.equal(model[2].weight, head)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert list(opt.posterior().mean) == ["0", "2", "3"]  # by position, frozen one left out


def test_posterior_is_keyed_by_name_and_in_parameter_order():
    model = _mlp()
    opt = ef.BayesAdam(model.named_parameters(), n_data=10, prior_precision=4.0, hess_init=0.5,
                       temperature=0.5)  # fmt: skip
    post = opt.posterior()
    assert list(post.mean) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    expected = torch.full((8,), (10 * 0.5 + 4.0) / 0.5, dtype=torch.float64)
    torch.testing.assert_close(post.precision["0.bias"], expected)


def test_default_generator_follows_torch_manual_seed():
    x, y = _data()
    out = []
    for _ in range(2):
        torch.manual_seed(5)
        model = _mlp()
        opt = ef.BayesAdam(model.parameters(), n_data=64)
        _loop_step(opt, model, x, y)
        out.append(next(model.parameters()).detach().clone())
    assert torch.equal(*out)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"n_data": 0}, "n_data"),
        ({"n_data": 10, "lr": -1.0}, "lr"),
        ({"n_data": 10, "prior_precision": 0.0}, "prior_precision"),
        ({"n_data": 10, "prior_precision": "evidence"}, "prior_precision"),
        ({"n_data": 10, "prior_update_every": 0}, "prior_update_every"),
        ({"n_data": 10, "hessian": "diag"}, "hessian"),
        ({"n_data": 10, "betas": (0.9, 1.0)}, "betas"),
        ({"n_data": 10, "hess_beta": 1.5}, "hess_beta"),
        ({"n_data": 10, "temperature": -0.1}, "temperature"),
        ({"n_data": 10, "mc_samples": 0}, "mc_samples"),
        *(({"n_data": 10, "noise_reuse": v}, "noise_reuse") for v in (0, -1, 1.5, True, "2", None)),
        ({"n_data": 10, "batch_size": 0}, "batch_size"),
        ({"n_data": 10, "nonfinite": "ignore"}, "nonfinite"),
        ({"n_data": 10, "generator": 3}, "generator"),
        ({"n_data": float("nan")}, "n_data"),
        ({"n_data": 10, "prior_warmup": -1}, "prior_warmup"),
        ({"n_data": 10, "distributed": "ring"}, "distributed"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ef.BayesAdam(_mlp().parameters(), **kwargs)


def test_no_parameters_and_fused_on_non_contiguous_weights_are_refused_by_name():
    with pytest.raises(ValueError, match="empty parameter list"):  # (torch's check)
        ef.BayesAdam([], n_data=10)
    with pytest.raises(ValueError, match="params: the optimizer got no parameters"):
        ef.BayesAdam([{"params": []}], n_data=10)
    transposed = nn.Parameter(torch.randn(4, 3).t())
    with pytest.raises(ValueError, match="fused=True needs contiguous"):
        ef.BayesAdam([transposed], n_data=10, fused=True)
    assert not ef.BayesAdam([transposed], n_data=10).fused  # (the default takes the eager path)


def test_sparse_gradients_are_refused_before_any_group_is_updated():
    emb, lin = nn.Embedding(10, 4), nn.Linear(4, 2)
    opt = ef.BayesAdam([{"params": lin.parameters()}, {"params": emb.parameters()}], n_data=10)
    x, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])

    def loss():
        return F.cross_entropy(lin(emb(x).mean(1)), y)

    with opt.sampled_params(train=True):
        loss().backward()
    opt.step()  # a first step: state to compare against
    kept = ("exp_avg", "exp_avg_sq", "hess", "mean_avg")  # (the noise is the next block's draw)
    before = ({k: opt.state[lin.weight][k].clone() for k in kept}, lin.weight.detach().clone())
    opt.zero_grad()
    emb.sparse = True
    with opt.sampled_params(train=True):
        loss().backward()
    with pytest.raises(RuntimeError, match=SPARSE):
        opt.step()
    assert torch.equal(lin.weight, before[1])
    for k, v in before[0].items():
        assert torch.equal(opt.state[lin.weight][k], v), k


SPARSE = r"sparse gradients \(a parameter of shape \(10, 4\): an nn.Embedding\(..., sparse=True\)\?"


def test_the_automatic_prior_waits_for_prior_warmup_steps():
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, prior_precision="auto", prior_update_every=1,
                       prior_warmup=5)  # fmt: skip
    start = opt.param_groups[0]["prior_precision"]
    for _ in range(4):
        _loop_step(opt, model, x, y)
    assert opt.param_groups[0]["prior_precision"] == start  # steps 1-4: before the warm-up ends
    for _ in range(2):
        _loop_step(opt, model, x, y)
    assert opt.param_groups[0]["prior_precision"] != start


def test_numpy_scalars_are_numbers_and_a_tensor_lr_is_named():
    """``n_data=np.int64(...)`` (a shape or a count from NumPy) works like the int, and the
    groups hold Python floats; a tensor lr (torch.optim's capturable form) is refused by name."""
    np = pytest.importorskip("numpy")
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    m2.load_state_dict(m1.state_dict())
    o1 = ef.BayesAdam(m1.parameters(), n_data=64, lr=1e-3, betas=(0.9, 0.999),
                      generator=torch.Generator().manual_seed(2))  # fmt: skip
    o2 = ef.BayesAdam(m2.parameters(), n_data=np.int64(64), lr=np.float32(1e-3),
                      betas=(np.float64(0.9), np.float64(0.999)), averaging=np.float64(0.05),
                      generator=torch.Generator().manual_seed(2))  # fmt: skip
    g = o2.param_groups[0]
    assert all(type(g[k]) is float for k in ("n_data", "lr", "eps", "averaging", "hess_beta"))
    assert all(type(b) is float for b in g["betas"])
    for _ in range(2):
        _loop_step(o1, m1, x, y), _loop_step(o2, m2, x, y)
    # (np.float32(1e-3) is not the double 1e-3: the weights agree closely, not bit for bit)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="lr must be a Python number.*got a tensor"):
        ef.BayesAdam(_mlp().parameters(), n_data=64, lr=torch.tensor(1e-3))


@pytest.mark.parametrize(
    "key,value",
    [
        ("n_data", -5.0),
        ("n_data", 0),
        ("prior_precision", 0.0),
        ("lr", float("nan")),
        ("lr", -1e-3),
        ("temperature", -1.0),
        ("eps", float("inf")),
        ("betas", (0.9, 1.5)),
        ("hess_beta", 1.0),
    ],
)
@pytest.mark.parametrize("entry", ["sampled_params", "step", "train_step", "zero_grad", "posterior"])
def test_group_values_changed_after_construction_are_checked_before_anything_moves(key, value, entry):
    """A scheduler or a user edits ``param_groups``; a value the constructor would refuse is
    refused at the next sample or step, naming the group and key, with weights and state as they
    were (n_data -5 was taken silently and gave a wrong posterior; NaN read as a bad gradient)."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, generator=torch.Generator().manual_seed(0))
    opt.train_step(model, x, y)
    with opt.sampled_params():
        F.cross_entropy(model(x), y).backward()
    weights = [p.detach().clone() for p in model.parameters()]
    state = io.BytesIO()
    torch.save(opt.state_dict(), state)
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: {key}"):
        if entry == "sampled_params":
            with opt.sampled_params():
                pass
        elif entry == "step":
            opt.step()
        elif entry == "zero_grad":  # discards the pending sample, whose ε is recovered with σ
            opt.zero_grad()
        elif entry == "posterior":
            opt.posterior()
        else:
            opt.train_step(model, x, y)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    opt.param_groups[0][key] = torch.load(io.BytesIO(state.getvalue()))["param_groups"][0][key]
    after = io.BytesIO()
    torch.save(opt.state_dict(), after)
    before = torch.load(io.BytesIO(state.getvalue()))
    now = torch.load(io.BytesIO(after.getvalue()))
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(v, now["state"][i][k]) if torch.is_tensor(v) else v == now["state"][i][k], k


def test_prior_precision_auto_recovers_the_true_prior():
    """Online evidence tuning (no extra data pass) on linear regression with an orthogonal design,
    where the diagonal Laplace evidence is exact: δ ends within 20 % of the prior that made w."""
    g = torch.Generator().manual_seed(1)
    n, d, sigma, delta_true = 1000, 400, 0.5, 4.0
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=torch.float64))
    X = q * (1 + 4 * torch.rand(d, generator=g, dtype=torch.float64)) * (n / d) ** 0.5
    y = X @ (torch.randn(d, 1, generator=g, dtype=torch.float64) / delta_true**0.5)
    y = y + sigma * torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    opt = ef.BayesAdam(model.parameters(), n_data=n, hessian="ggn", prior_precision="auto", lr=0.02,
                       temperature=1.0, prior_update_every=50, prior_warmup=0,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
    for _ in range(1500):
        opt.train_step(model, X, y, likelihood="regression", sigma_noise=sigma)
        sched.step()
    tuned = opt.param_groups[0]["prior_precision"]
    assert abs(tuned / delta_true - 1) < 0.2, tuned
    assert opt.state_dict()["bayesadam"]["auto_prior"]
    # "marglik", ef.laplace's name for the evidence-tuned prior, means the same here (it was refused)
    assert ef.BayesAdam(model.parameters(), n_data=n, prior_precision="marglik").auto_prior


def test_curvature_estimates_and_reference_agree_for_the_sampled_weights():
    """ggn-mc in train_step is an unbiased estimate of the exact GGN / B at the sample."""
    x, y = _data(n=8)
    model = _mlp()
    ref = exact.diag(model, x, y, "ggn")
    gen = torch.Generator().manual_seed(0)
    draws = [curvature.diag_ggn(model, x, y, method="mc", generator=gen) for _ in range(400)]
    mean = {k: torch.stack([d[k] for d in draws]).mean(0) for k in ref}
    for k in ref:
        torch.testing.assert_close(mean[k], ref[k], rtol=0.25, atol=0.02 * float(ref[k].abs().max()))


# -- fast path and sampling scheme ---------------------------------------------------------------


@pytest.mark.parametrize("key", ["reparam", "ggn", "hutchinson", "gradsq"])
def test_foreach_path_matches_the_per_tensor_loop(key):
    x, y = _data(n=32)
    models = [_mlp(), _mlp()]
    opts = [
        ef.BayesAdam(
            [{"params": list(m[0].parameters())}, {"params": list(m[2].parameters()), "lr": 3e-3}],
            n_data=32,
            hessian=key,
            foreach=fe,
            batch_size=32,
            mc_samples=1 if key == "reparam" else 2,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip
        for m, fe in zip(models, (False, True))
    ]
    for _ in range(6):
        for m, o in zip(models, opts):
            o.train_step(m, x, y)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-16)
        for k in ("hess", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opts[0].state[p][k], opts[1].state[q][k], rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("key", ["reparam", "ggn"])
def test_large_tensors_updated_slice_by_slice_are_the_whole_update(key, monkeypatch):
    """The per-tensor update cuts tensors above FOREACH_CHUNK into flat slices (bounded
    temporaries); an elementwise update must not notice, up to the rounding of m, which the fused
    Adam kernel forms differently in its vectorised body and its scalar tail (an element of a
    7-element slice is in the tail, the same element of the whole tensor maybe not)."""
    from effortless.optim import bayesadam as ba

    x, y = _data(n=32)
    models = [_mlp(), _mlp()]
    opts = [ef.BayesAdam(m.parameters(), n_data=32, hessian=key, foreach=False, fused=False,
                         generator=torch.Generator().manual_seed(1)) for m in models]  # fmt: skip
    for chunk, m, o in zip((2**30, 7), models, opts):  # whole tensors, then slices of 7 elements
        monkeypatch.setattr(ba, "FOREACH_CHUNK", chunk)
        for _ in range(4):
            o.train_step(m, x, y)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=0)
        for k in ("hess", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opts[0].state[p][k], opts[1].state[q][k], rtol=1e-12, atol=0)


def test_antithetic_pairs_mirror_the_noise():
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, mc_samples=2, temperature=1.0)
    mu = [p.detach().clone() for p in model.parameters()]
    draws = []
    for _ in range(2):
        with opt.sampled_params(train=True):
            draws.append([p.detach().clone() for p in model.parameters()])
            F.cross_entropy(model(x), y).backward()
    for a, b, m in zip(*draws, mu):
        torch.testing.assert_close(a - m, -(b - m), rtol=1e-10, atol=1e-14)
        assert (a - m).abs().min() > 0
    opt2 = ef.BayesAdam(model.parameters(), n_data=64, antithetic=False)
    with opt2.sampled_params(train=True):
        first = next(model.parameters()).detach().clone()
    opt2.zero_grad()
    with opt2.sampled_params(train=True):
        second = next(model.parameters()).detach().clone()
    assert not torch.allclose(first - mu[0], -(second - mu[0]))


@pytest.mark.parametrize("how", ["exception", "zero_grad", "nonfinite"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_discarded_sample_still_has_its_antithetic_mirror(how, fused):
    """The training sample θ is written over its unit noise (no separate buffer); when the sample
    is discarded — an exception in the block, zero_grad() before step(), a rejected non-finite
    step — ε must come back so that the next draw is still the mirror μ − σ ε, with μ, h, the
    moments and the step counter untouched."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, temperature=1.0, fused=fused, nonfinite="skip")
    _loop_step(opt, model, x, y)
    _loop_step(opt, model, x, y)  # a whole pair: the next draw is a fresh +ε
    mu = [p.detach().clone() for p in model.parameters()]
    before = opt.state_dict()["state"][0]
    state = {k: v.clone() for k, v in before.items() if torch.is_tensor(v) and k != "noise"}
    first = []
    opt.zero_grad()
    try:
        with opt.sampled_params(train=True):
            first = [p.detach() - m for p, m in zip(model.parameters(), mu)]
            loss = F.cross_entropy(model(x), y)
            if how == "exception":
                raise KeyError("in the user's forward")
            (loss * (float("nan") if how == "nonfinite" else 1.0)).backward()
    except KeyError:
        pass
    if how == "zero_grad":
        opt.zero_grad()
    elif how == "nonfinite":
        opt.step()  # skipped
        assert opt.skipped_steps == 1
    for p, m in zip(model.parameters(), mu):
        assert torch.equal(p, m)
    after = opt.state_dict()["state"][0]
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    with opt.sampled_params(train=True):
        second = [p.detach() - m for p, m in zip(model.parameters(), mu)]
    for a, b in zip(first, second):
        assert a.abs().min() > 0
        torch.testing.assert_close(b, -a, rtol=1e-12, atol=1e-15)


def test_a_checkpoint_taken_between_a_sample_and_its_step_holds_the_noise():
    """The pending sample's θ lives in the noise buffer; state_dict() must still save ε (without
    touching the live state), so a resumed run draws the sample's exact mirror next."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, temperature=1.0)
    _loop_step(opt, model, x, y)
    _loop_step(opt, model, x, y)  # a whole pair: the next draw is a fresh +ε
    mu = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    with opt.sampled_params(train=True):
        first = [p.detach() - m for p, m in zip(model.parameters(), mu)]
        F.cross_entropy(model(x), y).backward()
    live = [opt.state[p]["noise"].clone() for p in model.parameters()]
    sd = opt.state_dict()
    for p, before in zip(model.parameters(), live):
        assert torch.equal(opt.state[p]["noise"], before)  # the live buffers still hold θ
    fresh = _mlp()
    fresh.load_state_dict(model.state_dict())
    opt2 = ef.BayesAdam(fresh.parameters(), n_data=64, temperature=1.0)
    opt2.load_state_dict(sd)
    with opt2.sampled_params(train=True):
        second = [p.detach() - m for p, m in zip(fresh.parameters(), mu)]
    for a, b in zip(first, second):
        assert a.abs().min() > 0
        torch.testing.assert_close(b, -a, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("edit", ["freeze", "temperature 0", "checkpoint"])
def test_a_parameter_frozen_between_its_sample_and_the_step_keeps_its_mirror(fused, edit):
    """The sample θ is drawn over the noise buffer and turned back into ε by the step. A bias
    frozen (or its group set to temperature 0) between the block and step() was skipped by that
    conversion, so its buffer kept θ and, trained again, its next sample was μ − σ θ instead of
    μ − σ ε; a checkpoint taken there saved θ as the noise. Now every buffer that received θ is
    converted, with the σ it was drawn with."""
    x, y = _data()
    torch.manual_seed(0)
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, temperature=1.0, fused=fused, noise_reuse=1)
    bias = list(model.parameters())[1]
    mu = bias.detach().clone()
    with opt.sampled_params():
        first = bias.detach() - mu
        F.cross_entropy(model(x), y).backward()
    if edit == "freeze":
        bias.requires_grad_(False)
    elif edit == "temperature 0":
        opt.param_groups[0]["temperature"] = 0.0
    else:
        bias.requires_grad_(False)
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)  # (the state dict holds the live tensors, which step() moves)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
        bias.requires_grad_(True)
    opt.step()
    opt.zero_grad()
    if edit == "checkpoint":
        fresh = _mlp()
        fresh.load_state_dict(model.state_dict())
        fresh_bias = list(fresh.parameters())[1]
        fresh_bias.data.copy_(mu)  # (the bias as it was at the checkpoint)
        opt = ef.BayesAdam(fresh.parameters(), n_data=64, temperature=1.0, fused=fused, noise_reuse=1)
        opt.load_state_dict(sd)
        model, bias = fresh, fresh_bias
    if edit == "freeze":
        assert torch.equal(bias, mu)
        bias.requires_grad_(True)
    opt.param_groups[0]["temperature"] = 1.0
    # (at temperature 0 the step moved μ by Adam and h by the sample's estimate: the mirror is
    # −σ' ε around the new μ; frozen, or restored from the checkpoint, the bias is where it was)
    mu_now, h_now = bias.detach().clone(), opt.state[bias]["hess"].clone()
    with opt.sampled_params():
        second = bias.detach() - mu_now
    assert first.abs().min() > 0
    first_unit = first * (64 * 0.1 + 1.0) ** 0.5  # (σ = 1/√(N h + δ) at T = 1, h = hess_init)
    torch.testing.assert_close(-second * (64 * h_now + 1.0).sqrt(), first_unit, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True])
def test_a_parameter_without_gradient_keeps_its_mirror_across_the_step(fused):
    """A parameter the loss does not touch is skipped by the update; its sample (drawn over its
    noise buffer) must still turn back into ε, so the mirror after the step is μ − σ ε."""
    x, y = _data()
    torch.manual_seed(0)
    model = nn.ModuleDict({"net": _mlp(), "unused": nn.Linear(3, 2).double()})
    opt = ef.BayesAdam(model.parameters(), n_data=64, temperature=1.0, fused=fused)
    w = model["unused"].weight
    mu = w.detach().clone()
    draws = []
    for _ in range(2):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            draws.append(w.detach() - mu)
            F.cross_entropy(model["net"](x), y).backward()
        assert w.grad is None
        opt.step()
    assert torch.equal(w, mu) and draws[0].abs().min() > 0
    torch.testing.assert_close(draws[1], -draws[0], rtol=1e-12, atol=1e-15)


def test_samples_have_the_posterior_variance():
    """θ − μ over many training draws has variance T / (N·h + δ) per weight."""
    model = nn.Linear(3, 2).double()
    opt = ef.BayesAdam(model.parameters(), n_data=50, hess_init=0.2, prior_precision=3.0,
                       temperature=0.5, antithetic=False)  # fmt: skip
    mu = model.weight.detach().clone()
    draws = []
    for _ in range(4000):
        with opt.sampled_params(train=False):
            draws.append(model.weight.detach() - mu)
    var = torch.stack(draws).var(0)
    expected = 0.5 / (50 * 0.2 + 3.0)
    assert ((var - expected).abs() < 5 * expected * math.sqrt(2 / 4000)).all()


def test_step_with_a_closure_samples_around_it():
    """Lightning-style `opt.step(closure)` equals the explicit loop with the same generator."""
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    o1 = ef.BayesAdam(m1.parameters(), n_data=64, generator=torch.Generator().manual_seed(4))
    o2 = ef.BayesAdam(m2.parameters(), n_data=64, generator=torch.Generator().manual_seed(4))

    def closure():
        o2.zero_grad()
        loss = F.cross_entropy(m2(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        l1 = _loop_step(o1, m1, x, y)
        l2 = o2.step(closure)
        assert torch.equal(l1.detach(), l2.detach())
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_a_closure_with_its_own_sampling_block_is_told_why_it_fails():
    """step(closure) samples around the closure; a closure that also enters sampled_params gets
    an error that says so (not only "cannot be nested"), and the optimizer is usable after it."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64)
    mu = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        with opt.sampled_params():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="already runs the closure inside sampled_params"):
        opt.step(closure)
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), mu))  # means back, untouched
    opt.zero_grad()
    _loop_step(opt, model, x, y)  # and an ordinary step works after it
    # (a plain nesting keeps its message)
    with pytest.raises(RuntimeError, match="cannot be nested"), opt.sampled_params(), opt.sampled_params():
        pass


@pytest.mark.parametrize("key", ["efisher", "ggn", "ggn-mc", "kfac"])
@pytest.mark.parametrize("arch", ["mlp", "layernorm", "shared", "convvariants", "decoder", "instancenorm",
                                  "transformer"])  # fmt: skip
def test_train_step_curvature_from_the_engine_or_the_fallback(key, arch):
    """train_step shares the training pass with the hook engine where it can (mlp, LayerNorm) and
    falls back to torch.func otherwise (shared weights, found at run time); either way h after one
    step at temperature 0 is the estimator's value at μ divided by B."""
    from tests.conftest import make_batch, make_model

    if key == "kfac" and arch != "mlp":
        pytest.skip("kfac needs Linear/Conv layers only")
    model = make_model(arch)
    x, y = make_batch(arch, "classification", n=8)
    ref_fn = {
        "efisher": lambda: curvature.diag_efisher(model, x, y, backend="func"),
        "ggn": lambda: curvature.diag_ggn(model, x, y, backend="func"),
        "ggn-mc": None,
        "kfac": lambda: curvature.diag_kfac(model, x, y),
    }[key]
    ref = ref_fn() if ref_fn else None
    opt = ef.BayesAdam(model.named_parameters(), n_data=100, hessian=key, temperature=0.0)
    opt.train_step(model, x, y)
    assert (opt._plans[model][1] is not None) == (arch != "shared")
    for n, p in model.named_parameters():
        if ref is not None:
            torch.testing.assert_close(opt.state[p]["hess"], ref[n] / 8, rtol=1e-10, atol=1e-15)
        else:
            assert torch.isfinite(opt.state[p]["hess"]).all() and (opt.state[p]["hess"] >= 0).all()


@pytest.mark.parametrize("key", ["efisher", "ggn", "kfac"])
def test_train_step_follows_parameters_frozen_and_unfrozen_between_steps(key):
    """The hook engine's plan is made for the parameters trained at the time. Unfreezing one
    after the first train_step used to leave it out of the cached plan: no estimate, so a fresh
    parameter crashed the step (ZeroDivisionError in the curvature average) and one that had
    estimates before kept its old h. Now: its h is the estimate at μ (temperature 0, the first
    estimate replaces hess_init), and a parameter frozen later keeps its state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    bias, last = model[0].bias, model[2].weight
    bias.requires_grad_(False)
    opt = ef.BayesAdam(model.parameters(), n_data=100, hessian=key, temperature=0.0)
    opt.train_step(model, x, y)
    assert bias not in opt.state
    bias.requires_grad_(True)
    ref = {"efisher": curvature.diag_efisher, "ggn": curvature.diag_ggn,
           "kfac": curvature.diag_kfac}[key](model, x, y)  # fmt: skip  (at μ: the sample at T = 0)
    opt.train_step(model, x, y)
    assert opt.state[bias]["hess_step"] == 1
    torch.testing.assert_close(opt.state[bias]["hess"], ref["0.bias"] / 16, rtol=1e-10, atol=1e-15)
    last.requires_grad_(False)
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[last].items()}
    w = last.detach().clone()
    opt.train_step(model, x, y)
    assert torch.equal(last, w) and opt.state[bias]["hess_step"] == 2
    for k, v in before.items():
        assert torch.equal(opt.state[last][k], v) if torch.is_tensor(v) else opt.state[last][k] == v


def _bn_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten(), nn.Linear(16, 3))  # fmt: skip
    return net, torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))


@pytest.mark.parametrize("hessian", ["ggn", "ggn-mc", "efisher", "kfac"])
def test_per_sample_keys_refuse_training_mode_batchnorm_before_anything_moves(hessian):
    model, x, y = _bn_cnn()
    opt = ef.BayesAdam(model.parameters(), n_data=8, hessian=hessian)
    weights = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError, match="couples the samples"):
        opt.train_step(model, x, y)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert not opt.state and opt._n_samples == 0


@pytest.mark.parametrize("hessian", ["hutchinson", "reparam"])
def test_batch_level_keys_train_through_batchnorm_updating_its_statistics_once(hessian):
    """Like a plain training step: one update of the running statistics per step (Hutchinson's
    probe forward made it two)."""
    model, x, y = _bn_cnn()
    opt = ef.BayesAdam(model.parameters(), n_data=8, hessian=hessian)
    opt.train_step(model, x, y)
    opt.train_step(model, x, y)
    assert int(model[1].num_batches_tracked) == 2


@pytest.mark.filterwarnings("ignore:Complex modules")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64])
def test_half_precision_and_complex_parameters_are_refused(dtype):
    """float16 parameters made μ NaN at the first step (Adam's eps underflows; 0/0 for a weight
    without gradient), and the error came a step later as a NaN loss; bf16 rounds the noise away."""
    with pytest.raises(ValueError, match=str(dtype).split(".")[-1]):
        ef.BayesAdam(nn.Linear(3, 2).to(dtype).parameters(), n_data=4)
    opt = ef.BayesAdam(nn.Linear(3, 2).parameters(), n_data=4)
    with pytest.raises(ValueError, match="params"):
        opt.add_param_group({"params": nn.Linear(3, 2).to(dtype).weight})
    with pytest.raises(TypeError):  # torch's own refusal of an unordered group still comes through
        opt.add_param_group({"params": {nn.Parameter(torch.zeros(2))}})


@pytest.mark.parametrize("fused", [False, True])
def test_a_model_cast_after_the_optimizer_is_refused_before_anything_moves(fused):
    """``model.double()`` after a step left the state in float32: the next block's forward failed
    with "mat1 and mat2 must have the same dtype" (a float32 sample among float64 inputs), a step
    with "expected dtype double" after some tensors had been updated (here the other way round:
    the float64 test model cast to float32), and the fused path gave up
    its kernels. A cast to half precision after the constructor, which refuses it, got as far as a
    non-finite curvature. Now both are refused by name before anything is drawn or updated, and
    the state carries over through state_dict as the message says."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.named_parameters(), n_data=64, fused=fused,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    opt.train_step(model, x, y)
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items() if torch.is_tensor(v)}
    model.float()
    weights = [p.detach().clone() for p in model.parameters()]
    for call in (lambda: opt.sampled_params().__enter__(), opt.step,
                 lambda: opt.train_step(model, x.float(), y)):  # fmt: skip
        with pytest.raises(RuntimeError, match=r"'0.weight' is torch.float32 .* state is torch.float64"):
            call()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(v, opt.state[model[0].weight][k]) for k, v in state.items())
    assert not opt._inside and opt.fused == fused
    sd = opt.state_dict()
    opt = ef.BayesAdam(model.named_parameters(), n_data=64, fused=fused)
    opt.load_state_dict(sd)
    opt.train_step(model, x.float(), y)  # the carried-over state, cast, trains on
    assert opt.state[model[0].weight]["hess"].dtype == torch.float32
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    fresh = _mlp()
    opt = ef.BayesAdam(fresh.named_parameters(), n_data=64, fused=fused)
    fresh.to(torch.bfloat16)
    with pytest.raises(ValueError, match="'0.weight' was cast to torch.bfloat16.*autocast"):
        opt.train_step(fresh, x.bfloat16(), y)
    assert not opt.state


def test_meta_parameters_are_refused_by_name():
    """A model built on the meta device (deferred initialisation) got torch's "META device type
    not an accelerator" from the generator's construction, which does not say what to do."""
    with pytest.raises(ValueError, match="meta device.*materialise"):
        ef.BayesAdam(nn.Linear(3, 2, device="meta").parameters(), n_data=4)


def test_backward_outside_the_block_is_refused_before_anything_moves():
    """The block swaps θ out for μ on exit without an in-place write, so autograd did not object
    to a backward after it: the gradient mixed the sample (saved inputs) and the mean (saved
    weights), and step() took it silently. Clipping after the block stays allowed."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, generator=torch.Generator().manual_seed(0))
    opt.train_step(model, x, y)
    with opt.sampled_params():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items() if torch.is_tensor(v)}
    with pytest.raises(RuntimeError, match="inside `with opt.sampled_params"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    after = opt.state[next(model.parameters())]
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    opt.zero_grad()  # the right way round, with clipping after the block, goes through
    with opt.sampled_params():
        F.cross_entropy(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def _step_refused(opt, model, match: str) -> list[torch.Tensor]:
    """step() raises a RuntimeError matching ``match`` and leaves the weights as they were
    (returned, for comparisons after later steps)."""
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    return weights


def test_gradients_accumulated_at_the_means_before_the_block_are_refused():
    """Lightning's accumulate_grad_batches in automatic optimisation runs all but the last
    micro-batch's backward outside optimizer.step, i.e. at the means: those gradients were
    averaged with the sample's, silently. Zeroing through the model is not accumulation."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, generator=torch.Generator().manual_seed(0))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # at μ
    with opt.sampled_params():
        F.cross_entropy(model(x), y).backward()
    weights = _step_refused(opt, model, "accumulate_grad_batches")
    opt.zero_grad()  # drops the refused step's sample
    for set_to_none in (False, True, False):  # zeroing through the model, either way, is not accumulation
        model.zero_grad(set_to_none=set_to_none)
        with opt.sampled_params():
            F.cross_entropy(model(x), y).backward()
        opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_a_gradient_left_on_a_parameter_added_since_zero_grad_is_refused():
    """A parameter added with add_param_group after zero_grad keeps the gradient it had (here the
    sum of two earlier backward passes, at other weights). The check compared the gradients'
    marks by position with those zero_grad recorded, so it never looked at the added parameter
    and the step used that stale sum; marks are now kept per parameter."""
    x, y = _data()
    model = _mlp()
    head = list(model.parameters())[-2:]
    opt = ef.BayesAdam(list(model.parameters())[:-2], n_data=64, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opt.zero_grad()  # (the head's gradients are not the optimizer's to clear)
        with opt.sampled_params():
            F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    assert all(p.grad is not None for p in head)
    opt.add_param_group({"params": head})
    with opt.sampled_params():
        F.cross_entropy(model(x), y).backward()
    weights = _step_refused(opt, model, "add_param_group")
    opt.zero_grad()
    with opt.sampled_params():
        F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(head[0], weights[-2])


def test_checkpointing_or_the_posterior_inside_the_sampled_block_is_refused():
    """Inside the block the parameters and the noise buffers hold θ and the sample is not recorded:
    a state dict saved there stored θ as the unit noise, and a resume from it diverged."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, generator=torch.Generator().manual_seed(0))
    opt.train_step(model, x, y)
    sd = opt.state_dict()
    with opt.sampled_params():
        with pytest.raises(RuntimeError, match="inside sampled_params"):
            opt.state_dict()
        with pytest.raises(RuntimeError, match="inside sampled_params"):
            opt.load_state_dict(sd)
        with pytest.raises(RuntimeError, match="inside sampled_params"):
            opt.posterior()  # its mean would have been the sample
        F.cross_entropy(model(x), y).backward()
    opt.step()


def test_a_training_block_without_backward_among_several_is_refused():
    """Two train=True blocks, one without backward: the step averaged the one gradient over two
    samples (half the step), silently. One block without backward (Lightning skipping a batch)
    stays a no-op step."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, generator=torch.Generator().manual_seed(0))
    opt.zero_grad()
    with opt.sampled_params():
        F.cross_entropy(model(x), y).backward()
    with opt.sampled_params():
        model(x)  # evaluated, no backward
    with pytest.raises(RuntimeError, match="1 of the 2 .* ran no backward"):
        opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    with opt.sampled_params():
        model(x)
    opt.step()  # no gradient: nothing moves, no error
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_step_warns_when_n_data_is_smaller_than_the_batch():
    """A common slip: the batch size passed as n_data (the likelihood then weighs 1/4 here)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    with pytest.warns(RuntimeWarning, match="n_data=8 is smaller than this batch of 32"):
        ef.BayesAdam(model.parameters(), n_data=8).train_step(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ef.BayesAdam(model.parameters(), n_data=32).train_step(model, x, y)


# -- parameters that join the optimisation mid-pair ----------------------------------------------


def _unit_noise(opt, model, x, y):
    """One training iteration; returns each parameter's unit noise (θ − μ)/σ of its sample."""
    post = opt.posterior(model)
    mu = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    with opt.sampled_params(train=True):
        z = {n: (p.detach() - mu[n]) * post.precision[n].sqrt() for n, p in model.named_parameters()
             if n in post.precision}  # fmt: skip
        F.cross_entropy(model(x), y).backward()
    opt.step()
    return z


def _half_frozen(seed=0):
    model = _mlp(seed)
    opt = ef.BayesAdam(model.named_parameters(), n_data=64, temperature=1.0,
                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return model, opt


def test_unfreezing_on_an_antithetic_mirror_draws_fresh_noise():
    """A tensor without noise of its pair's first draw (frozen then, or with no state at all)
    got the mirror of an uninitialised buffer (weights off by 1e29) or of an old draw."""
    x, y = _data()
    runs = []
    for _ in range(2):  # the same seed twice: the fresh noise comes from the optimizer's generator
        model, opt = _half_frozen()
        model[0].requires_grad_(False)
        z1 = _unit_noise(opt, model, x, y)  # a pair's first draw without layer 0
        model[0].requires_grad_(True)
        z2 = _unit_noise(opt, model, x, y)  # its mirror, with layer 0 new
        for n in ("2.weight", "2.bias"):
            torch.testing.assert_close(z2[n], -z1[n])  # the others still mirror
        w = z2["0.weight"]
        assert torch.isfinite(w).all() and 0.5 < float(w.std()) < 1.5 and float(w.abs().max()) < 6
        z3 = _unit_noise(opt, model, x, y)  # a new pair: layer 0 frozen ...
        model[0].requires_grad_(False)
        _unit_noise(opt, model, x, y)
        _unit_noise(opt, model, x, y)  # ... through this first draw, so its ε is z3's, stale
        model[0].requires_grad_(True)
        z6 = _unit_noise(opt, model, x, y)
        for n in ("0.weight", "0.bias"):
            assert not torch.allclose(z6[n].abs(), z3[n].abs()), n
        runs.append((z2, z6))
    for a, b in zip(*runs):
        for n in a:
            assert torch.equal(a[n], b[n]), n


def test_add_param_group_on_an_antithetic_mirror_and_resume():
    x, y = _data()

    def run(stop=None):
        torch.manual_seed(0)
        body, head = nn.Linear(5, 8).double(), nn.Linear(8, 3).double()
        opt = ef.BayesAdam(body.parameters(), n_data=64, temperature=1.0,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
        for i in range(6):
            if i == 3:  # joins on a mirror (steps 0, 2, 4 are a pair's first draw)
                opt.add_param_group({"params": head.parameters(), "lr": 0.01})
            if i == stop:  # checkpoint, and continue in fresh objects
                buf = io.BytesIO()
                torch.save({"opt": opt.state_dict(), "b": body.state_dict(), "h": head.state_dict()}, buf)
                buf.seek(0)
                ck = torch.load(buf, weights_only=True)
                torch.manual_seed(1)
                body, head = nn.Linear(5, 8).double(), nn.Linear(8, 3).double()
                body.load_state_dict(ck["b"])
                head.load_state_dict(ck["h"])
                opt = ef.BayesAdam(
                    [{"params": body.parameters()}, {"params": head.parameters(), "lr": 0.01}],
                    n_data=64,
                    temperature=1.0,
                    generator=torch.Generator().manual_seed(9),
                )
                opt.load_state_dict(ck["opt"])
            opt.zero_grad()
            mu = head.weight.detach().clone()
            with opt.sampled_params():
                if i == 3:  # the head's first sample: noise of its own (was an uninitialised buffer)
                    g = opt.param_groups[1]
                    prec = opt.state[head.weight]["hess"] * g["n_data"] + g["prior_precision"]
                    z = (head.weight.detach() - mu) * prec.sqrt()  # (T = 1)
                F.cross_entropy(head(torch.tanh(body(x))), y).backward()
            opt.step()
        return [p.detach() for p in (*body.parameters(), *head.parameters())], z

    ref, z = run()
    assert torch.isfinite(z).all() and 0.4 < float(z.std()) < 1.6 and float(z.abs().max()) < 6
    ref = run()[0]
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in ref)
    for a, b in zip(ref, run(stop=5)[0]):
        assert torch.equal(a, b)


def test_add_param_group_checks_the_group_and_keeps_the_optimizer_as_it_was():
    model = _mlp()
    opt = ef.BayesAdam(model[0].parameters(), n_data=64)
    for bad in ({"n_data": -1}, {"lr": float("nan")}, {"betas": (0.9, 1.0)}):
        with pytest.raises(ValueError, match=rf"param_groups\[1\]: {next(iter(bad))}"):
            opt.add_param_group({"params": model[2].parameters(), **bad})
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": model[2].parameters()})  # the parameters were not taken
    assert len(opt.param_groups) == 2


def test_posterior_keyed_by_a_model_with_frozen_parameters():
    x, y = _data()
    model, opt = _half_frozen()
    model[0].bias.requires_grad_(False)  # (in the optimizer, frozen)
    _loop_step(opt, model, x, y)
    post = opt.posterior(model)  # was a KeyError on the frozen bias
    assert sorted(post.mean) == ["0.weight", "2.bias", "2.weight"]
    assert torch.equal(post.mean["2.weight"], model[2].weight)
    assert sorted(opt.posterior().mean) == sorted(post.mean)  # (the optimizer's own names)
    positional = ef.BayesAdam(model.parameters(), n_data=64)
    _loop_step(positional, model, x, y)
    assert sorted(positional.posterior().mean) == ["0", "2", "3"]  # positions count the frozen one
    assert sorted(positional.posterior(model).mean) == sorted(post.mean)


# -- several samples per step: p.grad shows their mean ---------------------------------------------


def _blocks(opt, model, x, y, k, between=None):
    """k sampled_params blocks before a step; returns each block's own gradient (read inside)."""
    own = []
    for i in range(k):
        if i and between is not None:
            between(i)
        with opt.sampled_params(train=True):
            before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
            F.cross_entropy(model(x), y).backward()
            own.append([p.grad - (0 if b is None else b) for p, b in zip(model.parameters(), before)])
    return own


def test_with_several_samples_the_gradient_shown_is_their_mean_and_edits_count():
    """Gradient clipping after several samples used to see p.grad = None (the sums were kept
    aside until step) and clipped nothing, silently; now p.grad is the mean the step uses."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip

    def halve(i):
        if i == 2:
            for p in model.parameters():
                p.grad.mul_(0.5)

    own = _blocks(opt, model, x, y, 3, between=halve)
    for j, p in enumerate(model.parameters()):
        expect = (0.5 * (own[0][j] + own[1][j]) + own[2][j]) / 3
        torch.testing.assert_close(p.grad, expect, rtol=1e-12, atol=1e-15)


def test_editing_the_mean_of_several_samples_changes_the_step_as_scaling_the_loss_would():
    x, y = _data()
    means = []
    for mode in ("edit p.grad", "scale the loss"):
        model = _mlp()
        opt = ef.BayesAdam(model.parameters(), n_data=64, temperature=1.0,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
        for _ in range(2):
            with opt.sampled_params(train=True):
                scale = 0.5 if mode == "scale the loss" else 1.0
                (scale * F.cross_entropy(model(x), y)).backward()
        if mode == "edit p.grad":
            for p in model.parameters():
                p.grad.mul_(0.5)  # what clip_grad_norm_ does, by a power of two (exact)
        opt.step()  # (the curvature differs: its estimates use each sample's own gradient)
        means.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*means):
        assert torch.equal(a, b)


def test_clip_grad_norm_after_several_samples_clips_their_mean():
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    own = _blocks(opt, model, x, y, 2)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    mean = [(a + b) / 2 for a, b in zip(*own)]
    assert float(norm) == pytest.approx(float(torch.sqrt(sum(g.pow(2).sum() for g in mean))), rel=1e-10)
    total = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert float(total) == pytest.approx(1e-3, rel=1e-4)
    opt.step()


# -- a training block that raises after its backward records nothing ------------------------------


def _failing_block(opt, model, x, y, backward=True):
    with pytest.raises(KeyboardInterrupt), opt.sampled_params(train=True):
        if backward:
            F.cross_entropy(model(x), y).backward()
        raise KeyboardInterrupt  # (an interrupt, or an error the caller catches and retries)


@pytest.mark.parametrize("before", [0, 1, 2])  # samples recorded before the block that fails
def test_a_block_that_raises_after_its_backward_leaves_no_gradient_behind(before):
    """Its gradient was added to the pending samples' (a second sample failing doubled the first's
    gradient in the step, silently), or to the next block's after a retry. The reference run's
    failing block raises before its backward (the same draws)."""
    x, y = _data()

    def run(backward):
        model = _mlp()
        opt = ef.BayesAdam(model.parameters(), n_data=64, temperature=1.0,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
        opt.zero_grad()
        for _ in range(before):
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
        _failing_block(opt, model, x, y, backward)
        if not before:  # the retry
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
        opt.step()
        params = list(model.parameters())
        return [p.detach().clone() for p in params], [opt.state[p]["hess"] for p in params]

    (ref_mu, ref_h), (mu, h) = run(False), run(True)
    for a, b in zip(ref_mu + ref_h, mu + h):
        assert torch.equal(a, b)


def test_a_failed_block_on_gradients_that_were_there_before_asks_for_zero_grad():
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64)
    _loop_step(opt, model, x, y)
    opt.zero_grad(set_to_none=False)  # zero tensors: the failed backward adds into them
    _failing_block(opt, model, x, y)
    with pytest.raises(RuntimeError, match="zero_grad"), opt.sampled_params(train=True):
        pass
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step()
    _loop_step(opt, model, x, y)  # (zero_grad first): trains again
    assert opt.state[model[0].weight]["step"] == 2


def test_posterior_warns_where_the_curvature_was_never_estimated():
    """reparam estimates h from the weight noise; at temperature 0 there is none, h stays at
    hess_init and the posterior's variance says nothing about the data: posterior() says so. With
    an estimate (gradsq at T = 0, reparam at T > 0) or before any step it stays quiet."""
    import warnings

    x, y = _data(n=16)

    def trained(**kw):
        model = _mlp()
        opt = ef.BayesAdam(model.parameters(), n_data=100, **kw)
        opt.batch_size = 16
        for _ in range(2):
            opt.zero_grad()
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
            opt.step()
        return opt

    opt = trained(temperature=0.0)
    with pytest.warns(RuntimeWarning, match=r"curvature of 4 of 4 .*temperature=0 draws no weight noise"):
        post = opt.posterior()
    for p, prec in zip(opt.param_groups[0]["params"], post.precision.values()):
        assert torch.equal(opt.state[p]["hess"], torch.full_like(p, opt.defaults["hess_init"]))
        torch.testing.assert_close(prec, torch.full_like(p, 100 * opt.defaults["hess_init"] + 1.0))
    for quiet in (trained(temperature=0.0, hessian="gradsq"), trained(temperature=0.5),
                  ef.BayesAdam(_mlp().parameters(), n_data=100, temperature=0.0)):  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            quiet.posterior()


def test_posterior_warns_of_a_parameter_no_gradient_reached():
    """A layer the training forward never uses gets no gradient, so no step and no curvature: its
    posterior precision is (N·hess_init + δ)/T, a confident posterior from hess_init alone
    (σ ≈ 0.001 at N = 60,000) for weights the data say nothing about; it came without a word
    (the warning for curvature never estimated counted only tensors that had been stepped)."""
    x, y = _data()
    torch.manual_seed(0)
    model = nn.ModuleDict({"net": _mlp(), "spare": nn.Linear(5, 3).double()})
    opt = ef.BayesAdam(model.named_parameters(), n_data=64, prior_precision=2.0, temperature=0.5)
    for _ in range(3):
        opt.zero_grad()
        with opt.sampled_params():
            F.cross_entropy(model["net"](x), y).backward()
        opt.step()
    match = r"2 of 6 parameter tensors \(spare.weight, spare.bias\) was never estimated \(no gradient reached"
    with pytest.warns(RuntimeWarning, match=match):
        post = opt.posterior()
    torch.testing.assert_close(post.precision["spare.weight"], torch.full((3, 5), (64 * 0.1 + 2.0) / 0.5,
                                                                           dtype=torch.float64))  # fmt: skip
    fresh = ef.BayesAdam(_mlp().named_parameters(), n_data=64)  # (no step at all: no warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.posterior()


@pytest.mark.parametrize("hessian", ["reparam", "ggn"])
def test_train_step_with_every_parameter_frozen_says_so(hessian):
    """It failed in the backward with "element 0 of tensors does not require grad"."""
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, hessian=hessian)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of the optimizer has requires_grad=False"):
        opt.train_step(model, x, y)
    model[2].requires_grad_(True)  # one layer trains again
    opt.train_step(model, x, y)
    assert opt.state[model[2].weight]["step"] == 1 and model[0].weight not in opt.state


def test_the_automatic_prior_moves_to_the_exact_evidence_maximum():
    """One "auto" update sets δ to the evidence's maximiser given μ and N·h (within the factor 2 a
    step allows). MacKay's fixed point, iterated 50 times, crawls where the curvature is small
    against δ (each iteration contracts by ~1 − Nh/δ): here it went from 1 to 1.18 towards 2.06."""
    from effortless.posterior.evidence import tune_prior_precision

    torch.manual_seed(0)
    model = nn.Linear(50, 4).double()
    opt = ef.BayesAdam(model.parameters(), n_data=100, prior_precision="auto", prior_update_every=1,
                       prior_warmup=0)  # fmt: skip
    x, y = torch.randn(16, 50, dtype=torch.float64), torch.randint(0, 4, (16,))
    opt.train_step(model, x, y)
    group = group_before = opt.param_groups[0]
    for scale in (0.05, 3.0):  # the best δ below and above the current one
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * scale)
                opt.state[p]["hess"].fill_(1e-4)  # N·h = 0.01, against δ ≈ 1
        group["prior_precision"] = d0 = 1.0
        opt._maybe_update_prior()
        mean = {str(i): p.detach() for i, p in enumerate(model.parameters())}
        nh = {str(i): opt.state[p]["hess"] * 100 for i, p in enumerate(model.parameters())}
        best = tune_prior_precision(0.0, mean, nh)
        expected = min(max(best, d0 / 2), 2 * d0)
        assert group["prior_precision"] == pytest.approx(expected, rel=1e-9), (best, group["prior_precision"])
    assert group is group_before
