"""Every curvature function against its dense float64 twin in effortless.curvature.exact."""

import warnings

import pytest
import torch

import effortless as ef
from effortless import curvature
from effortless.curvature import exact, functional, operators
from tests.conftest import ARCHS, make_batch, make_model

LIKS = ["classification", "regression"]


def _assert_dict_close(a, b, atol=1e-10, rtol=1e-8):
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


HOOKABLE = ["mlp", "cnn", "residual", "conv1d", "batchnorm", "sequence", "layernorm", "embedding", "inplace",
            "unused", "convvariants", "groupnorm", "decoder", "instancenorm", "transformer"]  # fmt: skip
# (arch, backend) pairs: every architecture through torch.func, the supported ones through hooks
FUNC_ONLY = ["recurrent", "attention"]  # no hook rules; vmap cannot batch an LSTM (per-sample loop)
PATHS = [(a, "func") for a in dict.fromkeys(ARCHS + HOOKABLE + FUNC_ONLY)] + [(a, "hooks") for a in HOOKABLE]


@pytest.mark.parametrize("arch,backend", sorted(set(PATHS)))
@pytest.mark.parametrize("lik", LIKS)
def test_exact_ggn_matches_dense(arch, backend, lik):
    model = make_model(arch)
    x, y = make_batch(arch, lik)
    ref = exact.diag(model, x, y, "ggn", lik, sigma_noise=0.5)
    got = curvature.diag_ggn(model, x, y, lik, sigma_noise=0.5, chunk_size=4, backend=backend)  # chunked
    _assert_dict_close(got, ref)


@pytest.mark.parametrize("arch,backend", sorted(set(PATHS)))
@pytest.mark.parametrize("lik", LIKS)
def test_efisher_matches_dense(arch, backend, lik):
    model = make_model(arch)
    x, y = make_batch(arch, lik)
    _assert_dict_close(
        curvature.diag_efisher(model, x, y, lik, sigma_noise=0.5, backend=backend),
        exact.diag(model, x, y, "efisher", lik, sigma_noise=0.5),
    )


