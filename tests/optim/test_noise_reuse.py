"""BayesAdam(noise_reuse=K): each fresh Gaussian draw serves K draws, the later ones the last unit
noise cyclically shifted by a random offset."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effortless as ef
from effortless.optim import bayesadam

from ._checkpoint import round_trip


def _regression(n=96, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, x @ torch.randn(d, 32, generator=g, dtype=torch.float64)


def _loop_step(opt, model, x, y):
    opt.zero_grad()
    with opt.sampled_params(train=True):
        F.mse_loss(model(x), y).backward()
    opt.step()


def _noise_after_each_step(reuse, steps, **kw):
    """The weight's and the bias's noise buffers after each step (they hold sign · ε then)."""
    x, y = _regression()
    torch.manual_seed(0)
    model = nn.Linear(64, 32).double()  # weight 2048 elements (reused), bias 32 (always fresh)
    opt = ef.BayesAdam(model.parameters(), n_data=96, temperature=1.0, noise_reuse=reuse,
                       generator=torch.Generator().manual_seed(1), **kw)  # fmt: skip
    out = []
    for _ in range(steps):
        _loop_step(opt, model, x, y)
        out.append([opt.state[p]["noise"].clone() for p in model.parameters()])
    return out


def _shift_between(prev: torch.Tensor, new: torch.Tensor) -> int | None:
    """k with new ≈ roll(prev, k) (flattened), or None."""
    a, b = prev.reshape(-1), new.reshape(-1)
    k = int((b - a[0]).abs().argmin())  # roll(a, k)[k] = a[0]
    return k if torch.allclose(torch.roll(a, k), b, rtol=1e-9, atol=1e-12) else None


def test_a_reused_draw_is_the_last_noise_shifted_and_small_tensors_draw_fresh():
    # antithetic pairs: steps (1, 2) pair 1, fresh; (3, 4) pair 2, reused; (5, 6) pair 3, fresh
    buf = _noise_after_each_step(reuse=2, steps=6)
    (w1, b1), (w2, b2), (w3, b3), (w4, _), (w5, b5), _ = buf
    torch.testing.assert_close(w2, -w1, rtol=1e-9, atol=1e-12)  # the mirror
    k = _shift_between(w2, w3)  # pair 2's ε is pair 1's last noise, −ε, rolled
    assert k is not None and 1 <= k < w3.numel()
    assert (w3 - w2).abs().min() > 0  # no entry keeps its own value
    torch.testing.assert_close(w4, -w3, rtol=1e-9, atol=1e-12)
    assert _shift_between(w4, w5) is None  # pair 3 draws fresh (a new cycle)
    assert not torch.allclose(w5.reshape(-1).sort().values, w4.reshape(-1).sort().values.neg().flip(0))
    # the bias is under REUSE_MIN_NUMEL: fresh every pair, never a permutation of the last
    assert b1.numel() < bayesadam.REUSE_MIN_NUMEL
    assert not torch.allclose(b3.sort().values, b2.sort().values)


def test_noise_reuse_1_draws_fresh_every_pair_as_before():
    buf = _noise_after_each_step(reuse=1, steps=4)
    assert _shift_between(buf[1][0], buf[2][0]) is None
    assert not torch.allclose(buf[2][0].reshape(-1).sort().values, buf[1][0].reshape(-1).sort().values)


def test_without_antithetic_every_step_is_a_draw_and_reuse_counts_steps():
    buf = _noise_after_each_step(reuse=3, steps=4, antithetic=False)
    assert _shift_between(buf[0][0], buf[1][0]) is not None
    assert _shift_between(buf[1][0], buf[2][0]) is not None
    assert _shift_between(buf[2][0], buf[3][0]) is None  # step 4 starts a new cycle


STEPS = 6000


@pytest.mark.parametrize("reuse", [1, 4])
def test_reparam_curvature_converges_to_the_hessian_diagonal_with_reused_noise(reuse, monkeypatch):
    """A quadratic loss at fixed means (lr 0): the equal-weight running average of the reparam
    estimates converges to diag(XᵀX)/N. Reused noise must converge as fresh noise does."""
    monkeypatch.setattr(bayesadam, "REUSE_MIN_NUMEL", 1)
    g = torch.Generator().manual_seed(0)
    n, d = 200, 24
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    exact = (x * x).mean(0)  # the Hessian diagonal of ½ mean (y − x w)²
    torch.manual_seed(0)
    model = nn.Linear(d, 1, bias=False).double()
    opt = ef.BayesAdam(model.parameters(), n_data=n, lr=0.0, hess_beta=None, hess_init=1.0, temperature=1.0,
                       noise_reuse=reuse, generator=torch.Generator().manual_seed(3))  # fmt: skip
    for _ in range(STEPS):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            (0.5 * (model(x) - y).pow(2).mean()).backward()
        opt.step()
    h = opt.state[model.weight]["hess"][0]
    rel = (h - exact).abs() / exact
    print(f"reuse={reuse}: max {float(rel.max()):.4f} mean {float(rel.mean()):.4f}")
    # 3000 pairs: a standard error of ~2.6 % per weight (√(2/3000)); fresh noise gives 7.0 / 2.6 %
    assert rel.max() < 0.12, rel
    assert rel.mean() < 0.04, rel


def test_resume_inside_a_cycle_is_bit_identical():
    x, y = _regression()
    x, y = x.float(), y.float()

    def make(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32))
        return model, ef.BayesAdam(model.parameters(), n_data=96, noise_reuse=3,
                                   generator=torch.Generator().manual_seed(seed))  # fmt: skip

    ref = make(5)
    for _ in range(14):
        _loop_step(ref[1], ref[0], x, y)
    a = make(5)
    for _ in range(9):  # mid-pair, mid-cycle (pair 5: the second draw of the cycle 4–6)
        _loop_step(a[1], a[0], x, y)
    ckpt = round_trip(a[0], a[1])
    b = make(99)
    b[0].load_state_dict(ckpt["model"])
    b[1].load_state_dict(ckpt["opt"])
    for _ in range(5):
        _loop_step(b[1], b[0], x, y)
    for p, q in zip(ref[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "hess", "noise"):
            assert torch.equal(ref[1].state[p][k], b[1].state[q][k]), k


def test_a_checkpoint_from_before_noise_reuse_resumes_drawing_fresh():
    x, y = _regression()
    torch.manual_seed(0)
    model = nn.Linear(64, 32).double()
    opt = ef.BayesAdam(model.parameters(), n_data=96, noise_reuse=4)
    _loop_step(opt, model, x, y)
    sd = opt.state_dict()
    del sd["bayesadam"]["noise_reuse"]
    opt2 = ef.BayesAdam(model.parameters(), n_data=96, noise_reuse=4)
    opt2.load_state_dict(sd)
    assert opt2.noise_reuse == 1
    sd = opt.state_dict()
    opt2.load_state_dict(sd)
    assert opt2.noise_reuse == 4
