"""BayesAdam with ``state_dtype=torch.bfloat16``: m, v and h kept in bf16 (v and h rounded
stochastically), everything else as with float32 state."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effortless as ef
from effortless.optim import _fused

from ._checkpoint import round_trip

BF16 = torch.bfloat16


def _needs_compiled_bf16():
    """Skip where this torch's compiled code drops the bf16 round trips (BayesAdam then runs bf16
    state uncompiled; torch 2.6 is such a torch). Checked inside tests: the check compiles."""
    if not _fused.lowp_state_supported():
        pytest.skip("this torch's compiled code drops the bf16 round trip; bf16 state runs eagerly")


def _bf16_grid_points(n=2000, seed=0):
    """Values strictly between neighbouring bf16 numbers (so round to nearest is biased for them),
    above bf16 numbers that are not powers of two (below those the spacing halves: the dither,
    sized to the spacing above, is then biased for values within one spacing of the power)."""
    g = torch.Generator().manual_seed(seed)
    lo = (torch.rand(n, generator=g) * 10 + 0.01).to(BF16).float()
    lo = lo[lo != torch.exp2(torch.floor(torch.log2(lo)))]
    spacing = (lo * (1 + 0.75 * 2**-7)).to(BF16).float() - lo
    frac = torch.rand(lo.shape, generator=g) * 0.8 + 0.1
    return lo + frac * spacing, lo


def test_stochastic_rounding_is_unbiased_and_nearest_is_not():
    x, lo = _bf16_grid_points()
    us = (torch.arange(256, dtype=torch.float32) + 0.5) / 256  # the dither, uniform over its range
    mean = torch.stack([_fused.round_stochastic(x, u, lo).to(BF16).float() for u in us]).mean(0)
    spacing = (lo * (1 + 0.75 * 2**-7)).to(BF16).float() - lo
    assert ((mean - x).abs() / spacing).max() < 0.01  # exact up to the dither's 256-point grid
    nearest = x.to(BF16).float()
    assert ((nearest - x).abs() / spacing).mean() > 0.2  # what the test would see without dither


def test_a_bf16_running_average_follows_its_target_down_only_with_stochastic_rounding():
    """h ← 0.999 h + 0.001 ĥ with ĥ below h: round to nearest never moves h (each step is less than
    half a bf16 spacing); stochastic rounding gets to the target like float32 does."""
    start, target = torch.full((1000,), 1.0), torch.full((1000,), 0.5)
    h32, nearest, sr = start.clone(), start.to(BF16), start.to(BF16)
    for t in range(1, 4001):
        h32 = 0.999 * h32 + 0.001 * target
        _fused._store(nearest, 0.999 * nearest.float() + 0.001 * target)
        old = sr.float()
        _fused._store(sr, 0.999 * old + 0.001 * target, ef.optim.bayesadam.dither(t, 1), old)
    assert torch.equal(nearest.float(), start)  # stalled at its start
    assert abs(float(sr.float().mean()) - float(h32.mean())) < 0.002
    assert float(sr.float().std()) < 0.01


def test_a_value_left_alone_is_stored_unchanged():
    x, _ = _bf16_grid_points()
    old = x.to(BF16).float()
    for u in (0.0, 0.25, 0.5, 0.999):
        assert torch.equal(_fused.round_stochastic(old, u, old).to(BF16).float(), old)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x @ torch.randn(6, 3, generator=g)).argmax(1)


def _step(model, opt, x, y):
    opt.zero_grad()
    with opt.sampled_params():
        F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("state_dtype,dtypes", [
    (BF16, (BF16, BF16, BF16)),
    ({"hess": BF16}, (torch.float32, torch.float32, BF16)),  # a dict names the state kept in bf16
    ({"exp_avg": BF16, "exp_avg_sq": torch.float32}, (BF16, torch.float32, torch.float32)),
], ids=["m, v, h", "h only", "m only"])  # fmt: skip
def test_state_dtypes_and_the_posterior(state_dtype, dtypes):
    model = _mlp()
    x, y = _data()
    opt = ef.BayesAdam(model.named_parameters(), n_data=64, state_dtype=state_dtype)
    for _ in range(3):
        _step(model, opt, x, y)
    st = opt.state[model[0].weight]
    assert (st["exp_avg"].dtype, st["exp_avg_sq"].dtype, st["hess"].dtype) == dtypes
    assert st["noise"].dtype == st["mean_avg"].dtype == torch.float32
    post = opt.posterior()
    assert post.precision["0.weight"].dtype == torch.float32
    torch.testing.assert_close(post.precision["0.weight"], (st["hess"].float() * 64 + 1.0) / 0.01)


@pytest.mark.parametrize("kwargs,match", [
    ({"state_dtype": torch.float16}, "state_dtype"),
    ({"state_dtype": "bf16"}, "state_dtype"),
])  # fmt: skip
def test_bad_state_dtype_is_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ef.BayesAdam(_mlp().parameters(), n_data=8, **kwargs)


def test_bf16_state_needs_float32_parameters():
    with pytest.raises(ValueError, match="float32 parameters"):
        ef.BayesAdam(_mlp().double().parameters(), n_data=8, state_dtype=BF16)


@pytest.mark.parametrize("hessian", ["reparam", "ggn"])
def test_fused_step_equals_the_eager_step(hessian):
    """One step from the same state: the compiled kernels (compiled with the bf16 round trips kept)
    and the eager update store the same bf16 state, but for the few values whose float32 inputs
    differ in the last bit (the two paths round μ and θ differently)."""
    _needs_compiled_bf16()
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, hessian=hessian, state_dtype=BF16, fused=True,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip

    def step(model, opt):
        if hessian == "reparam":
            _step(model, opt, x, y)
        else:
            opt.train_step(model, x, y)

    for _ in range(4):
        step(model, opt)
    twin = copy.deepcopy(model)
    eager = ef.BayesAdam(twin.parameters(), n_data=64, hessian=hessian, state_dtype=BF16, fused=False)
    eager.load_state_dict(copy.deepcopy(opt.state_dict()))
    step(model, opt)
    step(twin, eager)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for k in ("exp_avg", "exp_avg_sq", "hess"):
            a, b = opt.state[p][k].float(), eager.state[q][k].float()
            spacing = (a.abs() * (1 + 0.75 * 2**-7)).to(BF16).float() - a.abs()
            assert ((a - b).abs() <= spacing).all(), k  # at most one bf16 step apart
            assert (a != b).float().mean() < 0.05, k


@pytest.mark.parametrize("event", ["torch._dynamo.reset()", "another thread count"])
def test_kernels_recompiled_mid_run_keep_the_bf16_rounding(event):
    """dynamo recompiles a kernel after torch._dynamo.reset() or when a guard fails (the thread
    count is one); the setting the bf16 rounding needs was patched in only around the first
    call, so the recompiled kernels dithered off the bf16 grid (h 0.125 away from the eager
    optimizer's after six steps). It now travels with the compiled function."""
    _needs_compiled_bf16()
    x, y = _data()
    threads = torch.get_num_threads()

    def run(fused):
        model = _mlp()
        opt = ef.BayesAdam(model.parameters(), n_data=64, state_dtype=BF16, fused=fused,
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
        try:
            for t in range(8):
                if t == 4 and event == "torch._dynamo.reset()":
                    torch._dynamo.reset()
                elif t == 4:
                    torch.set_num_threads(threads % 2 + 1)  # (1 ↔ 2: another value than now)
                _step(model, opt, x, y)
        finally:
            torch.set_num_threads(threads)
        return opt

    eager, fused = run(False), run(True)
    assert fused.fused
    for p, q in zip(eager.state, fused.state):
        for k in ("exp_avg", "exp_avg_sq", "hess"):  # (as in test_fused_step_equals_the_eager_step)
            a, b = eager.state[p][k].float(), fused.state[q][k].float()
            spacing = (a.abs() * (1 + 0.75 * 2**-7)).to(BF16).float() - a.abs()
            assert ((a - b).abs() <= spacing).all(), k  # at most one bf16 step apart
            assert (a != b).float().mean() < 0.05, k


@pytest.mark.parametrize("state_dtype", [BF16, {"hess": BF16}], ids=["m, v, h", "h only"])
def test_resume_is_bit_identical(state_dtype):
    x, y = _data(n=96)

    def make(seed):
        model = _mlp()
        return model, ef.BayesAdam(model.parameters(), n_data=96, state_dtype=state_dtype,
                                   generator=torch.Generator().manual_seed(seed))  # fmt: skip

    def run(model, opt, start, stop):
        for i in range(start, stop):
            _step(model, opt, x[(i % 3) * 32 : (i % 3 + 1) * 32], y[(i % 3) * 32 : (i % 3 + 1) * 32])

    ref = make(3)
    run(*ref, 0, 9)
    a = make(3)
    run(*a, 0, 4)
    ckpt = round_trip(a[0], a[1])
    b = make(99)
    b[0].load_state_dict(ckpt["model"])
    b[1].load_state_dict(ckpt["opt"])  # (torch casts state to the parameters' dtype: kept bf16)
    st = b[1].state[b[0][0].weight]
    assert st["hess"].dtype == BF16
    assert st["exp_avg"].dtype == (BF16 if state_dtype is BF16 else torch.float32)
    run(*b, 4, 9)
    for p, q in zip(ref[0].parameters(), b[0].parameters()):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "hess"):
            assert torch.equal(ref[1].state[p][k], b[1].state[q][k]), k


def test_bayesian_linear_regression_with_bf16_state():
    """As the float32 test: N·h + δ → diag(XᵀX)/σ² + δ (to bf16's precision) and μ̄ → the exact
    posterior mean, with the curvature and Adam's moments in bf16."""
    g = torch.Generator().manual_seed(0)
    n, d, sigma, delta = 200, 4, 0.5, 50.0
    X = torch.randn(n, d, generator=g)
    y = X @ torch.randn(d, 1, generator=g) + sigma * torch.randn(n, 1, generator=g)
    A = X.double().T @ X.double() / sigma**2 + delta * torch.eye(d, dtype=torch.float64)
    m_exact = torch.linalg.solve(A, X.double().T @ y.double() / sigma**2)
    sd = torch.diagonal(A).rsqrt()
    torch.manual_seed(0)
    model = nn.Linear(d, 1, bias=False)
    opt = ef.BayesAdam(model.named_parameters(), n_data=n, hessian="ggn", prior_precision=delta, lr=0.05,
                       temperature=1.0, state_dtype=BF16,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
    for _ in range(1500):
        opt.train_step(model, X, y, likelihood="regression", sigma_noise=sigma)
        sched.step()
    post = opt.posterior()
    torch.testing.assert_close(post.precision["weight"][0].double(), torch.diagonal(A), rtol=2**-8, atol=0)
    err = (post.mean["weight"][0].double() - m_exact[:, 0]).abs() / sd
    assert err.max() < 0.2, err


def test_bf16_state_lowers_the_peak_memory_of_a_step():
    """What the option is for, counted at the dispatcher on the eager path: 1.5 parameters' worth
    of float32 state less, minus the eager update's float32 temporaries (bounded by its slices of
    2^16 elements: ~0.8 of a 0.5M-weight model's 1.5, ~0.3 of a 2M-weight one's)."""
    from effortless.experiments.memory import measure_step

    x, y = torch.randn(8, 2048), torch.randint(0, 4, (8,))
    peaks = {}
    for dtype in (None, BF16):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 4))
        opt = ef.BayesAdam(model.parameters(), n_data=100, state_dtype=dtype, fused=False)
        for _ in range(3):
            _step(model, opt, x, y)
        peaks[dtype] = measure_step(lambda m=model, o=opt: _step(m, o, x, y), model, opt, (x, y))[1]
    n = sum(p.numel() for p in model.parameters())
    saved = (peaks[None] - peaks[BF16]) / (4 * n)
    assert 1.0 < saved <= 1.5, saved


