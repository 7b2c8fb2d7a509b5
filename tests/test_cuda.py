"""CUDA checks (issue #8: fp16 autocast with GradScaler on CUDA; the optimizer and predictives on a
GPU). Skipped without a GPU: these have not run on the CPU-only machines this project is built on;
they are here for a session that has a device (`python -m pytest tests/test_cuda.py`)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effortless as ef
from effortless.optim.bayesadam import random_signs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _problem(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 20, generator=g)
    y = (x @ torch.randn(20, 4, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    return model.to(device), x.to(device), y.to(device)


def _train(model, x, y, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("fused", [False, True])
def test_a_cuda_run_matches_the_cpu_run(fused):
    """Same CPU generator, so the same noise on both devices; float32 round-off apart."""
    out = {}
    for device in ("cpu", "cuda"):
        model, x, y = _problem(device)
        opt = ef.BayesAdam(model.parameters(), n_data=256, generator=torch.Generator().manual_seed(1),
                           fused=fused)  # fmt: skip
        _train(model, x, y, opt, 10)
        out[device] = [t.detach().cpu() for p in model.parameters() for t in (p, opt.state[p]["hess"])]
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_model_moved_to_the_gpu_after_a_step_is_refused_and_the_state_carries_over():
    model, x, y = _problem("cpu")
    opt = ef.BayesAdam(model.named_parameters(), n_data=256)
    _train(model, x, y, opt, 2)
    model.cuda()
    with pytest.raises(RuntimeError, match="on cuda:0, but its optimizer state is torch.float32 on cpu"):
        _train(model, x.cuda(), y.cuda(), opt, 1)
    sd = opt.state_dict()
    opt = ef.BayesAdam(model.named_parameters(), n_data=256)
    opt.load_state_dict(sd)
    _train(model, x.cuda(), y.cuda(), opt, 2)
    assert opt.state[model[0].weight]["hess"].device.type == "cuda"


def _fp16_run(steps, poison=False):
    model, x, y = _problem("cuda")
    if poison:
        x[0, 0] = float("inf")
    opt = ef.BayesAdam(model.parameters(), n_data=256, generator=torch.Generator().manual_seed(0))
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            with torch.autocast("cuda", dtype=torch.float16):
                out = model(x)
            assert out.dtype == torch.float16
            loss = F.cross_entropy(out.float(), y)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # inside the sampling context, before the gradients are read
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    return model, opt, scaler, losses


def test_fp16_autocast_with_grad_scaler_trains_and_keeps_the_state_in_fp32():
    model, opt, scaler, losses = _fp16_run(60)
    assert losses[-1] < 0.7 * losses[0]
    for p in model.parameters():
        st = opt.state[p]
        assert p.dtype == st["hess"].dtype == st["exp_avg"].dtype == torch.float32
        assert bool(torch.isfinite(st["hess"]).all()) and st["step"] == 60


def test_fp16_overflow_is_skipped_by_the_scaler_and_leaves_the_state():
    model, opt, scaler, _ = _fp16_run(1, poison=True)
    assert scaler.get_scale() == 2.0**11
    fresh, _, _ = _problem("cuda")
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p]["step"] == 0 and not opt.state[p]["exp_avg"].any()


def test_flipout_signs_from_a_cuda_generator():
    s = random_signs(100_003, torch.Generator(device="cuda").manual_seed(0))
    assert s.device.type == "cuda" and set(s.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(s.mean())) < 5 / 100_003**0.5


@pytest.mark.parametrize("method", ["mc", "glm"])
def test_predictives_on_cuda_match_cpu(method):
    out = {}
    for device in ("cpu", "cuda"):
        model, x, y = _problem(device)
        opt = ef.BayesAdam(model.named_parameters(), n_data=256, generator=torch.Generator().manual_seed(1))
        _train(model, x, y, opt, 20)
        probs = ef.predict(model, opt.posterior(), x[:32], n_samples=8, method=method,
                           generator=torch.Generator().manual_seed(2))  # fmt: skip
        out[device] = probs.cpu()
    torch.testing.assert_close(out["cpu"], out["cuda"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("product_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_model_side_key_on_cuda_matches_the_cpu_run(fused, product_dtype, monkeypatch):
    """train_step with ggn-mc (the fused model-side update; bf16 curvature products on both
    devices): the same sampled labels from the CPU-seeded generator, round-off apart."""
    from effortless.curvature import engine

    monkeypatch.setattr(engine, "LOWP_MIN_MACS", 0)  # the small network's products take bf16 too
    out = {}
    for device in ("cpu", "cuda"):
        model, x, y = _problem(device)
        gen = torch.Generator().manual_seed(1)  # on the CPU for both runs: the labels are drawn there
        opt = ef.BayesAdam(model.parameters(), n_data=256, hessian="ggn-mc", fused=fused,
                           product_dtype=product_dtype, generator=gen)  # fmt: skip
        for _ in range(5):
            opt.train_step(model, x, y)
        out[device] = [t.detach().cpu() for p in model.parameters() for t in (p, opt.state[p]["hess"])]
    tol = dict(rtol=1e-4, atol=1e-5) if product_dtype is None else dict(rtol=3e-2, atol=1e-4)
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(a, b, **tol)


def test_cpu_generators_drive_every_draw_on_cuda():
    """Hutchinson probes, MC-GGN labels, posterior and predictive draws with a CPU generator on a
    CUDA model give the CPU run's numbers."""
    out = {}
    for device in ("cpu", "cuda"):
        model, x, y = _problem(device)
        g = torch.Generator().manual_seed(0)
        hutch = ef.curvature.diag_hutchinson(model, x, y, generator=g)
        mc = ef.curvature.diag_ggn(model, x, y, method="mc", generator=g)
        post = ef.DiagGaussian.from_model(model, 100.0)
        draw = post.sample(g)
        probs = ef.predict(model, post, x, n_samples=4, method="glm", generator=g)
        out[device] = [t.cpu() for t in (*hutch.values(), *mc.values(), *draw.values(), probs)]
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_mc_predictive_of_a_cpu_posterior_for_a_cuda_model_is_batched_and_equal():
    """The batched (vmap) MC path stacked the draws on the posterior's device: with a CPU
    posterior and a CUDA model it failed and fell back to one sample at a time."""
    model, x, _ = _problem("cuda")
    post = ef.DiagGaussian.from_model(model.cpu(), precision=50.0)
    model.cuda()
    got = ef.predict(model, post, x, n_samples=8, generator=torch.Generator().manual_seed(0))
    ref = ef.predict(model, post.to("cuda"), x, n_samples=8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, ref)
    import effortless.api as api

    calls = []
    orig = api._SampleLoader.run
    api._SampleLoader.run = lambda self, *a: calls.append(1) or orig(self, *a)
    try:
        ef.predict(model, post, x, n_samples=8)
    finally:
        api._SampleLoader.run = orig
    assert not calls  # the batched path ran