class _KeywordCall(torch.nn.Module):
    """A layer called as ``fc(input=h)``: its input reaches the hook as a keyword."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.b(input=torch.tanh(self.a(x)))


class _GroupedTransposed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.o = torch.nn.ConvTranspose2d(2, 4, 2, groups=2), torch.nn.Linear(36, 3)

    def forward(self, x):
        return self.o(torch.tanh(self.c(x.view(-1, 2, 2, 2))).flatten(1))


@pytest.mark.parametrize(
    "make,inputs,backend",
    [
        (_KeywordCall, lambda: torch.randn(5, 4, dtype=torch.float64), "hooks"),
        # sparse=True only picks the gradient's layout: the curvature takes dense gradients
        (lambda: _Tokens(sparse=True), lambda: torch.randint(0, 10, (5, 5)), "hooks"),  # (_Tokens: below)
        (_GroupedTransposed, lambda: torch.randn(5, 8, dtype=torch.float64), "func"),
    ],
    ids=["keyword-input", "sparse-embedding", "grouped-conv-transpose"],
)
def test_layers_off_the_common_path_get_the_dense_curvature(make, inputs, backend):
    torch.manual_seed(0)
    model, x = make().double(), inputs()
    y = torch.randint(0, 3, (5,))
    assert curvature.plan(model).backend == backend
    for kind, fn in (("ggn", curvature.diag_ggn), ("efisher", curvature.diag_efisher)):
        _assert_dict_close(fn(model, x, y), exact.diag(model, x, y, kind))
    sparse = [m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert sparse in ([], [True])  # (the flag is back)


def test_why_a_layer_leaves_the_hook_engine_is_named():
    assert "ConvTranspose2d with groups=2" in str(curvature.plan(_GroupedTransposed()))
    assert "Embedding with max_norm" in str(curvature.plan(_Tokens(max_norm=1.0)))
    nn = torch.nn
    grouped = nn.Sequential(nn.Conv2d(2, 4, 2, groups=2), nn.Flatten(1), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="grouped"):
        curvature.kfac(grouped, torch.randn(3, 2, 2, 2), torch.tensor([0, 1, 2]))


def test_auto_picks_the_hook_engine_only_where_it_applies():
    for arch in HOOKABLE:
        assert curvature.plan(make_model(arch)).backend == "hooks", arch
    odd = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GRUCell(4, 4))
    assert curvature.plan(odd).backend == "func" and "GRUCell" in str(curvature.plan(odd))
    bn = make_model("batchnorm").train()
    assert "training mode" in str(curvature.plan(bn))
    # weight sharing is only visible at run time: backend="hooks" refuses, "auto" falls back
    x, y = make_batch("shared", "classification")
    with pytest.raises(ValueError, match="twice"):
        curvature.diag_ggn(make_model("shared"), x, y, backend="hooks")
    with pytest.raises(ValueError, match="backend"):
        curvature.diag_ggn(make_model("mlp"), x, y, backend="fast")


@pytest.mark.parametrize("arch", ARCHS + ["batchnorm", "sequence", "attention", "unused"])
@pytest.mark.parametrize("lik", LIKS)
def test_hessian_diagonal_matches_dense(arch, lik):
    model = make_model(arch)
    x, y = make_batch(arch, lik)
    _assert_dict_close(
        curvature.diag_hessian(model, x, y, lik, chunk_size=7),
        exact.diag(model, x, y, "hessian", lik),
    )


def test_params_subset_restricts_to_those_tensors():
    model = make_model("mlp")
    x, y = make_batch("mlp", "classification")
    got = curvature.diag_ggn(model, x, y, params=["2.weight", "2.bias"])
    ref = exact.diag(model, x, y, "ggn")
    assert list(got) == ["2.weight", "2.bias"]
    _assert_dict_close(got, {k: ref[k] for k in got})
    with pytest.raises(ValueError, match="params"):
        curvature.diag_ggn(model, x, y, params=["nope"])


def test_frozen_parameters_are_left_out():
    model = make_model("mlp")
    model[0].weight.requires_grad_(False)
    x, y = make_batch("mlp", "classification")
    assert "0.weight" not in curvature.diag_efisher(model, x, y)


def test_linear_regression_ggn_is_design_gram():
    """A case with a closed form: GGN = Hessian = XᵀX/σ² for a linear model."""
    model = torch.nn.Linear(3, 1, bias=False).double()
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randn(20, 1, dtype=torch.float64)
    ggn = curvature.diag_ggn(model, x, y, "regression", sigma_noise=0.5)
    torch.testing.assert_close(ggn["weight"][0], (x**2).sum(0) / 0.25)


def _draws(fn, n):
    """Stack n independent estimates (dicts) into one flat (n, P) tensor."""
    return torch.stack([torch.cat([v.reshape(-1) for v in fn(i).values()]) for i in range(n)])


def _flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def _assert_converges(draws, ref, z=5.0):
    """Mean of draws within z standard errors of the reference, and the error shrinks with n."""
    n = draws.shape[0]
    mean = draws.mean(0)
    se = draws.std(0) / n**0.5 + 1e-12 * (1 + ref.abs())
    assert ((mean - ref).abs() <= z * se).float().mean() >= 0.99, (mean - ref).abs().max()
    err_small = (draws[: n // 16].mean(0) - ref).norm()
    assert (mean - ref).norm() < err_small  # more draws, closer


@pytest.mark.parametrize("backend", ["hooks", "func"])
@pytest.mark.parametrize("lik", LIKS)
def test_mc_ggn_converges_to_exact(lik, backend):
    model = make_model("mlp")
    x, y = make_batch("mlp", lik, n=4)
    ref = _flat(exact.diag(model, x, y, "ggn", lik))
    gen = torch.Generator().manual_seed(0)
    draws = _draws(
        lambda i: curvature.diag_ggn(model, x, y, lik, method="mc", generator=gen, backend=backend), 800
    )
    _assert_converges(draws, ref)


@pytest.mark.parametrize("arch", ["residual", "unused"])
def test_hutchinson_converges_to_hessian_diagonal(arch):
    model = make_model(arch)
    x, y = make_batch(arch, "classification", n=4)
    ref = _flat(exact.diag(model, x, y, "hessian"))
    gen = torch.Generator().manual_seed(0)
    draws = _draws(lambda i: curvature.diag_hutchinson(model, x, y, generator=gen), 800)
    _assert_converges(draws, ref)


@pytest.mark.parametrize("arch", ["layernorm", "attention", "unused"])  # attention: twice differentiable
def test_hvp_matches_dense_hessian(arch):
    model = make_model(arch)
    x, y = make_batch(arch, "classification")
    H = exact.hessian_matrix(model, x, y)
    vec, names, shapes = exact.flatten(model)
    v = torch.randn_like(vec)
    vd = exact._unflatten(v, names, shapes)
    hv = curvature.hvp(model, x, y, vd)
    torch.testing.assert_close(_flat(hv), H @ v, atol=1e-10, rtol=1e-8)


def test_bad_arguments():
    model = make_model("mlp")
    x, y = make_batch("mlp", "classification")
    with pytest.raises(ValueError, match="method"):
        curvature.diag_ggn(model, x, y, method="kfac")
    with pytest.raises(ValueError, match="n_samples"):
        curvature.diag_ggn(model, x, y, method="mc", n_samples=0)
    with pytest.raises(ValueError, match="n_probes"):
        curvature.diag_hutchinson(model, x, y, n_probes=0)


def test_a_module_that_does_not_run_gets_zero_curvature():
    """Conditional computation: a planned module skipped by this forward. Its parameters get zero
    curvature on the hook path (it raised KeyError before), as the dense reference says."""
    from torch import nn

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.skipped = make_model("mlp"), nn.Linear(4, 3).double()

        def forward(self, x):
            return self.used(x)

    model = Skips()
    x, y = make_batch("mlp", "classification")
    for kind in ("ggn", "efisher"):
        got = (curvature.diag_ggn if kind == "ggn" else curvature.diag_efisher)(model, x, y, backend="hooks")
        ref = exact.diag(model, x, y, kind, "classification")
        _assert_dict_close(got, ref)
        assert not got["skipped.weight"].any()
    diag = curvature.diag_kfac(model, x, y)
    assert not diag["skipped.weight"].any() and diag["used.0.weight"].any()


_ESTIMATORS = {
    "diag_ggn": lambda m, x, y: curvature.diag_ggn(m, x, y),
    "diag_ggn_mc": lambda m, x, y: curvature.diag_ggn(m, x, y, method="mc"),
    "diag_efisher": lambda m, x, y: curvature.diag_efisher(m, x, y),
    "kfac": lambda m, x, y: curvature.kfac(m, x, y),
    "diag_kfac": lambda m, x, y: curvature.diag_kfac(m, x, y),
    "diag_hessian": lambda m, x, y: curvature.diag_hessian(m, x, y),
    "diag_hutchinson": lambda m, x, y: curvature.diag_hutchinson(m, x, y),
    "gvp": lambda m, x, y: operators.gvp(m, x, y, {n: torch.ones_like(p) for n, p in m.named_parameters()}),
}


@pytest.mark.parametrize("name", list(_ESTIMATORS))
@pytest.mark.parametrize("arch", ["mlp", "layernorm"])
def test_misaligned_wrong_kind_or_empty_batches_are_refused(name, arch):
    """The GGN keys and KFAC never read the labels, so a loader that yields half the labels, or
    float labels for a classifier, used to pass unnoticed; an empty batch failed deep inside
    (``range() arg 3 must not be zero``) or gave NaN factors."""
    if arch == "layernorm" and "kfac" in name:
        pytest.skip("kfac needs Linear/Conv layers only")
    model = make_model(arch).float()
    x, y = make_batch(arch, "classification", n=8)
    x = x.float()
    fn = _ESTIMATORS[name]
    fn(model, x, y)  # the well-formed batch runs
    with pytest.raises(ValueError, match="one label or target row per input"):
        fn(model, x, y[:4])
    with pytest.raises(ValueError, match="integer labels"):
        fn(model, x, y.float())
    with pytest.raises(ValueError, match="empty batch"):
        fn(model, x[:0], y[:0])
    with pytest.raises(TypeError, match="x must be a tensor, got ndarray"):
        fn(model, x.numpy(), y)
    with pytest.raises(TypeError, match="y must be a tensor, got list"):
        fn(model, x, y.tolist())


def _bn_net(mode):
    torch.manual_seed(0)
    track = mode != "eval-no-running-stats"
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=track), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16, 3),
    )  # fmt: skip
    net.train(mode == "train")
    return net.double(), torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (6,))


def _buffers(model):
    return [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("mode", ["train", "eval-no-running-stats"])
@pytest.mark.parametrize("name", ["diag_ggn", "diag_ggn_mc", "diag_efisher", "kfac", "diag_kfac"])
def test_per_sample_curvature_refuses_batch_coupled_batchnorm(mode, name):
    """Training-mode BatchNorm failed inside torch.func with a message about in-place operations,
    after updating the running statistics; BatchNorm without running statistics in eval mode
    gave per-sample values off the batch's GGN by up to 46 % of its largest entry, silently."""
    model, x, y = _bn_net(mode)
    before = _buffers(model)
    with pytest.raises(ValueError, match="BatchNorm '1' normalising with batch statistics"):
        _ESTIMATORS[name](model, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


@pytest.mark.parametrize("name", ["diag_hessian", "diag_hutchinson", "gvp"])
def test_batch_level_curvature_leaves_the_running_statistics_alone(name):
    """The Hessian of the batch loss is defined through batch statistics; its forward passes (one
    per probe for Hutchinson) must not move BatchNorm's running statistics."""
    model, x, y = _bn_net("train")
    before = _buffers(model)
    _ESTIMATORS[name](model, x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    model.eval()  # the same function with running statistics is a per-sample one, and allowed
    curvature.diag_ggn(model, x, y)


def test_hessian_diagonal_through_training_mode_batchnorm_matches_dense():
    """Batch statistics, as in the training loss (the dense reference differentiates the whole
    batch; it too failed on the running-statistics update before)."""
    model, x, y = _bn_net("train")
    _assert_dict_close(curvature.diag_hessian(model, x, y), exact.diag(model, x, y, "hessian"))
    assert model.training and model[1].num_batches_tracked == 0


def test_hook_engine_runs_large_batches_in_chunks_with_the_same_result(monkeypatch):
    from effortless.curvature import functional
    from effortless.experiments.memory import PeakMemory

    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5))
    x, y = torch.randn(800, 20), torch.randint(0, 5, (800,))
    peaks, outs = [], []
    for chunk in (10_000, 100):
        monkeypatch.setattr(functional, "HOOK_CHUNK", chunk)
        with PeakMemory([*model.parameters(), x, y]) as mem:
            outs.append(curvature.diag_ggn(model, x, y))
        peaks.append(mem.peak_bytes)
    _assert_dict_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert peaks[1] < 0.5 * peaks[0]