# -- only some of the state in bf16 (state_dtype as a dict) --------------------------------------

HESS_ONLY = {"hess": BF16}


def test_curvature_in_bf16_keeps_temperature_zero_exactly_adam():
    """m and v in float32: without noise the mean's update is torch.optim.Adam's (its fused
    kernel, which the eager path runs), bit for bit, whatever h is kept in."""
    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    adam = torch.optim.Adam(m1.parameters(), lr=1e-2, weight_decay=3.0 / 64, fused=True)
    ba = ef.BayesAdam(m2.parameters(), n_data=64, lr=1e-2, prior_precision=3.0, temperature=0.0,
                      state_dtype=HESS_ONLY, fused=False)  # fmt: skip
    for _ in range(10):
        adam.zero_grad()
        F.cross_entropy(m1(x), y).backward()
        adam.step()
        _step(m2, ba, x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_curvature_in_bf16_fused_step_equals_the_eager_step():
    _needs_compiled_bf16()
    x, y = _data()
    model = _mlp()
    opt = ef.BayesAdam(model.parameters(), n_data=64, state_dtype=HESS_ONLY, fused=True,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    for _ in range(4):
        _step(model, opt, x, y)
    twin = copy.deepcopy(model)
    eager = ef.BayesAdam(twin.parameters(), n_data=64, state_dtype=HESS_ONLY, fused=False)
    eager.load_state_dict(copy.deepcopy(opt.state_dict()))
    st = eager.state[twin[0].weight]
    assert (st["hess"].dtype, st["exp_avg"].dtype) == (BF16, torch.float32)
    _step(model, opt, x, y)
    _step(twin, eager, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][k], eager.state[q][k], rtol=1e-5, atol=1e-9)
        a, b = opt.state[p]["hess"].float(), eager.state[q]["hess"].float()
        spacing = (a.abs() * (1 + 0.75 * 2**-7)).to(BF16).float() - a.abs()
        assert ((a - b).abs() <= spacing).all()  # at most one bf16 step apart
        assert (a != b).float().mean() < 0.05


@pytest.mark.parametrize("state_dtype,match", [
    ({"hessian": BF16}, "unknown keys"),
    ({"hess": torch.float16}, "dtypes must be"),
    ({"exp_avg": "bfloat16"}, "dtypes must be"),
])  # fmt: skip
def test_bad_state_dtype_dicts_are_refused_by_name(state_dtype, match):
    with pytest.raises(ValueError, match=match):
        ef.BayesAdam(_mlp().parameters(), n_data=8, state_dtype=state_dtype)
    with pytest.raises(ValueError, match="float32 parameters"):
        ef.BayesAdam(_mlp().double().parameters(), n_data=8, state_dtype=HESS_ONLY)


def test_the_compile_check_sees_a_dropped_bf16_round_trip(monkeypatch):
    """Compiled without ``emulate_precision_casts`` inductor drops the round trip through bf16
    (as torch 2.6 does even with it): the check must say so, and pass under the real settings."""
    _needs_compiled_bf16()
    real = _fused._compile_settings

    @contextlib.contextmanager
    def without_the_casts(lowp):
        with real(False):
            yield

    monkeypatch.setattr(_fused, "_compile_settings", without_the_casts)
    monkeypatch.setattr(_fused, "LOWP_OPTIONS", {})
    _fused.lowp_state_supported.cache_clear()
    try:
        assert not _fused.lowp_state_supported()
    finally:
        monkeypatch.undo()
        _fused.lowp_state_supported.cache_clear()
    assert _fused.lowp_state_supported()  # (compiled again under the real settings)


def test_bf16_state_runs_uncompiled_where_compiled_code_would_round_it_wrong(monkeypatch):
    """Where the check fails, the default falls back to the eager update with a warning (the same
    step as the eager optimizer's), and ``fused=True`` is refused."""
    monkeypatch.setattr(_fused, "lowp_state_supported", lambda device_type="cpu": False)
    x, y = _data()
    model = _mlp()
    with pytest.raises(ValueError, match="fused=True with bf16 state: this torch's compiled code drops"):
        ef.BayesAdam(model.parameters(), n_data=64, state_dtype=BF16, fused=True)
    monkeypatch.setattr(ef.optim.bayesadam, "FUSED_MIN_NUMEL", 1)  # (the default picks the fused path)
    twin = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match="runs uncompiled"):
        opt = ef.BayesAdam(model.parameters(), n_data=64, state_dtype=BF16,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
    eager = ef.BayesAdam(twin.parameters(), n_data=64, state_dtype=BF16, fused=False,
                         generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert opt.fused is False
    for _ in range(3):
        _step(model, opt, x, y)
        _step(twin, eager, x, y)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["hess"], eager.state[q]["hess"])
    # where the parameters are float32 state, or the model is small, nothing is compiled: no check
    monkeypatch.setattr(_fused, "lowp_state_supported", lambda device_type="cpu": pytest.fail("checked"))
    ef.BayesAdam(model.parameters(), n_data=64)
    ef.BayesAdam(model.parameters(), n_data=64, state_dtype=BF16, fused=False)