def test_labels_out_of_range_on_cuda_fail_at_the_next_sync():
    """On a device the label check is an asynchronous assert (no per-step wait): it fails when the
    stream syncs, not silently."""
    model, x, y = _problem("cuda")
    with pytest.raises(RuntimeError):
        ef.curvature.diag_ggn(model, x, y + 4, likelihood="classification")
        torch.cuda.synchronize()


def test_bench_trains_and_predicts_every_method_on_cuda(tmp_path):
    """`effortless bench --device cuda`: every registered method (the peers where installed) trains
    on the GPU, its predictions come back for the CPU metrics, and the rows say where they ran."""
    import math

    from effortless import baselines
    from effortless.experiments import bench

    names = [m for m in baselines.METHODS if baselines.available(m) is None]
    rows = bench.run(tasks=["mnist1d-mlp"], methods=names, seeds=1, epochs=2, out=tmp_path / "c", subset=200,
                     progress=False, device="cuda")  # fmt: skip
    assert sorted(r["method"] for r in rows) == sorted(names)
    for r in rows:
        assert r["device"] == "cuda" and math.isfinite(r["nll"]) and r["peak_mem_mb"] > 0, r["method"]
    rows = bench.run(tasks=["toy-regression"], methods=list(baselines.REGRESSION_METHODS), seeds=1, epochs=2,
                     out=tmp_path / "r", subset=100, progress=False, device="cuda")  # fmt: skip
    assert all(r["device"] == "cuda" and math.isfinite(r["nll"]) for r in rows)


def test_metrics_take_cuda_predictions():
    """The binned and ranked metrics built their bins and ranks on the CPU: CUDA predictions (the
    Lightning callback on a GPU run) failed in index_add_. They evaluate on the CPU now."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 5, generator=g), -1)
    labels = torch.randint(0, 5, (200,), generator=g)
    s_in, s_out = torch.rand(50, generator=g), torch.rand(40, generator=g)
    mean, y = torch.randn(30, generator=g), torch.randn(30, generator=g)
    var = torch.rand(30, generator=g) + 0.1
    m = ef.metrics
    for f, args in ((m.accuracy, (probs, labels)), (m.nll, (probs, labels)), (m.ece, (probs, labels)),
                    (m.mce, (probs, labels)), (m.aurc, (probs, labels)), (m.auroc, (s_in, s_out)),
                    (m.aupr, (s_in, s_out)), (m.fpr_at_tpr, (s_in, s_out)), (m.picp, (mean, var, y)),
                    (m.quantile_calibration_error, (mean, var, y))):  # fmt: skip
        assert f(*(a.cuda() for a in args)) == f(*args), f.__name__


def test_acquisition_selects_from_cuda_log_probabilities():
    """select()'s random tie-break and BatchBALD's joint were built on the CPU: CUDA log-probabilities
    failed with a device mismatch. The same picks as from the CPU tensor now."""
    from effortless.active.acquisition import select

    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(60, 4, 8, generator=g), 1)
    for name in ("bald", "max-entropy", "random", "batchbald"):
        cpu = select(name, lp, 5, torch.Generator().manual_seed(1))
        gpu = select(name, lp.cuda(), 5, torch.Generator().manual_seed(1))
        assert torch.equal(cpu, gpu.cpu()), name
