"""The compiled (fused) kernels against the eager ones."""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effortless as ef
from effortless.optim import _fused, bayesadam


def _run(fused, steps=5, dtype=torch.float64, mc=1, depth=1):
    torch.manual_seed(0)
    hidden = [m for _ in range(depth) for m in (nn.Linear(6 if _ == 0 else 9, 9), nn.Tanh())]
    model = nn.Sequential(*hidden, nn.Linear(9, 3)).to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (40,), generator=g)
    opt = ef.BayesAdam(model.parameters(), n_data=40, fused=fused, lr=1e-2, temperature=0.5, mc_samples=mc,
                       generator=torch.Generator().manual_seed(1))  # fmt: skip
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)  # changing lr must not break the kernels
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(mc):
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return model, opt


def test_fused_matches_eager_in_float64():
    m1, o1 = _run(False)
    m2, o2 = _run(True)
    assert o2.fused, "the fused path did not run"
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
        for k in ("hess", "exp_avg", "exp_avg_sq", "mean_avg"):
            torch.testing.assert_close(o1.state[p][k], o2.state[q][k], rtol=1e-11, atol=1e-15)


def _assert_same_run(run1, run2):
    (m1, o1), (m2, o2) = run1, run2
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)
        for k in ("hess", "exp_avg", "exp_avg_sq", "mean_avg"):  # (the kernels update μ̄ too)
            assert (k in o1.state[p]) == (k in o2.state[q]), k
            if k in o1.state[p]:
                torch.testing.assert_close(o1.state[p][k], o2.state[q][k], rtol=1e-11, atol=1e-15)


def test_deep_models_run_the_kernels_in_chunks_with_the_same_result(monkeypatch):
    """12 parameter tensors, chunked from 4 on: one compiled call per CHUNK tensors (8 + 4), equal
    to the eager path."""
    monkeypatch.setattr(_fused, "CHUNK_ABOVE", 4)
    calls = []
    real = _fused._chunked
    monkeypatch.setattr(_fused, "_chunked", lambda name, fn, args: calls.append(name) or real(name, fn, args))
    monkeypatch.setattr(_fused, "_CACHE", {})
    monkeypatch.setattr(_fused, "_VARIANTS", {})
    fused = _run(True, depth=5)
    assert fused[1].fused and calls, "the fused path did not run"
    eager = _run(False, depth=5)
    _assert_same_run(eager, fused)
    draws = []
    for model, opt in (eager, fused):  # an evaluation sample: the kernel that returns new tensors
        with opt.sampled_params(train=False):
            draws.append([p.detach().clone() for p in model.parameters()])
    assert calls.count("sample") == 1
    for p, q in zip(*draws):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


