"""ef.curvature.accumulate: the curvature of a loader's data, batch by batch (one process)."""

import pytest
import torch
from torch import nn

import effortless as ef


def _setup(n=50):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    batches = [(x[:7], y[:7]), (x[7:30], y[7:30]), (x[30:], y[30:])]  # uneven batches
    return model, x, y, batches


@pytest.mark.parametrize("hessian", ["ggn", "efisher", "hessian"])
def test_diagonal_sums_over_uneven_batches_equal_the_whole_batch(hessian):
    model, x, y, batches = _setup()
    got = ef.curvature.accumulate(model, batches, hessian=hessian)
    ref = {"ggn": ef.curvature.diag_ggn, "efisher": ef.curvature.diag_efisher,
           "hessian": ef.curvature.diag_hessian}[hessian](model, x, y)  # fmt: skip
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-12)


def test_kronecker_factors_over_uneven_batches_equal_the_whole_batch():
    """A is a mean over data points (weighted by batch size), G a sum."""
    model, x, y, batches = _setup()
    got = ef.curvature.accumulate(model, batches, hessian="kfac")
    ref = ef.curvature.kfac(model, x, y)
    assert got.keys() == ref.keys()
    for k, (A, G) in ref.items():
        torch.testing.assert_close(got[k][0], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[k][1], G, rtol=1e-10, atol=1e-12)


def test_parameter_subset_and_regression():
    model, x, _, _ = _setup()
    t = torch.randn(len(x), 3, dtype=torch.float64)
    got = ef.curvature.accumulate(model, [(x[:20], t[:20]), (x[20:], t[20:])], hessian="ggn",
                                  likelihood="regression", sigma_noise=0.5, params=["2.weight"])  # fmt: skip
    ref = ef.curvature.diag_ggn(model, x, t, likelihood="regression", sigma_noise=0.5, params=["2.weight"])
    assert list(got) == ["2.weight"]
    torch.testing.assert_close(got["2.weight"], ref["2.weight"], rtol=1e-10, atol=1e-12)


def test_bad_key_and_empty_loader_are_refused():
    model, *_ = _setup()
    with pytest.raises(ValueError, match="hessian must be one of"):
        ef.curvature.accumulate(model, [], hessian="fisher")
    for key in ("ggn", "kfac"):
        with pytest.raises(ValueError, match="no batches"):
            ef.curvature.accumulate(model, [], hessian=key)