def test_the_per_sample_loop_warning_names_the_callers_line():
    import warnings

    from effortless.curvature import functional

    functional._warn_once.cache_clear()  # (it warns once per process and reason)
    model = make_model("recurrent")
    x, y = make_batch("recurrent", "classification")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        curvature.diag_efisher(model, x, y)
    assert [w.filename for w in rec if "vmap cannot batch" in str(w.message)] == [__file__]


class _Tokens(torch.nn.Module):
    def __init__(self, **embedding):
        super().__init__()
        self.e = torch.nn.Embedding(10, 4, **embedding)
        self.l = torch.nn.Linear(4 * 5, 3)

    def forward(self, t):
        return self.l(torch.tanh(self.e(t)).flatten(1))


def test_embedding_padding_row_gets_no_curvature_on_the_hook_path():
    """The hook rule gave the padding row (which never gets a gradient) the curvature of the rows
    around it: diag_ggn and diag_efisher off by 160 % of the largest entry, silently."""
    torch.manual_seed(0)
    model = _Tokens(padding_idx=0).double()
    tokens = torch.randint(0, 10, (6, 5))
    tokens[:, 0] = 0
    y = torch.randint(0, 3, (6,))
    assert ef.curvature.plan(model).backend == "hooks"
    for kind, fn in (("ggn", ef.curvature.diag_ggn), ("efisher", ef.curvature.diag_efisher)):
        got, ref = fn(model, tokens, y), exact.diag(model, tokens, y, kind)
        assert ref["e.weight"][0].abs().max() == 0
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)


