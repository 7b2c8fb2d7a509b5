"""Gradient accumulation: micro-batches under one weight sample equal one step on their union."""

import pytest
import torch
import torch.nn.functional as F

import effortless as ef
from tests.optim.test_bayesadam import _data, _mlp


def _opt(model, key, seed=3, **kw):
    return ef.BayesAdam(model.parameters(), n_data=500, hessian=key, fused=False,
                        generator=torch.Generator().manual_seed(seed), **kw)  # fmt: skip


def _state(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [opt.state[p][k].clone() for k in ("hess", "exp_avg", "exp_avg_sq")]
    return out


@pytest.mark.parametrize("key", ["reparam", "gradsq", "efisher", "ggn"])
@pytest.mark.parametrize("k", [3, 4])
def test_train_step_accumulate_equals_the_whole_batch(key, k):
    x, y = _data(n=30)
    runs = []
    for acc in (1, k):
        model = _mlp()
        opt = _opt(model, key)
        for _ in range(3):
            opt.train_step(model, x, y, accumulate=acc)
        runs.append(_state(model, opt))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.equal(runs[0][0], _mlp().state_dict()["0.weight"])  # training happened


def test_manual_accumulation_in_one_sample_equals_the_union():
    x, y = _data(n=32)
    results = []
    for parts in (1, 4):
        model = _mlp()
        opt = _opt(model, "reparam")
        for _ in range(3):
            opt.zero_grad()
            with opt.sampled_params(train=True):
                for xc, yc in zip(x.chunk(parts), y.chunk(parts)):
                    (F.cross_entropy(model(xc), yc) / parts).backward()
            opt.step()
        results.append(_state(model, opt))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_one_sample_per_micro_batch_averages_the_gradients():
    """Entering sampled_params once per micro-batch averages over the samples: with (almost) no
    noise the mean moves exactly as on the union (the curvature then differs: MC noise)."""
    x, y = _data(n=32)
    means = []
    for parts in (1, 4):
        model = _mlp()
        opt = _opt(model, "reparam", temperature=1e-24)
        opt.zero_grad()
        for xc, yc in zip(x.chunk(parts), y.chunk(parts)):
            with opt.sampled_params(train=True):
                F.cross_entropy(model(xc), yc).backward()
        opt.step()
        means.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*means):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_accumulate_is_validated():
    x, y = _data(n=8)
    model = _mlp()
    opt = _opt(model, "reparam")
    for bad in (0, 9, 1.5):
        with pytest.raises(ValueError, match="accumulate"):
            opt.train_step(model, x, y, accumulate=bad)


def test_bf16_autocast_trains_with_fp32_state():
    """bf16 autocast on CPU: the forward runs in bf16, gradients, means and curvature stay fp32."""
    x, y = _data(n=64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = ef.BayesAdam(model.parameters(), n_data=64, lr=1e-2, generator=torch.Generator().manual_seed(0))
    x = x.float()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                assert out.dtype == torch.bfloat16
                loss = F.cross_entropy(out.float(), y)
            loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    for p in model.parameters():
        assert p.dtype == torch.float32 and opt.state[p]["hess"].dtype == torch.float32
        assert bool(torch.isfinite(opt.state[p]["hess"]).all())


def _scaled_run(init_scale, steps=5, enabled=True, poison=False):
    x, y = _data(n=64)
    if poison:  # an overflow, as fp16 gradients of a too-large loss scale would have
        x[0, 0] = float("inf")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = ef.BayesAdam(model.parameters(), n_data=64, generator=torch.Generator().manual_seed(0), fused=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, enabled=enabled)
    for _ in range(steps):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            scaler.scale(F.cross_entropy(model(x.float()), y)).backward()
            scaler.unscale_(opt)  # inside the sampling context, before the gradients are read
        scaler.step(opt)
        scaler.update()
    return model, opt, scaler


def test_grad_scaler_unscaled_inside_the_sample_is_exact():
    """A power-of-two loss scale, unscaled inside sampled_params, gives bitwise the unscaled run."""
    (m1, o1, _), (m2, o2, _) = _scaled_run(2.0**12, enabled=False), _scaled_run(2.0**12)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q) and torch.equal(o1.state[p]["hess"], o2.state[q]["hess"])


def test_grad_scaler_overflow_skips_the_step_and_keeps_the_state():
    model, opt, scaler = _scaled_run(2.0**12, steps=1, poison=True)
    assert scaler.get_scale() == 2.0**11  # the scaler saw the overflow and backed off
    for p in model.parameters():  # no step was taken: counters, curvature and momentum as initialised
        st = opt.state[p]
        assert st["step"] == 0 and bool((st["hess"] == 0.1).all()) and not st["exp_avg"].any()
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)  # means untouched


@pytest.mark.parametrize("hessian", ["ggn", "efisher", "ggn-mc", "kfac"])
@pytest.mark.parametrize("fused", [False, True])
def test_bf16_autocast_train_step_with_model_side_curvature(hessian, fused):
    """Under bf16 autocast the hook rules ran their products in bf16 and returned a bf16
    curvature, which the eager update refused ("expected dtype float for `end`")."""
    x, y = _data(n=64)
    x = x.float()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = ef.BayesAdam(model.parameters(), n_data=64, hessian=hessian, fused=fused,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            opt.train_step(model, x, y)
    for p in model.parameters():
        assert p.dtype == opt.state[p]["hess"].dtype == torch.float32
        assert bool(torch.isfinite(opt.state[p]["hess"]).all())


def test_curvature_under_bf16_autocast_is_float32_and_matches_per_sample_squares():
    """The functions return the parameters' dtype under autocast (they returned bf16), and the
    empirical Fisher equals the squares of per-sample gradients taken under the same autocast."""
    x, y = _data(n=32)
    x = x.float()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ef.curvature.diag_efisher(model, x, y)
        ggn = ef.curvature.diag_ggn(model, x, y)
        factors = ef.curvature.kfac(model, x, y)
    assert {t.dtype for t in [*got.values(), *ggn.values()]} == {torch.float32}
    assert {t.dtype for pair in factors.values() for t in pair} == {torch.float32}
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[i : i + 1])
        grads = torch.autograd.grad(F.cross_entropy(out.float(), y[i : i + 1], reduction="sum"),
                                    list(model.parameters()))  # fmt: skip
        for (n, _), g in zip(model.named_parameters(), grads):
            ref[n] += g.float().square()
    for n in ref:
        assert (got[n] - ref[n]).abs().max() <= 0.02 * ref[n].abs().max(), n
