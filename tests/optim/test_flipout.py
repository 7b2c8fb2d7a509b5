"""Flipout noise for per-rank samples under DDP (``distributed="flipout"``), without a process group:
the sign draws, the marginals of the ranks' samples, the unbiasedness of the curvature estimate
ḡ ⊙ Σ_r ε_r / σ built from rank-one sign matrices, on a quadratic whose Hessian is known, and the
optimizer's draw (fused and eager) with its rank simulated."""

import copy
import math
import warnings

import pytest
import torch

import effortless as ef
from effortless.optim.bayesadam import flipout_factors, random_signs


def _gen_for(seed, q):
    return torch.Generator().manual_seed(seed * 7919 + q)


def test_random_signs_are_balanced_independent_and_reproducible():
    n = 200_003  # not a multiple of 8 or 64
    s = random_signs(n, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert s.shape == (n,) and set(s.unique().tolist()) == {-1.0, 1.0}
    bound = 5 / math.sqrt(n)
    assert abs(float(s.mean())) < bound
    for lag in (1, 7, 8, 63, 64):  # bits within a byte, across bytes and across words
        assert abs(float((s[lag:] * s[:-lag]).mean())) < bound, lag
    assert torch.equal(s, random_signs(n, torch.Generator().manual_seed(0), dtype=torch.float64))
    assert not torch.equal(s, random_signs(n, torch.Generator().manual_seed(1), dtype=torch.float64))


def test_every_rank_draws_the_same_sign_factors():
    f = [flipout_factors(5, 3, 1000, _gen_for, dtype=torch.float64) for _ in range(2)]
    assert f[0].shape == (3, 1000) and torch.equal(f[0], f[1])
    assert not torch.equal(f[0][0], f[0][1])  # the ranks' rows differ
    assert torch.equal(f[0][1], random_signs(1000, _gen_for(5, 1), dtype=torch.float64))


@pytest.mark.parametrize("world", [2, 3])
def test_flipout_curvature_estimate_is_unbiased_and_gradient_variance_matches_independent(world):
    """K independent copies of a 12-d quadratic ½θᵀAθ − bᵀθ (A dense) in one draw, θ seen as a 3 × 4
    matrix. Each "rank" takes the gradient at μ + σ ⊙ ζ ⊙ a_r b_rᵀ; DDP averages them. Checks:
    ε_r ~ N(0, 1) marginally and uncorrelated across ranks; E[ḡ ⊙ Σ_r ε_r / σ] = diag(A);
    Cov(ḡ) = A diag(σ²) A / R, what independent per-rank draws give (a shared sample: R× that)."""
    rows, cols = 3, 4  # one 3 × 4 weight matrix with rank-one sign matrices a_r b_rᵀ per rank
    d, K = rows * cols, 20_000
    g = torch.Generator().manual_seed(0)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = m @ m.T + d * torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    sigma = torch.rand(d, generator=g, dtype=torch.float64) * 0.5 + 0.1
    zeta = torch.randn(K, d, generator=g, dtype=torch.float64)
    f = flipout_factors(11, world, K * (rows + cols), _gen_for, dtype=torch.float64).view(world, K, -1)
    s = [(f[r, :, :rows, None] * f[r, :, None, rows:]).reshape(K, d) for r in range(world)]  # a_r b_rᵀ
    eps = [zeta * s_r for s_r in s]
    total = sum(s)
    grads = [(mu + sigma * e) @ A - b for e in eps]  # A symmetric
    gbar = sum(grads) / world
    est = gbar * zeta * total / sigma

    for e in eps:  # marginals N(0, 1)
        assert abs(float(e.mean())) < 5 / math.sqrt(K * d)
        assert abs(float(e.var()) - 1) < 5 * math.sqrt(2 / (K * d))
    corr = float((eps[0] * eps[1]).mean())
    assert abs(corr) < 5 / math.sqrt(K * d)  # uncorrelated across ranks

    se = est.std(0) / math.sqrt(K)
    assert torch.all((est.mean(0) - A.diagonal()).abs() < 5 * se), (est.mean(0), A.diagonal())

    cov = torch.cov(gbar.T)
    expected = A @ torch.diag(sigma**2) @ A / world
    rel = float(torch.linalg.norm(cov - expected) / torch.linalg.norm(expected))
    assert rel < 0.05, rel
    shared = A @ torch.diag(sigma**2) @ A  # what one shared sample would give: R× larger
    assert float(torch.linalg.norm(cov - shared) / torch.linalg.norm(shared)) > 0.3


def _as_rank(opt, monkeypatch, rank, world=2):
    """Make ``opt`` behave as rank ``rank`` of a Flipout run of ``world`` processes (no process group:
    the shared generator is the optimizer's own, as after rank 0's broadcast)."""
    monkeypatch.setattr(opt, "_world", lambda: ("flipout", world, rank))
    opt._synced = True


@pytest.mark.parametrize("fused", [False, True])
def test_flipout_draw_gives_each_rank_its_sample_and_every_rank_their_sum(monkeypatch, fused):
    """Two simulated ranks draw from the same generator state: ζ = |ε_r| is shared, ε_r / ζ is a
    rank-one ±1 matrix per tensor (a conv kernel seen as out × in·k), the two ranks' samples differ,
    and each rank's Σ_q ε_q (used by the reparam estimate) is the sum of the ranks' actual
    (θ_q − μ)/σ. The fused kernel and the eager path give the same samples."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 5, 3), torch.nn.Flatten(), torch.nn.Linear(5 * 6, 4))
    model.double()
    eps, summed, thetas = [], [], []
    for rank in range(2):
        opt = ef.BayesAdam(model.parameters(), n_data=100, hess_init=0.3, fused=fused,
                           generator=torch.Generator().manual_seed(3))  # fmt: skip
        _as_rank(opt, monkeypatch, rank)
        with torch.no_grad():
            for st_p in model.parameters():  # a spread of σ
                opt._state(opt.param_groups[0], st_p)["hess"].uniform_(0.1, 2.0)
        with opt.sampled_params(train=True):
            thetas.append([p.detach().clone() for p in model.parameters()])
        assert opt._phase == 1
        g = opt.param_groups[0]
        n, d, t = g["n_data"], g["prior_precision"], g["temperature"]
        inv_sigma = [torch.sqrt((opt.state[p]["hess"] * n + d) / t) for p in model.parameters()]
        eps.append([(t - p) * s for t, p, s in zip(thetas[-1], model.parameters(), inv_sigma)])
        summed.append([opt._flipout_noise_sum()[p] for p in model.parameters()])
        zeta = [opt.state[p]["noise"] for p in model.parameters()]
    for j, (e0, e1) in enumerate(zip(eps[0], eps[1])):
        torch.testing.assert_close(e0.abs(), zeta[j].abs(), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(e1.abs(), zeta[j].abs(), rtol=1e-9, atol=1e-9)
        assert not torch.allclose(e0, e1)
        for r in range(2):
            torch.testing.assert_close(summed[r][j], e0 + e1, rtol=1e-9, atol=1e-9)
            signs = (eps[r][j] / zeta[j]).reshape(e0.shape[0], -1).round()
            assert set(signs.unique().tolist()) <= {-1.0, 1.0}
            assert torch.linalg.matrix_rank(signs) == 1


@pytest.mark.parametrize("mc, depth", [(1, 1), (2, 1), (1, 5)])
def test_flipout_fused_kernels_equal_the_eager_path(monkeypatch, mc, depth):
    """Compiled Flipout sampling and update (Σ_r ε_r formed inside the kernel) against the eager
    path that materialises Σ_r ε_r: the same samples, sums, means and curvature over 4 steps,
    with one sample per step (fused update) and two (the sums go through the accumulator); depth
    5 has 12 parameter tensors, which the kernels take in two chunks (chunking from 4 on)."""
    from effortless.optim import _fused

    monkeypatch.setattr(_fused, "CHUNK_ABOVE", 4)
    torch.manual_seed(0)
    hidden = [m for i in range(depth) for m in (torch.nn.Linear(6 if i == 0 else 7, 7), torch.nn.Tanh())]
    model = torch.nn.Sequential(*hidden, torch.nn.Linear(7, 3))
    start, out = {k: v.clone() for k, v in model.state_dict().items()}, {}
    for fused in (False, True):
        model.load_state_dict(start)
        gen = torch.Generator().manual_seed(1)
        opt = ef.BayesAdam(model.parameters(), n_data=50, fused=fused, generator=gen, mc_samples=mc)
        _as_rank(opt, monkeypatch, 1, world=3)
        draws = []
        for _ in range(4):  # fresh draws and their antithetic mirrors
            opt.zero_grad()
            for _ in range(mc):
                with opt.sampled_params(train=True):
                    model(torch.randn(4, 6, generator=torch.Generator().manual_seed(2))).sum().backward()
                    draws.append([p.detach().clone() for p in model.parameters()])
                    draws.append(list(opt._flipout_noise_sum().values()))
            opt.step()
        draws.append([opt.state[p]["hess"].clone() for p in model.parameters()])
        draws.append([p.detach().clone() for p in model.parameters()])
        assert opt.fused == fused  # the compiled kernel ran (a compilation failure turns it off)
        out[fused] = draws
    for a, b in zip(out[False], out[True]):
        assert len(a) == len(b) == 2 * (depth + 1)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_flipout_workspace_follows_a_state_reload_in_the_same_optimizer(monkeypatch):
    """The draw reuses views of μ, h and ζ across steps; loading a checkpoint into the same
    optimizer (new state tensors) or replacing a parameter's data must not leave it drawing from
    the old tensors: the replayed steps equal the first run's bitwise."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    opt = ef.BayesAdam(model.parameters(), n_data=30, generator=torch.Generator().manual_seed(4))
    _as_rank(opt, monkeypatch, 1)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(5))

    def run(steps):
        seen = []
        for _ in range(steps):
            opt.zero_grad()
            with opt.sampled_params(train=True):
                model(x).square().mean().backward()
                seen.append([p.detach().clone() for p in model.parameters()])
            opt.step()
        return seen

    run(3)  # mid-pair: the next draw is an antithetic mirror
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = copy.deepcopy(opt.state_dict())
    first = run(3)
    model[0].weight.data = model[0].weight.data.clone()  # new storage for one parameter
    model.load_state_dict(weights)
    opt.load_state_dict(ckpt)
    again = run(3)
    for a, b in zip(first, again):
        for u, v in zip(a, b):
            assert torch.equal(u, v)