def test_a_compilation_failure_after_the_first_chunk_finishes_the_step_eagerly(monkeypatch):
    """The first chunk is updated in place before the remainder's graph is compiled; if that
    compilation fails, the step is finished with the same math (no chunk updated twice), and the
    optimizer goes eager from then on: the run equals a fused=False run."""

    def fake_compile(fn, **kwargs):
        def run(*args):
            n = max(len(a) for a in args if isinstance(a, list))
            if n < _fused.CHUNK:
                raise RuntimeError("no compiler for the remainder")
            return fn(*args)

        return run

    monkeypatch.setattr(_fused, "CHUNK_ABOVE", 4)
    monkeypatch.setattr(_fused, "_CACHE", {})
    monkeypatch.setattr(_fused, "_VARIANTS", {})
    monkeypatch.setattr(_fused, "_BROKEN", set())
    monkeypatch.setattr(_fused.torch, "compile", fake_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = _run(True, depth=5)
    assert not fused[1].fused
    assert any("later chunk" in str(w.message) for w in caught)
    _assert_same_run(_run(False, depth=5), fused)


def test_compilation_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(name):
        def fail(*args):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(_fused, "kernel", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m2, o2 = _run(True)
    assert not o2.fused
    assert sum("torch.compile failed" in str(w.message) for w in caught) == 1
    m1, _ = _run(False)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_auto_choice_depends_on_model_size():
    small = nn.Linear(10, 10)
    big = nn.Linear(512, bayesadam.FUSED_MIN_NUMEL // 512 + 1)
    assert not ef.BayesAdam(small.parameters(), n_data=10).fused
    assert ef.BayesAdam(big.parameters(), n_data=10).fused
    assert not ef.BayesAdam(big.parameters(), n_data=10, fused=False).fused
    with pytest.raises(ValueError, match="fused"):
        ef.BayesAdam(small.parameters(), n_data=10, fused="yes")


def test_chunked_kernels_refuse_lists_of_unequal_length():
    """Chunks of unequal lists would pair one parameter's mean with another's curvature."""
    a = [torch.zeros(3) for _ in range(_fused.CHUNK_ABOVE + 1)]
    with pytest.raises(ValueError, match="differ in length"):
        _fused.kernel("sample")(a, a[:-1], a, torch.zeros(3))


def test_chunks_of_different_bases_and_sizes_share_one_graph(monkeypatch):
    """Chunked lists whose tensors are views of bases of different rank and whose sizes repeat
    differently per chunk compile one graph for the full chunks and one for the remainder (a
    graph per chunk pattern without the aliases and the duck-shape switch)."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(_fused.torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, **kw))
    monkeypatch.setattr(_fused, "_CACHE", {})
    monkeypatch.setattr(_fused, "_VARIANTS", {})
    monkeypatch.setattr(_fused, "CHUNK", 2)
    monkeypatch.setattr(_fused, "CHUNK_ABOVE", 2)
    torch._dynamo.reset()
    bases = [torch.rand(3, 4), torch.rand(12), torch.rand(5), torch.rand(2, 3), torch.rand(7), torch.rand(7),
             torch.rand(2, 2, 2)]  # fmt: skip
    mus = [b.reshape(-1) for b in bases]  # views of 1-, 2- and 3-D bases; equal sizes in some chunks
    hs = [torch.rand_like(m) for m in mus]
    es = [torch.randn_like(m) for m in mus]
    hp = torch.tensor([1.0, 2.0, 3.0])
    out = _fused.kernel("sample")(mus, hs, es, hp)
    for o, m, h, e in zip(out, mus, hs, es):
        torch.testing.assert_close(o, _fused._sample_math(m, h, e, hp))
    assert counter.frame_count == 2  # chunks of 2 (three of them) and the remainder of 1


def _run_model_side(fused, hessian, steps=5, mc=1):
    """train_step with a model-side curvature key (antithetic pairs: the mirror reads the ε the
    update left in the noise buffers)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    opt = ef.BayesAdam(model.parameters(), n_data=40, fused=fused, lr=1e-2, temperature=0.5, hessian=hessian,
                       mc_samples=mc, hess_beta=0.9, generator=torch.Generator().manual_seed(1))  # fmt: skip
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    for _ in range(steps):
        opt.train_step(model, x, y)
        sched.step()
    return model, opt


@pytest.mark.parametrize("hessian,mc", [("ggn-mc", 1), ("efisher", 1), ("kfac", 1), ("ggn", 2),
                                        ("hutchinson", 1)])  # fmt: skip
def test_model_side_keys_fused_match_eager_in_float64(hessian, mc, monkeypatch):
    calls = []
    real = _fused.kernel
    monkeypatch.setattr(_fused, "kernel", lambda name: calls.append(name) or real(name))
    fused = _run_model_side(True, hessian, mc=mc)
    assert fused[1].fused
    if hessian == "hutchinson":  # signed: the eager positivity-preserving update, no given kernel
        assert not any(c.startswith("given") for c in calls)
    else:
        name = "given_step_theta" if mc == 1 else "given_step"
        assert name + "_avg" in calls  # (with the averaged means updated in the same pass)
        assert set(calls) <= {"sample", "sample_inplace", name, name + "_avg"}
    (m1, o1), (m2, o2) = _run_model_side(False, hessian, mc=mc), fused
    _assert_same_run((m1, o1), (m2, o2))
    for p, q in zip(m1.parameters(), m2.parameters()):  # the same ε left for the mirror sample
        torch.testing.assert_close(o1.state[p]["noise"], o2.state[q]["noise"], rtol=1e-10, atol=1e-13)


def test_model_side_kernel_failure_converts_the_sample_and_goes_eager(monkeypatch):
    real = _fused.kernel

    def broken(name):
        if name.startswith("given"):
            def fail(*args):
                raise RuntimeError("no compiler here")

            return fail
        return real(name)

    monkeypatch.setattr(_fused, "kernel", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = _run_model_side(True, "ggn-mc")
    assert not fused[1].fused
    assert sum("torch.compile failed" in str(w.message) for w in caught) == 1
    _assert_same_run(_run_model_side(False, "ggn-mc"), fused)


def test_only_a_kernels_first_call_compiles_without_inductors_worker_pool(monkeypatch):
    """The first call (which compiles) runs with compile_threads=1; later calls and everything
    outside see the global setting again."""
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(_fused, "_CACHE", {})
    monkeypatch.setattr(_fused, "_VARIANTS", {})
    seen = []

    def spy(name, compiled, args):  # record the setting; run the math eagerly (no compilation)
        seen.append(inductor_config.compile_threads)
        return _fused.eager(name)(*args)

    monkeypatch.setattr(_fused, "_chunked", spy)
    # the config module's own patch: monkeypatch's undo deletes a config entry (every later
    # compilation in the process then fails)
    with inductor_config.patch(compile_threads=3):
        k = _fused.kernel("sample")
        mu, h, e = torch.zeros(4), torch.ones(4), torch.ones(4)
        hp = torch.tensor([1.0, 3.0, 1.0])
        for _ in range(2):
            out = k([mu], [h], [e], hp)
            torch.testing.assert_close(out[0], torch.full((4,), 0.5))  # 0 + 1 / √(1·3 + 1)
        assert seen == [1, 3]
        assert inductor_config.compile_threads == 3


def test_steps_under_a_dispatch_mode_run_uncompiled_and_keep_the_kernels(monkeypatch):
    """torch.compile does not run under a user's dispatch mode (FlopCounterMode, a memory counter),
    and a frame it refused stays refused: such steps run the same math uncompiled, without a
    warning, the optimizer stays fused, and the run equals the eager one."""
    from torch.utils.flop_counter import FlopCounterMode

    compiled_calls = []
    real = _fused._chunked

    def counted(name, fn, args):
        compiled_calls.append(name)
        return real(name, fn, args)

    monkeypatch.setattr(_fused, "_chunked", counted)
    for name in ("_CACHE", "_BROKEN", "_VARIANTS"):  # nothing left over from other tests
        monkeypatch.setattr(_fused, name, type(getattr(_fused, name))())

    def run(fused, counted_steps):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (40,), generator=g)
        opt = ef.BayesAdam(model.parameters(), n_data=40, fused=fused, lr=1e-2, temperature=0.5,
                           generator=torch.Generator().manual_seed(1))  # fmt: skip
        for i in range(6):
            mode = FlopCounterMode(display=False) if i in counted_steps else contextlib.nullcontext()
            with mode:
                opt.zero_grad()
                with opt.sampled_params(train=True):
                    F.cross_entropy(model(x), y).backward()
                opt.step()
        return model, opt

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = run(True, counted_steps={1, 2})
    assert fused[1].fused and not [w for w in caught if "BayesAdam" in str(w.message)]
    n_compiled = len(compiled_calls)
    assert n_compiled == 8, compiled_calls  # 4 of the 6 steps compiled: a sample and an update each
    eager = run(False, counted_steps=set())
    _assert_same_run(eager, fused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = run(True, counted_steps=set())  # the kernels still compile and run afterwards
    assert again[1].fused and not [w for w in caught if "BayesAdam" in str(w.message)]
    assert len(compiled_calls) == n_compiled + 12


def test_kernels_for_many_tensor_counts_stay_under_the_recompile_limit(monkeypatch):
    """torch._dynamo counts recompilations per code object, and past its recompile limit a
    fullgraph compilation fails: with one code object per kernel, the optimizer of the ninth
    model depth in a process (a sweep, a notebook; the limit is 8) warned and went eager for
    good. Each variant (dtypes, number of tensors) now compiles from its own copy of the code;
    here three lengths under a limit of 1."""
    import torch._dynamo.config as dynamo_config

    for name in ("_CACHE", "_BROKEN", "_VARIANTS"):
        monkeypatch.setattr(_fused, name, type(getattr(_fused, name))())
    k = _fused.kernel("sample")
    hp = torch.tensor([1.0, 3.0, 1.0])
    with dynamo_config.patch(recompile_limit=1):
        for n in (1, 2, 3):
            out = k([torch.zeros(4)] * n, [torch.ones(4)] * n, [torch.ones(4)] * n, hp)
            assert len(out) == n
            torch.testing.assert_close(out[-1], torch.full((4,), 0.5))  # 0 + 1 / √(1·3 + 1)
