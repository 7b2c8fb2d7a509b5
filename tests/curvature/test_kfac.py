"""Kronecker factors against the dense GGN where KFAC is exact (one sample, one position)."""

import pytest
import torch
from torch import nn

from effortless import curvature
from effortless.curvature import exact


def _block(model, x, y, lik, prefix):
    """The dense GGN block of ``prefix.weight`` and ``prefix.bias``, in KFAC order (o, [i..., 1])."""
    G = exact.ggn(model, x, y, lik)
    _, names, shapes = exact.flatten(model)
    offsets, pos = {}, 0
    for n, s in zip(names, shapes):
        offsets[n] = pos
        pos += s.numel()
    w = dict(zip(names, shapes))[f"{prefix}.weight"]
    out, fan_in = w[0], w[1:].numel()
    idx = []
    for o in range(out):
        idx += [offsets[f"{prefix}.weight"] + o * fan_in + i for i in range(fan_in)]
        idx.append(offsets[f"{prefix}.bias"] + o)
    idx = torch.tensor(idx)
    return G[idx][:, idx]


@pytest.mark.parametrize("lik", ["classification", "regression"])
def test_linear_kfac_is_exact_for_one_sample(lik):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1]) if lik == "classification" else torch.randn(1, 3, dtype=torch.float64)
    factors = curvature.kfac(model, x, y, lik)
    assert set(factors) == {"0", "2"}
    for name in ("0", "2"):
        A, G = factors[name]
        torch.testing.assert_close(torch.kron(G, A), _block(model, x, y, lik, name), atol=1e-12, rtol=1e-10)


def test_conv_kfac_is_exact_for_one_sample_and_one_position():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)  # 3×3 input -> one output position
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(x.view(-1, 1, 3, 3))).flatten(1))

    model = Net().double()
    x = torch.randn(1, 9, dtype=torch.float64)
    y = torch.tensor([2])
    A, G = curvature.kfac(model, x, y)["conv"]
    torch.testing.assert_close(torch.kron(G, A), _block(model, x, y, "classification", "conv"), atol=1e-12,
                               rtol=1e-10)  # fmt: skip


def test_mc_factors_converge_to_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    A, G = curvature.kfac(model, x, y)["2"]
    draws = torch.stack(
        [curvature.kfac(model, x, y, method="mc", generator=torch.Generator().manual_seed(i))["2"][1]
         for i in range(600)]
    )  # fmt: skip
    se = draws.std(0) / 600**0.5 + 1e-12
    assert ((draws.mean(0) - G).abs() <= 5 * se).all()
    A_mc, _ = curvature.kfac(model, x, y, method="mc")["2"]
    torch.testing.assert_close(A_mc, A)  # the input factor does not depend on the labels


def test_kfac_refuses_unsupported_models():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="LayerNorm"):
        curvature.kfac(model, torch.randn(2, 3), torch.tensor([0, 1]))


def test_a_layer_run_twice_is_refused_by_name_with_a_way_out():
    """A shared Linear passes the static plan and is found only in the forward: the engine's own
    exception (engine.Unsupported) reached the user from curvature.kfac and BayesAdam's kfac key."""
    import effortless as ef
    from tests.conftest import make_batch, make_model

    model = make_model("shared")
    x, y = make_batch("shared", "classification", n=8)
    for call in (curvature.kfac, curvature.diag_kfac):
        with pytest.raises(ValueError, match="run once per forward.*module a ran twice.*'ggn'"):
            call(model, x, y)
    opt = ef.BayesAdam(model.parameters(), n_data=8, hessian="kfac")
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="use a diagonal estimator"):
        opt.train_step(model, x, y)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(st["step"] == 0 and not st["exp_avg"].any() for st in opt.state.values())  # (nothing updated)
    ef.BayesAdam(model.parameters(), n_data=8, hessian="ggn").train_step(model, x, y)  # (the way out)


