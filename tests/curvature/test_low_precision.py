"""bf16 products in the hook engine: every entry close to the float64 reference, the gradient exact."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import effortless as ef
from effortless import curvature, likelihoods
from effortless.curvature import engine, exact, functional
from tests.conftest import make_batch, make_model

BF16 = torch.bfloat16
# three bf16 roundings of non-negative terms (two operands, the result): below 3 · 2⁻⁸ ≈ 1.2 %
RTOL = 1.5e-2


@pytest.fixture(autouse=True)
def _every_product_in_bf16(monkeypatch):
    """These networks are tiny: let every product, however small, take the low-precision path."""
    monkeypatch.setattr(engine, "LOWP_MIN_MACS", 0)


def _float32(arch, lik):
    model = make_model(arch).float()
    x, y = make_batch(arch, lik, n=16)
    return model, x.float(), (y.float() if y.is_floating_point() else y)


def _assert_entrywise_close(got, ref):
    assert list(got) == list(ref)
    for k in ref:
        err = (got[k].double() - ref[k]).abs()
        bound = RTOL * ref[k].abs() + 1e-6 * float(ref[k].abs().max())  # (float32 round-off at 0)
        worst = float((err / ref[k].abs()).max())
        assert bool((err <= bound).all()), f"{k}: worst relative error {worst:.3g}"


@pytest.mark.parametrize("arch", ["mlp", "cnn", "residual", "conv1d", "sequence", "batchnorm", "convvariants",
                                  "decoder", "groupnorm", "instancenorm"])  # fmt: skip
@pytest.mark.parametrize("lik", ["classification", "regression"])
@pytest.mark.parametrize("kind", ["ggn", "efisher"])
def test_bf16_products_stay_within_three_roundings_of_the_reference(arch, lik, kind):
    model, x, y = _float32(arch, lik)
    fn = curvature.diag_ggn if kind == "ggn" else curvature.diag_efisher
    got = fn(model, x, y, lik, backend="hooks", product_dtype=BF16)
    ref = exact.diag(model.double(), x.double(), y.double() if y.is_floating_point() else y, kind, lik)
    _assert_entrywise_close(got, ref)
    if arch != "batchnorm":  # the option is used: some entry differs from the float32 products
        model.float()
        exact32 = fn(model, x, y, lik, backend="hooks")
        assert any(not torch.equal(got[k], exact32[k]) for k in got)


def test_mc_ggn_with_bf16_products_uses_the_same_labels():
    model, x, y = _float32("mlp", "classification")
    a = curvature.diag_ggn(model, x, y, method="mc", generator=torch.Generator().manual_seed(3))
    b = curvature.diag_ggn(model, x, y, method="mc", generator=torch.Generator().manual_seed(3),
                           product_dtype=BF16)  # fmt: skip
    _assert_entrywise_close(b, {k: v.double() for k, v in a.items()})


def test_bf16_kronecker_factors_are_close_in_norm():
    model, x, y = _float32("cnn", "classification")
    ref = curvature.kfac(model.double(), x.double(), y)
    got = curvature.kfac(model.float(), x, y, product_dtype=BF16)
    for k, (A, G) in ref.items():
        for approx, exact_ in zip(got[k], (A, G)):
            assert approx.dtype == torch.float32
            rel = float(torch.linalg.matrix_norm(approx.double() - exact_) / torch.linalg.matrix_norm(exact_))
            assert 0 < rel < 1e-2, (k, rel)  # 0 would mean the products did not run in bf16


def test_training_pass_gradient_is_untouched_by_the_product_dtype():
    model, x, y = _float32("mlp", "classification")
    plan, lik = engine.plan(model), likelihoods.get("classification")
    out = {}
    for dt in (None, BF16):
        model.zero_grad(set_to_none=True)
        loss, sums = functional.training_pass(model, x, y, lik, plan, "efisher", product_dtype=dt)
        out[dt] = (loss.detach(), [p.grad.clone() for p in model.parameters()], sums)
    assert torch.equal(out[None][0], out[BF16][0])
    assert all(torch.equal(a, b) for a, b in zip(out[None][1], out[BF16][1]))
    _assert_entrywise_close(out[BF16][2], {k: v.double() for k, v in out[None][2].items()})


@pytest.mark.parametrize("hessian", ["ggn", "efisher", "ggn-mc"])
def test_bayesadam_with_bf16_products(hessian):
    """Same means after a step (the update reads the gradient, not the curvature); curvature close."""
    model, x, y = _float32("mlp", "classification")
    runs = []
    for dt in (None, BF16):
        m = make_model("mlp").float()
        m.load_state_dict(model.state_dict())
        opt = ef.BayesAdam(m.parameters(), n_data=16, hessian=hessian, hess_beta=0.0, fused=False,
                           generator=torch.Generator().manual_seed(0), product_dtype=dt)  # fmt: skip
        opt.train_step(m, x, y)
        runs.append((m, opt))
    (m0, o0), (m1, o1) = runs
    for p0, p1 in zip(m0.parameters(), m1.parameters()):
        assert torch.equal(p0, p1)
        h0, h1 = o0.state[p0]["hess"].double(), o1.state[p1]["hess"].double()
        assert bool(((h1 - h0).abs() <= RTOL * h0.abs() + 1e-9).all())
    assert F.cross_entropy(m1(x), y).isfinite()


def test_product_dtype_is_validated():
    model, x, y = _float32("mlp", "classification")
    for bad in ("bf16", torch.int32):
        with pytest.raises(ValueError, match="product_dtype"):
            curvature.diag_ggn(model, x, y, product_dtype=bad)
        with pytest.raises(ValueError, match="product_dtype"):
            ef.BayesAdam(model.parameters(), n_data=16, product_dtype=bad)


def test_bf16_on_a_cpu_without_bf16_units_warns_once(monkeypatch):
    model, x, y = _float32("mlp", "classification")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    functional._warn_without_bf16_units.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="emulated"):
            curvature.diag_efisher(model, x, y, product_dtype=BF16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            curvature.diag_efisher(model, x, y, product_dtype=BF16)  # once per process
            curvature.diag_efisher(model, x, y)
    finally:
        functional._warn_without_bf16_units.cache_clear()


def test_products_below_the_size_threshold_stay_exact(monkeypatch):
    model, x, y = _float32("cnn", "classification")
    monkeypatch.setattr(engine, "LOWP_MIN_MACS", 10**9)
    for fn in (curvature.diag_ggn, curvature.diag_efisher):
        a, b = fn(model, x, y, product_dtype=BF16), fn(model, x, y)
        assert all(torch.equal(a[k], b[k]) for k in a)
    ka, kb = curvature.kfac(model, x, y, product_dtype=BF16), curvature.kfac(model, x, y)
    assert all(torch.equal(u, v) for k in ka for u, v in zip(ka[k], kb[k]))


@pytest.mark.parametrize("hessian", ["ggn", "efisher", "ggn-mc"])
def test_laplace_with_bf16_products_is_close_to_the_float64_fit(hessian):
    """ef.laplace(product_dtype=...) and curvature.accumulate pass the option through: the summed
    curvature over two batches within the three-rounding bound of the float64 fit (MC-GGN: of
    the float32 fit, whose label draws are the same; float64 probabilities can flip a draw at an
    inverse-CDF boundary), and not the float32 fit itself."""
    model, x, y = _float32("mlp", "classification")
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    delta = 0.5

    def fit(m, xs, **kw):
        batches = [(a, b) for a, (_, b) in zip(xs, loader)]
        gen = torch.Generator().manual_seed(5)
        return ef.laplace(m, batches, hessian=hessian, prior_precision=delta, generator=gen, **kw)

    ref = fit(model.double(), [a.double() for a, _ in loader])
    model.float()
    got = fit(model, [a for a, _ in loader], product_dtype=BF16)
    f32 = fit(model, [a for a, _ in loader])
    if hessian == "ggn-mc":
        ref = f32
    _assert_entrywise_close({n: p - delta for n, p in got.precision.items()},
                            {n: p.double() - delta for n, p in ref.precision.items()})  # fmt: skip
    assert any(not torch.equal(got.precision[n], f32.precision[n]) for n in got.precision)
    acc = curvature.accumulate(model, loader, hessian=hessian, product_dtype=BF16,
                               generator=torch.Generator().manual_seed(5))  # fmt: skip
    assert all(torch.equal(acc[n] + delta, got.precision[n]) for n in acc)


def test_laplace_bf16_products_in_the_noise_tuned_regression_fit():
    model, x, y = _float32("mlp", "regression")
    data64 = [(x.double(), y.double())]
    ref = ef.laplace(model.double(), data64, likelihood="regression", sigma_noise="marglik")
    got = ef.laplace(model.float(), [(x, y)], likelihood="regression", sigma_noise="marglik",
                     product_dtype=BF16)  # fmt: skip
    f32 = ef.laplace(model, [(x, y)], likelihood="regression", sigma_noise="marglik")
    assert any(not torch.equal(got.precision[n], f32.precision[n]) for n in got.precision)
    assert got.sigma_noise == pytest.approx(ref.sigma_noise, rel=2e-2)
    for n in ref.precision:  # σ and δ are chosen from the curvature: compare the whole precision
        err = (got.precision[n].double() - ref.precision[n]).abs() / ref.precision[n]
        assert float(err.max()) < 3e-2, n


def test_bf16_kronecker_factors_accumulated_over_a_loader():
    model, x, y = _float32("cnn", "classification")
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    ref = curvature.accumulate(model.double(), [(a.double(), b) for a, b in loader], hessian="kfac")
    got = curvature.accumulate(model.float(), loader, hessian="kfac", product_dtype=BF16)
    for k, (A, G) in ref.items():
        for approx, exact_ in zip(got[k], (A, G)):
            rel = float(torch.linalg.matrix_norm(approx.double() - exact_) / torch.linalg.matrix_norm(exact_))
            assert 0 < rel < 1e-2, (k, rel)


def test_laplace_refuses_product_dtype_where_it_has_no_products():
    model, x, y = _float32("mlp", "classification")
    for hessian in ("hutchinson", "hessian", "kfac"):
        with pytest.raises(ValueError, match="product_dtype"):
            ef.laplace(model, [(x, y)], hessian=hessian, product_dtype=BF16)
    with pytest.raises(ValueError, match="product_dtype"):
        ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer", product_dtype=BF16)
    with pytest.raises(ValueError, match="product_dtype"):
        curvature.accumulate(model, [(x, y)], hessian="ggn", product_dtype="bf16")