@pytest.mark.parametrize("failing", ["flipout_sample", "reparam_step_flipout", "two groups"])
def test_flipout_falls_back_to_the_eager_path(monkeypatch, failing):
    """A compilation failure of either Flipout kernel (or a model the kernels do not take: two
    parameter groups) runs the eager path, which materialises Σ_r ε_r: same means and curvature
    as a run with fused=False."""
    from effortless.optim import _fused

    real = _fused.kernel

    def kernel(name):
        if name != failing:
            return real(name)

        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(_fused, "kernel", kernel)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    start, out = {k: v.clone() for k, v in model.state_dict().items()}, {}
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    for fused in (False, True):
        model.load_state_dict(start)
        params = list(model.parameters())
        groups = [{"params": params[:2]}, {"params": params[2:]}] if failing == "two groups" else params
        opt = ef.BayesAdam(groups, n_data=20, fused=fused, generator=torch.Generator().manual_seed(1))
        _as_rank(opt, monkeypatch, 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.zero_grad()
                with opt.sampled_params(train=True):
                    model(x).square().sum().backward()
                opt.step()
        failed = sum("torch.compile failed" in str(w.message) for w in caught)
        assert failed == (fused and failing != "two groups")
        out[fused] = [t.clone() for p in params for t in (p.detach(), opt.state[p]["hess"])]
    for a, b in zip(out[False], out[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
