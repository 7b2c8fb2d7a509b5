"""Curvature of a ``torch.compile``d model equals that of the same model run eagerly.

A compiled forward is one opaque autograd node: the hook engine found no layer outputs in the
graph and returned wrong values for every layer but the last (no error), the ``torch.func`` path
failed on double backward, and a hook registered after compilation never ran. Every entry point
now runs compiled parts eagerly.
"""

import pytest
import torch
from torch import nn

import effortless as ef
from effortless import curvature
from effortless.curvature import exact, operators

PREFIX = "_orig_mod."


def _fresh_dynamo():
    """Forget earlier compilations: past torch._dynamo's recompile limit for a code object (all
    nn.Sequential forwards share one) a compiled module silently runs eagerly, and these tests
    could no longer fail."""
    torch._dynamo.reset()


def _twins(layernorm=False):
    _fresh_dynamo()
    torch.manual_seed(0)
    mid = nn.LayerNorm(16) if layernorm else nn.ReLU()
    eager = nn.Sequential(nn.Linear(6, 16), mid, nn.Linear(16, 3))
    compiled = torch.compile(eager)  # the same parameters behind a compiled forward
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    compiled(x)  # compile now, as a training loop would have done before
    return eager, compiled, x, y


@pytest.fixture(scope="module")
def mlp():
    return _twins()


@pytest.fixture(scope="module")
def layernorm():
    return _twins(layernorm=True)


def _gen():
    return torch.Generator().manual_seed(3)


ESTIMATES = {
    "ggn": lambda m, x, y: curvature.diag_ggn(m, x, y),
    "ggn-mc": lambda m, x, y: curvature.diag_ggn(m, x, y, method="mc", generator=_gen()),
    "efisher": lambda m, x, y: curvature.diag_efisher(m, x, y),
    "hessian": lambda m, x, y: curvature.diag_hessian(m, x, y),
    "hutchinson": lambda m, x, y: curvature.diag_hutchinson(m, x, y, generator=_gen()),
    "exact-ggn": lambda m, x, y: exact.diag(m, x, y, "ggn"),
    "hvp": lambda m, x, y: curvature.hvp(m, x, y, {n: torch.ones_like(p) for n, p in m.named_parameters()}),
    "gvp": lambda m, x, y: operators.gvp(m, x, y, {n: torch.ones_like(p) for n, p in m.named_parameters()}),
}


def _same(got, ref):
    assert list(got) == [PREFIX + k for k in ref]
    for k, v in ref.items():
        torch.testing.assert_close(got[PREFIX + k], v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("key", list(ESTIMATES))
@pytest.mark.parametrize("arch", ["mlp", "layernorm"])  # hook engine; torch.func path
def test_curvature_of_a_compiled_model_equals_the_eager_one(key, arch, request):
    eager, compiled, x, y = request.getfixturevalue(arch)
    _same(ESTIMATES[key](compiled, x, y), ESTIMATES[key](eager, x, y))


def test_kfac_factors_of_a_compiled_model(mlp):
    eager, compiled, x, y = mlp
    ref, got = curvature.kfac(eager, x, y), curvature.kfac(compiled, x, y)
    for k, (A, G) in ref.items():
        torch.testing.assert_close(got[PREFIX + k][0], A)
        torch.testing.assert_close(got[PREFIX + k][1], G)


def test_compiled_submodule_inside_an_eager_model():
    _fresh_dynamo()
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
    head = nn.Linear(16, 3)
    eager = nn.Sequential(inner, head)
    mixed = nn.Sequential(torch.compile(inner), head)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    mixed(x)
    ref, got = curvature.diag_ggn(eager, x, y), curvature.diag_ggn(mixed, x, y)
    for (k, v), (k2, v2) in zip(ref.items(), got.items()):
        assert k2.replace(PREFIX, "") == k
        torch.testing.assert_close(v2, v)


def test_last_layer_kfac_predictive_of_a_compiled_model(mlp):
    eager, compiled, x, y = mlp
    a = ef.laplace(eager, [(x, y)], hessian="kfac", subset="last_layer")
    b = ef.laplace(compiled, [(x, y)], hessian="kfac", subset="last_layer")
    for u, v in zip(a.predictive_moments(eager, x), b.predictive_moments(compiled, x)):
        torch.testing.assert_close(v, u)


@pytest.mark.parametrize("hessian", ["ggn", "efisher"])
def test_bayesadam_train_step_on_a_compiled_model(hessian):
    """Same curvature and means as the eager twin after a few steps, with a warning that the
    forward ran eagerly."""
    states = []
    _fresh_dynamo()
    for compile_it in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        model = torch.compile(model) if compile_it else model
        x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
        opt = ef.BayesAdam(model.parameters(), n_data=24, hessian=hessian, generator=_gen())
        if compile_it:
            with pytest.warns(RuntimeWarning, match="eagerly"):
                opt.train_step(model, x, y)
        else:
            opt.train_step(model, x, y)
        opt.train_step(model, x, y)
        states.append([(p.detach().clone(), opt.state[p]["hess"].clone()) for p in model.parameters()])
    for (p0, h0), (p1, h1) in zip(*states):
        torch.testing.assert_close(h1, h0)
        torch.testing.assert_close(p1, p0)