def test_diag_kfac_from_the_factor_diagonals_equals_the_diagonal_of_the_kronecker_product():
    """diag_kfac (and BayesAdam's kfac key) never forms A or G, only their diagonals; on a batch of
    many samples and positions it must equal diag(G ⊗ A) of the full factors (Linear and Conv)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 2)  # 3×3 input -> 4 positions
            self.fc = nn.Linear(12, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(x.view(-1, 1, 3, 3))).flatten(1))

    model = Net().double()
    x = torch.randn(16, 9, dtype=torch.float64)
    y = torch.randint(0, 4, (16,))
    got = curvature.diag_kfac(model, x, y)
    for name, m in (("conv", model.conv), ("fc", model.fc)):
        A, G = curvature.kfac(model, x, y)[name]
        d = torch.diagonal(torch.kron(G, A)).view(G.shape[0], A.shape[0])  # rows: outputs; bias last
        weight = d[:, :-1].reshape(m.weight.shape)
        torch.testing.assert_close(got[f"{name}.weight"], weight, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[f"{name}.bias"], d[:, -1], rtol=1e-12, atol=1e-14)


GRAM_CASES = [(128, 785, 96), (2048, 300, 96), (9, 11, 2), (40, 7, 2), (16, 9, 2)]  # (rows, n, GRAM_BLOCK)


@pytest.mark.parametrize("rows,n,block", GRAM_CASES)
def test_blocked_gram_products_equal_the_dense_product(monkeypatch, rows, n, block):
    """Large Kronecker factors are computed as triangular block rows and mirrored (half the
    multiply-adds); every shape, the blocked path or not, must give aᵀa."""
    from effortless.curvature import engine

    monkeypatch.setattr(engine, "GRAM_BLOCK", block)
    a = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    ref = a.double().T @ a.double()
    got = engine._gram(a)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item() / n)
    low = engine._gram(a, torch.bfloat16)  # bf16 operands, float32 result
    assert low.dtype == torch.float32
    assert ((low.double() - ref).abs().max() / ref.abs().max()) < 0.02


def test_wide_input_factor_equals_the_augmented_input_gram():
    """A (the input factor) of a layer wide enough for the blocked product: [x, 1]ᵀ[x, 1] / B."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(16, 400), torch.randint(0, 2, (16,))
    A, _ = curvature.kfac(model, x, y)["0"]
    xa = torch.cat([x, torch.ones(16, 1)], 1).double()
    torch.testing.assert_close(A.double(), xa.T @ xa / 16, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_conv_kfac_with_a_padding_mode_is_exact_for_one_sample_and_one_position(mode):
    """The patches are the padded input's (2×2 input, padded to 4×4, a 4×4 kernel: one position)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 4, padding=1, padding_mode=mode)
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(x.view(-1, 1, 2, 2))).flatten(1))

    model = Net().double()
    x = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([2])
    A, G = curvature.kfac(model, x, y)["conv"]
    block = _block(model, x, y, "classification", "conv")
    torch.testing.assert_close(torch.kron(G, A), block, atol=1e-12, rtol=1e-10)


def test_grouped_convolutions_have_no_single_pair_of_factors():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(3, 2, 4, 4), torch.randint(0, 3, (3,))
    with pytest.raises(ValueError, match=r"0 \(Conv2d, grouped\)"):
        curvature.kfac(model, x, y)
    diag = curvature.diag_ggn(model, x, y)  # (the diagonal estimators take the hook path)
    assert curvature.plan(model).backend == "hooks" and diag["0.weight"].shape == (4, 1, 3, 3)


@pytest.mark.parametrize("diagonal", [False, True])
def test_factors_over_several_passes_equal_one_pass(diagonal, monkeypatch):
    """Many inputs run in passes sized to the model (as diag_ggn does): A is a mean over samples
    (each pass weighted by its share), G a sum; the result must not depend on the passes."""
    from effortless.curvature import functional

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).double()
    x, y = torch.randn(23, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (23,))
    one = curvature.diag_kfac(model, x, y) if diagonal else curvature.kfac(model, x, y)
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    monkeypatch.setattr(functional, "HOOK_FIRST", 4)
    monkeypatch.setattr(functional, "HOOK_BUDGET", 500)
    many = curvature.diag_kfac(model, x, y) if diagonal else curvature.kfac(model, x, y)
    assert len(calls) > 2 and sum(calls) == 23, calls
    for a, b in zip(torch.utils._pytree.tree_leaves(one), torch.utils._pytree.tree_leaves(many)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