def test_embedding_scaling_gradients_by_frequency_is_refused_for_per_sample_curvature():
    """scale_grad_by_freq divides a row's gradient by its count in the whole batch: the hook rule
    returned the unscaled curvature, 3.4× off the batch-scaled reference, without a word."""
    torch.manual_seed(0)
    model = _Tokens(scale_grad_by_freq=True).double()
    tokens, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))
    def train_step(m, x, t):
        return ef.BayesAdam(m.parameters(), n_data=6, hessian="ggn").train_step(m, x, t)

    for fn in (ef.curvature.diag_ggn, ef.curvature.diag_efisher, ef.curvature.kfac,
               lambda m, x, t: ef.laplace(m, [(x, t)]), train_step):  # fmt: skip
        with pytest.raises(ValueError, match="'e' with scale_grad_by_freq=True"):
            fn(model, tokens, y)
    ref = exact.diag(model, tokens, y, "hessian")  # batch-level quantities still run
    torch.testing.assert_close(ef.curvature.diag_hessian(model, tokens, y)["e.weight"], ref["e.weight"])


def test_diag_hessian_through_groupnorm_matches_the_dense_reference():
    """GroupNorm's double backward had no vmap rule in torch 2.13 (the batched Hessian-vector
    products failed with "The size of tensor a (6) must match the size of tensor b (2)" and now run
    one at a time there); torch 2.14 batches them. Either way the diagonal is the dense one."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                                torch.nn.Linear(36, 3)).double()  # fmt: skip
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "batched Hessian-vector products failed", RuntimeWarning)
        got = ef.curvature.diag_hessian(model, x, y, chunk_size=16)
    ref = exact.diag(model, x, y, "hessian")
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)


def test_diag_hessian_falls_back_to_one_product_at_a_time_when_batching_fails(monkeypatch):
    """Where the backward has an op without a batching rule (GroupNorm's in torch 2.13), the
    Hessian-vector products run one at a time, say so, and give the same diagonal. The failure is
    simulated so that the fallback stays tested whichever ops a torch version can batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    real, calls = torch.autograd.grad, {"batched": 0, "single": 0}

    def grad(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            calls["batched"] += 1
            raise RuntimeError("Batching rule not implemented for aten::simulated")
        calls["single"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    functional._warn_once.cache_clear()
    with pytest.warns(RuntimeWarning, match="batched Hessian-vector products failed.*aten::simulated"):
        got = ef.curvature.diag_hessian(model, x, y, chunk_size=16)
    assert calls["batched"] >= 1 and calls["single"] >= 16  # (one backward per probe at the least)
    monkeypatch.undo()
    ref = exact.diag(model, x, y, "hessian")
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)


class _ResBlock(torch.nn.Module):
    """torchvision's BasicBlock pattern: ReLU(inplace=True) on BatchNorm outputs, ``out += x``."""

    def __init__(self, inplace):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)
        self.c2, self.b2 = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3)
        self.relu = torch.nn.ReLU(inplace=inplace)
        self.head = torch.nn.Linear(48, 3)

    def forward(self, x):
        out = self.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        out += x
        return self.head(self.relu(out).flatten(1))


def _resblocks():
    torch.manual_seed(0)
    plain = _ResBlock(inplace=False)
    for b in (plain.b1, plain.b2):
        b.running_mean.uniform_(-0.5, 0.5)
        b.running_var.uniform_(0.5, 2.0)
        torch.nn.init.uniform_(b.weight, 0.5, 1.5)
        torch.nn.init.uniform_(b.bias, -0.5, 0.5)
    inplace = _ResBlock(inplace=True)
    inplace.load_state_dict(plain.state_dict())
    return plain.double().eval(), inplace.double().eval()


def test_in_place_ops_after_a_hooked_module_do_not_change_its_curvature():
    """The hook engine took gradients with respect to each module's saved output; a
    ReLU(inplace=True) after BatchNorm (every torchvision ResNet) changed that tensor in place, so
    the gradient was the one after the ReLU, without its mask: diag_ggn and diag_efisher 150–180 %
    off the reference, silently."""
    plain, inplace = _resblocks()
    x, y = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert curvature.plan(inplace).backend == "hooks"
    for kind, fn in (("ggn", curvature.diag_ggn), ("efisher", curvature.diag_efisher)):
        ref = exact.diag(plain, x, y, kind)
        for model in (inplace, inplace):  # the second call starts with the copies in place
            got = fn(model, x, y)
            for n in ref:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)
    mc = [curvature.diag_ggn(m, x, y, method="mc", generator=torch.Generator().manual_seed(0))
          for m in (plain, inplace)]  # fmt: skip
    layers = [n for n, _ in plain.named_parameters() if not n.startswith("b")]
    kf = [curvature.kfac(m, x, y, params=layers) for m in (plain, inplace)]
    glm = [ef.predict(m, ef.DiagGaussian.from_model(m, 10.0), x, method="probit") for m in (plain, inplace)]
    for n in mc[0]:
        torch.testing.assert_close(mc[1][n], mc[0][n])
    for n in kf[0]:
        torch.testing.assert_close(kf[1][n], kf[0][n])
    torch.testing.assert_close(glm[1], glm[0])
    hess = []
    for model in _resblocks():  # the training pass's own efisher (and ggn) in train_step
        opt = ef.BayesAdam(model.parameters(), n_data=6, hessian="efisher",
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
        opt.train_step(model, x, y)
        hess.append([opt.state[p]["hess"] for p in model.parameters()])
    for a, b in zip(*hess):
        torch.testing.assert_close(a, b)


def test_a_stage_run_under_no_grad_has_zero_curvature():
    """Trainable layers run under torch.no_grad() (a stage without graph) made the hook engine
    fail with "One of the differentiated Tensors does not require grad"; such models now take the
    generic path (the hooks cannot tell this from reentrant checkpointing, below)."""

    class Part(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            with torch.no_grad():
                h = torch.tanh(self.l1(x))
            return self.l2(h)

    torch.manual_seed(0)
    model = Part().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert curvature.plan(model).backend == "hooks"
    for kind, fn in (("ggn", curvature.diag_ggn), ("efisher", curvature.diag_efisher)):
        got, ref = fn(model, x, y), exact.diag(model, x, y, kind)
        assert got["l1.weight"].abs().max() == 0
        for n in ref:
            torch.testing.assert_close(got[n], ref[n])
    for key in ("ggn", "efisher", "ggn-mc"):
        ef.BayesAdam(model.parameters(), n_data=6, hessian=key).train_step(model, x, y)
    with pytest.raises(ValueError, match="'l1' ran without autograd graph.*'ggn'"):  # KFAC has no other path
        ef.BayesAdam(model.parameters(), n_data=6, hessian="kfac").train_step(model, x, y)


class _Direct(torch.nn.Module):  # the output layer's weights used through F.linear, not fc(x)
    def __init__(self):
        super().__init__()
        self.l1, self.fc = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return torch.nn.functional.linear(torch.tanh(self.l1(x)), self.fc.weight, self.fc.bias)


class _TiedOutput(torch.nn.Module):  # GPT-style: the output projection is the embedding's weight
    def __init__(self):
        super().__init__()
        self.emb, self.mix = torch.nn.Embedding(10, 6), torch.nn.Linear(6, 6)

    def forward(self, t):
        return torch.nn.functional.linear(torch.tanh(self.mix(self.emb(t).mean(1))), self.emb.weight)


@pytest.mark.parametrize("arch", ["direct", "tied"])
def test_parameters_used_outside_their_module_leave_the_hook_path(arch):
    """The hooks see a parameter only where its module runs: fc's weight passed to F.linear got
    zero curvature (100 % off), and an output projection tied to the embedding's weight only the
    embedding's part (57-89 % off), silently."""
    torch.manual_seed(0)
    if arch == "direct":
        model, x, y = _Direct().double(), torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    else:
        model, x, y = _TiedOutput().double(), torch.randint(0, 10, (6, 4)), torch.randint(0, 10, (6,))
    assert curvature.plan(model).backend == "hooks"  # statically nothing is wrong
    for kind, fn in (("ggn", curvature.diag_ggn), ("efisher", curvature.diag_efisher)):
        got, ref = fn(model, x, y), exact.diag(model, x, y, kind)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="backend='hooks' is not possible.*used outside its module"):
        curvature.diag_ggn(model, x, y, backend="hooks")
    from effortless.posterior import predictive

    post = ef.DiagGaussian.from_model(model, 10.0)
    variance = {n: v for n, v in post.variance.items()}
    _, cov = predictive.linearised_moments(model, post, x)
    _, ref_cov = predictive._func_moments(model, x, variance, 64)
    torch.testing.assert_close(cov, ref_cov)
    opt = ef.BayesAdam(model.parameters(), n_data=6, hessian="efisher")
    opt.train_step(model, x, y)  # falls back to the generic path


def test_generic_path_vmaps_and_checks_labels_outside_vmap():
    """The label-range check is data-dependent: run inside vmap it made the generic path fall
    back to one sample at a time (with a warning) for every model; it runs on the batch instead."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        curvature.diag_efisher(model, x, y, backend="func")
        curvature.diag_ggn(model, x, y, backend="func")
        curvature.diag_ggn(model, x, y, backend="func", method="mc",
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    for method in ("exact", "mc"):
        with pytest.raises(ValueError, match="labels must be in"):
            curvature.diag_ggn(model, x, y + 5, backend="func", method=method)


def test_layers_called_with_a_keyword_input():
    """``self.fc(input=h)``: the forward hook got no positional input (IndexError)."""

    class Keyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.fc = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(input=torch.tanh(self.l1(input=x)))

    torch.manual_seed(0)
    model = Keyword().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    for kind, fn in (("ggn", curvature.diag_ggn), ("efisher", curvature.diag_efisher)):
        got, ref = fn(model, x, y, backend="hooks"), exact.diag(model, x, y, kind)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n])
    post = ef.laplace(model, [(x, y)], hessian="kfac", subset="last_layer")
    assert ef.predict(model, post, x, method="probit").shape == (6, 3)
    ef.BayesAdam(model.parameters(), n_data=6, hessian="efisher").train_step(model, x, y)


def test_a_users_forward_hook_that_changes_a_layers_output():
    """The engine's hook ran after the user's, so it saved the changed output ``2·z`` and its
    gradient: the layer's curvature came out 4× too small (75 % off), silently."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    model[0].register_forward_hook(lambda mod, i, o: o * 2.0)
    model[2].register_forward_pre_hook(lambda mod, i: (i[0] * 3.0,))
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    for kind, fn in (("ggn", curvature.diag_ggn), ("efisher", curvature.diag_efisher)):
        got, ref = fn(model, x, y, backend="hooks"), exact.diag(model, x, y, kind)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n])


def test_reentrant_checkpointing_is_never_zero_curvature():
    """Under reentrant activation checkpointing the first forward runs without graph, like a
    no_grad stage, but the parameters do reach the output (through the recomputation): zero
    curvature for them would be silently wrong. Either the right value or an error."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.l2(checkpoint(lambda t: torch.tanh(self.l1(t)), x, use_reentrant=True))

    torch.manual_seed(0)
    model = Checkpointed().double()
    plain = torch.nn.Sequential(model.l1, torch.nn.Tanh(), model.l2)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    ref = curvature.diag_ggn(plain, x, y)
    try:
        got = curvature.diag_ggn(model, x, y)
    except RuntimeError as err:  # (torch.func refuses the checkpoint's autograd.Function)
        assert "use_reentrant=False" in str(err)
        return
    torch.testing.assert_close(got["l1.weight"], ref["0.weight"])


@pytest.mark.parametrize("arch", ["mlp", "cnn", "decoder"])
def test_hook_passes_are_sized_by_the_models_footprint(arch, monkeypatch):
    """Without chunk_size the hook engine takes a first pass of HOOK_FIRST samples, then passes
    that keep K × (saved numbers per sample) under HOOK_BUDGET: a 28×28 CNN's 4,096-sample passes
    held 6 GB of output gradients. Sizes change the passes, never the result."""
    from effortless.curvature import functional as fn

    model = make_model(arch)
    x, y = make_batch(arch, "classification", n=23)
    ref = exact.diag(model, x, y, "ggn")
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    monkeypatch.setattr(fn, "HOOK_FIRST", 4)
    monkeypatch.setattr(fn, "HOOK_BUDGET", 3 * 3 * sum(p.numel() for p in model.parameters()))
    got = curvature.diag_ggn(model, x, y, backend="hooks")
    _assert_dict_close(got, ref)
    assert calls[0] == 4 and sum(calls) == 23 and len(set(calls[1:-1])) <= 1 and max(calls[1:]) < 19, calls
    calls.clear()
    curvature.diag_ggn(model, x, y, backend="hooks", chunk_size=5)  # an explicit size wins
    assert calls == [5, 5, 5, 5, 3]


def test_sample_and_probe_counts_that_are_not_positive_ints_are_refused():
    """n_samples=2.5 drew 2 labels and divided by 2.5: a GGN 20 % low, silently (KFAC's G the same,
    Hutchinson's n_probes too); NumPy ints are counts."""
    import numpy as np

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for bad in (2.5, 0, True):
        with pytest.raises(ValueError, match="n_samples must be a positive int"):
            ef.curvature.diag_ggn(model, x, y, method="mc", n_samples=bad)
        with pytest.raises(ValueError, match="n_samples must be a positive int"):
            ef.curvature.kfac(model, x, y, method="mc", n_samples=bad)
        with pytest.raises(ValueError, match="n_probes must be a positive int"):
            ef.curvature.diag_hutchinson(model, x, y, n_probes=bad)
    ef.curvature.diag_ggn(model, x, y, method="exact", n_samples=2.5)  # (not used by the exact GGN)

    def mc(n):
        gen = torch.Generator().manual_seed(0)
        return ef.curvature.diag_ggn(model, x, y, method="mc", n_samples=n, generator=gen)

    a, b = mc(2), mc(np.int64(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
