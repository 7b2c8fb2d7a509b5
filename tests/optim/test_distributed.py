"""BayesAdam under torch.distributed (2 CPU processes, gloo, DistributedDataParallel)."""

import gc
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import effortless as ef
from effortless.curvature.data import all_reduce_sums
from effortless.optim import _fused

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS, B = 6, 16
DEADLINE_S = 300


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank, world, port, body, *args):
    """Process-group life cycle around ``body`` (a function, so its DDP objects are freed before the
    group is destroyed: a live DDP at teardown can abort the process in gloo's threads)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        body(rank, *args)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(body, *args):
    # fork: the workers inherit the imported torch and effortless (a fresh interpreter each took
    # ~2 s to import them: 96 s for this file against 27 s); spawn once CUDA is initialised in this
    # process (the CUDA tests), which a forked child could not use. Workers run one thread each.
    # A hung worker (a deadlock in gloo or after the fork) fails the test after DEADLINE_S seconds
    # instead of holding the whole run.
    method = "spawn" if torch.cuda.is_initialized() else "fork"
    ctx = mp.start_processes(_spawned, args=(2, _free_port(), body, *args), nprocs=2, join=False,
                             start_method=method)  # fmt: skip
    end = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=0.5):  # (raises when a worker failed)
        if time.monotonic() > end:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the two workers did not finish within {DEADLINE_S} s")


def _sleep(rank):
    time.sleep(120)


def test_a_hung_worker_fails_the_test_instead_of_holding_the_run(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "DEADLINE_S", 2)
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not finish within 2 s"):
        _spawn(_sleep)
    assert time.monotonic() - start < 60


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 2 * B, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, 2 * B), generator=g)
    return model, x, y


def _state(model, opt):
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        st = opt.state[p]
        out[f"hess.{n}"] = st["hess"].clone()
        out[f"exp_avg.{n}"] = st["exp_avg"].clone()
        out[f"step.{n}"] = torch.tensor(float(st["step"]))
    return out


def _train(model, opt, x, y, hessian, wrapped=None):
    net = wrapped or model
    for t in range(STEPS):
        if hessian == "closure":  # as Lightning does it: zero_grad inside the sampled closure

            def closure(t=t):
                loss = F.cross_entropy(net(x[t]), y[t])
                opt.zero_grad()
                loss.backward()
                return loss

            opt.step(closure)
        elif hessian == "reparam":
            opt.zero_grad()
            with opt.sampled_params(train=True):
                F.cross_entropy(net(x[t]), y[t]).backward()
            opt.step()
        else:
            opt.train_step(net, x[t], y[t])


def _worker(rank, mode, hessian, out):
    model, x, y = _setup()
    ddp = DDP(model)
    gen = torch.Generator().manual_seed(7 if rank == 0 else 100 + rank)  # rank 0's state is broadcast
    key = {"closure": "reparam", "reparam-mc2": "reparam"}.get(hessian, hessian)
    opt = ef.BayesAdam(model.parameters(), n_data=1000, hessian=key, distributed=mode, generator=gen,
                       fused=False, mc_samples=2 if hessian == "reparam-mc2" else 1)  # fmt: skip
    sl = slice(rank * B, (rank + 1) * B)
    _train(model, opt, x[:, sl], y[:, sl], hessian, wrapped=ddp)
    torch.save(_state(model, opt), os.path.join(out, f"rank{rank}.pt"))


def _run(tmp_path, mode, hessian):
    _spawn(_worker, mode, hessian, str(tmp_path))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize(
    "mode, hessian",
    [("flipout", "reparam"), ("flipout", "ggn-mc"), ("flipout", "closure"), ("flipout", "reparam-mc2"),
     ("per-rank", "reparam"), ("per-rank", "ggn-mc"), ("per-rank", "closure"), ("per-rank", "reparam-mc2")],
)  # fmt: skip
def test_per_rank_samples_keep_every_rank_identical(tmp_path, mode, hessian):
    r0, r1 = _run(tmp_path, mode, hessian)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # bitwise: means, curvature, momentum, step counters
    model, x, y = _setup()
    moved = any(not torch.equal(r0[f"param.{n}"], p) for n, p in model.named_parameters())
    assert moved and r0["step.0.weight"] == STEPS


@pytest.mark.parametrize("hessian", ["reparam", "ggn"])
def test_shared_sample_equals_one_process_on_the_global_batch(tmp_path, hessian):
    """reparam: the estimate is computed from the all-reduced gradient; ggn: each rank's curvature
    of its half batch, averaged over ranks, is the curvature of the global batch."""
    r0, r1 = _run(tmp_path, "shared", hessian)
    model, x, y = _setup()
    gen = torch.Generator().manual_seed(7)
    opt = ef.BayesAdam(model.parameters(), n_data=1000, hessian=hessian, generator=gen, fused=False)
    _train(model, opt, x, y, hessian)
    ref = _state(model, opt)
    for k in ref:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-9, atol=1e-12)


def test_per_rank_samples_differ_from_shared(tmp_path):
    """The per-rank modes really draw different samples (else the test above proves nothing new)."""
    shared = _run(tmp_path, "shared", "reparam")[0]
    for mode in ("per-rank", "flipout"):
        other = _run(tmp_path, mode, "reparam")[0]
        assert not torch.equal(shared["param.0.weight"], other["param.0.weight"]), mode


def _resume_worker(rank, out, mode):
    """Train 3 steps (mid antithetic pair), checkpoint rank 0's optimizer and weights, train 3 more;
    then every rank loads rank 0's checkpoint into a fresh model and optimizer and trains the same
    3 steps: the result must be bitwise the same as without the interruption."""
    model, x, y = _setup()
    sl = slice(rank * B, (rank + 1) * B)
    xs, ys = x[:, sl], y[:, sl]

    def steps(model, opt, ts):
        ddp = DDP(model)
        for t in ts:
            opt.zero_grad()
            with opt.sampled_params(train=True):
                F.cross_entropy(ddp(xs[t]), ys[t]).backward()
            opt.step()

    opt = ef.BayesAdam(model.parameters(), n_data=1000, generator=torch.Generator().manual_seed(7),
                       fused=False, distributed=mode)  # fmt: skip
    steps(model, opt, range(3))
    path = os.path.join(out, "ckpt.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()
    ckpt = torch.load(path, weights_only=True)  # every rank reads rank 0's file
    steps(model, opt, range(3, 6))
    fresh, _, _ = _setup()
    fresh.load_state_dict(ckpt["model"])
    opt2 = ef.BayesAdam(fresh.parameters(), n_data=1000, generator=torch.Generator().manual_seed(99),
                        fused=False, distributed=mode)  # fmt: skip
    opt2.load_state_dict(ckpt["opt"])
    steps(fresh, opt2, range(3, 6))
    a, b = _state(model, opt), _state(fresh, opt2)
    torch.save({k: torch.equal(a[k], b[k]) for k in a}, os.path.join(out, f"resume{rank}.pt"))


@pytest.mark.parametrize("mode", ["auto", "per-rank"])  # auto = flipout
def test_per_rank_run_resumes_bitwise_from_rank_0_checkpoint(tmp_path, mode):
    _spawn(_resume_worker, str(tmp_path), mode)
    for r in range(2):
        same = torch.load(tmp_path / f"resume{r}.pt", weights_only=True)
        assert all(same.values()), (r, [k for k, v in same.items() if not v])


def _laplace_worker(rank, out):
    model, x, y = _setup()
    xs, ys = x.reshape(-1, 5), y.reshape(-1)
    ds = torch.utils.data.TensorDataset(xs, ys)
    shard = torch.utils.data.DistributedSampler(ds, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=20, sampler=shard)
    post = ef.laplace(model, loader, hessian="ggn", prior_precision="marglik")
    local = ef.laplace(model, loader, hessian="ggn", prior_precision=1.0, distributed=False)
    torch.save({"precision": post.precision, "delta": post.prior_precision, "local": local.precision},
               os.path.join(out, f"laplace{rank}.pt"))  # fmt: skip


def _accumulate_worker(rank, out):
    model, x, y = _setup()
    xs, ys = x.reshape(-1, 5), y.reshape(-1)
    ds = torch.utils.data.TensorDataset(xs, ys)
    shard = torch.utils.data.DistributedSampler(ds, shuffle=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=13, sampler=shard)  # uneven last batch
    res = {
        "ggn": ef.curvature.accumulate(model, loader, hessian="ggn"),
        "kfac": {n: list(f) for n, f in ef.curvature.accumulate(model, loader, hessian="kfac").items()},
    }
    ll = ef.laplace(model, loader, hessian="kfac", subset="last_layer", prior_precision="marglik")
    res["ll"] = {"A": ll.A, "G": ll.G, "delta": ll.prior_precision}
    # a count beside 16-bit sums: reduced in bf16 it came back rounded (60,002 -> 59,904)
    half = [torch.full((3,), 1.0 + rank, dtype=torch.bfloat16)]
    res["counts"] = torch.tensor(all_reduce_sums(half, [30001.0, 0.125 + rank], True), dtype=torch.float64)
    res["half"] = half[0]
    torch.save(res, os.path.join(out, f"acc{rank}.pt"))


def test_curvature_and_last_layer_kfac_on_a_distributed_loader_equal_the_whole_data(tmp_path):
    """issue #8: the curvature functions and the last-layer KFAC Laplace reduce across ranks."""
    _spawn(_accumulate_worker, str(tmp_path))
    r = [torch.load(tmp_path / f"acc{k}.pt", weights_only=True) for k in range(2)]
    ref = _whole_data_curvature()
    _assert_curvature_equals(r[0], ref)
    for k in ref["ggn"]:
        assert torch.equal(r[0]["ggn"][k], r[1]["ggn"][k])
    assert r[0]["ll"]["delta"] == r[1]["ll"]["delta"]
    for k in range(2):
        assert r[k]["counts"].tolist() == [60002.0, 1.25]
        assert r[k]["half"].dtype == torch.bfloat16 and r[k]["half"].tolist() == [3.0, 3.0, 3.0]


def _empty_shard_worker(rank, out):
    """Rank 1's shard is empty: its KFAC sums have no shapes until a forward pass, so it raised
    before the collective and rank 0 waited in it (the test's deadline caught the hang)."""
    model, x, y = _setup()
    xs, ys = x.reshape(-1, 5), y.reshape(-1)
    loader = [(xs[i : i + 13], ys[i : i + 13]) for i in range(0, len(xs), 13)] if rank == 0 else []
    res = {"kfac": {n: list(f) for n, f in ef.curvature.accumulate(model, loader, hessian="kfac").items()}}
    res["ggn"] = ef.curvature.accumulate(model, loader, hessian="ggn")
    diag = ef.laplace(model, loader, hessian="ggn", prior_precision="marglik")
    res["diag"] = {"precision": diag.precision, "delta": diag.prior_precision}
    ll = ef.laplace(model, loader, hessian="kfac", subset="last_layer", prior_precision="marglik")
    res["ll"] = {"A": ll.A, "G": ll.G, "delta": ll.prior_precision, "layer": ll.layer}
    try:  # every shard empty: both ranks raise (none waits for the other)
        ef.curvature.accumulate(model, [], hessian="kfac")
    except ValueError as e:
        res["none"] = str(e)
    other = model if rank == 0 else torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                                        torch.nn.Linear(4, 3)).double()  # fmt: skip
    try:  # different models on the ranks: both raise, naming it
        ef.curvature.accumulate(other, [(xs[:13], ys[:13])], hessian="kfac")
    except ValueError as e:
        res["mismatch"] = str(e)
    torch.save(res, os.path.join(out, f"empty{rank}.pt"))


def test_curvature_with_an_empty_shard_on_one_rank_equals_the_whole_data(tmp_path):
    _spawn(_empty_shard_worker, str(tmp_path))
    r = [torch.load(tmp_path / f"empty{k}.pt", weights_only=True) for k in range(2)]
    ref = _whole_data_curvature()
    for k in range(2):
        _assert_curvature_equals(r[k], ref)
        assert list(r[k]["kfac"]) == list(ref["kfac"]) and r[k]["ll"]["layer"] == ref["ll"].layer
        assert "no batches" in r[k]["none"]
        assert "differ in layout" in r[k]["mismatch"]
        assert r[k]["diag"]["delta"] == pytest.approx(ref["diag"].prior_precision, rel=1e-9)
        for name, v in ref["diag"].precision.items():
            torch.testing.assert_close(r[k]["diag"]["precision"][name], v, rtol=1e-10, atol=1e-10)


def _whole_data_curvature() -> dict:
    """What the workers' reductions must equal: the curvature of the whole data in one process."""
    model, x, y = _setup()
    xs, ys = x.reshape(-1, 5), y.reshape(-1)
    whole = [(xs, ys)]
    return {"ggn": ef.curvature.diag_ggn(model, xs, ys), "kfac": ef.curvature.kfac(model, xs, ys),
            "ll": ef.laplace(model, whole, hessian="kfac", subset="last_layer", prior_precision="marglik"),
            "diag": ef.laplace(model, whole, hessian="ggn", prior_precision="marglik")}  # fmt: skip


def _assert_curvature_equals(got: dict, ref: dict) -> None:
    for k, v in ref["ggn"].items():
        torch.testing.assert_close(got["ggn"][k], v, rtol=1e-10, atol=1e-12)
    for k, (A, G) in ref["kfac"].items():
        torch.testing.assert_close(got["kfac"][k][0], A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["kfac"][k][1], G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["ll"]["A"], ref["ll"].A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got["ll"]["G"], ref["ll"].G, rtol=1e-10, atol=1e-12)
    assert got["ll"]["delta"] == pytest.approx(ref["ll"].prior_precision, rel=1e-6)


def test_laplace_on_a_distributed_loader_equals_the_whole_data(tmp_path):
    _spawn(_laplace_worker, str(tmp_path))
    r = [torch.load(tmp_path / f"laplace{k}.pt", weights_only=True) for k in range(2)]
    model, x, y = _setup()
    data = [(x.reshape(-1, 5), y.reshape(-1))]
    ref = ef.laplace(model, data, hessian="ggn", prior_precision="marglik")
    assert r[0]["delta"] == r[1]["delta"] == pytest.approx(ref.prior_precision, rel=1e-9)
    for k, v in ref.precision.items():
        torch.testing.assert_close(r[0]["precision"][k], v, rtol=1e-10, atol=1e-10)
        assert torch.equal(r[0]["precision"][k], r[1]["precision"][k])
        assert not torch.allclose(r[0]["local"][k], r[1]["local"][k])  # the shards differ


def _flipout_worker(rank, out):
    """Inside one flipout sample: this rank's unit noise (θ − μ)/σ, all-reduced over the ranks, must
    equal the Σ_r ε_r every rank computed locally for the curvature estimate."""
    model, x, y = _setup()
    ddp = DDP(model)
    opt = ef.BayesAdam(model.parameters(), n_data=1000, generator=torch.Generator().manual_seed(7),
                       fused=False, temperature=1.0)  # fmt: skip
    sl = slice(rank * B, (rank + 1) * B)
    res = {}
    for t in range(2):  # the second sample is the antithetic mirror of the first
        opt.zero_grad()
        means = {n: p.detach().clone() for n, p in model.named_parameters()}
        with opt.sampled_params(train=True):
            F.cross_entropy(ddp(x[t, sl]), y[t, sl]).backward()
            for n, p in model.named_parameters():
                st = opt.state[p]
                sigma = (st["hess"] * 1000 + 1.0).rsqrt()  # T = 1, δ = 1
                own = (p.detach() - means[n]) / sigma
                total = own.clone()
                dist.all_reduce(total)
                res[f"own{t}.{n}"] = own
                res[f"reduced{t}.{n}"] = total
                res[f"local{t}.{n}"] = opt._flipout_noise_sum()[p]
        opt.step()
    torch.save(res, os.path.join(out, f"flip{rank}.pt"))


def test_flipout_noise_sum_is_the_sum_of_the_ranks_samples(tmp_path):
    _spawn(_flipout_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"flip{r}.pt", weights_only=True) for r in range(2))
    for k in r0:
        if k.startswith(("reduced", "local")):  # every rank knows the same sum
            torch.testing.assert_close(r0[k], r1[k], rtol=1e-10, atol=1e-10)
    for n in ("0.weight", "2.bias"):
        for t in range(2):
            sign = -1.0 if t else 1.0  # the local sum is of the unit noise; the sample is ±σ ε
            torch.testing.assert_close(r0[f"local{t}.{n}"] * sign, r0[f"reduced{t}.{n}"],
                                       rtol=1e-10, atol=1e-10)  # fmt: skip
        # two different samples, with the same magnitudes (one shared Gaussian, per-rank signs)
        assert not torch.allclose(r0[f"own0.{n}"], r1[f"own0.{n}"])
        torch.testing.assert_close(r0[f"own0.{n}"].abs(), r1[f"own0.{n}"].abs(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(r0[f"own1.{n}"], -r0[f"own0.{n}"], rtol=1e-10, atol=1e-10)


def _bf16_worker(rank, out):
    model, x, y = _setup()
    model = model.float()
    ddp = DDP(model)
    gen = torch.Generator().manual_seed(7 if rank == 0 else 100 + rank)
    fused = _fused.lowp_state_supported()  # (else this torch's compiled code rounds bf16 wrong: eager)
    opt = ef.BayesAdam(model.parameters(), n_data=1000, distributed="flipout", generator=gen, fused=fused,
                       state_dtype=torch.bfloat16)  # fmt: skip
    sl = slice(rank * B, (rank + 1) * B)
    _train(model, opt, x[:, sl].float(), y[:, sl], "reparam", wrapped=ddp)
    assert opt.state[model[0].weight]["hess"].dtype == torch.bfloat16 and opt.fused == fused  # (no fallback)
    torch.save(_state(model, opt), os.path.join(out, f"rank{rank}.pt"))


def test_bf16_state_under_flipout_keeps_every_rank_identical(tmp_path):
    """bf16 state through the compiled Flipout update (its stochastic rounding's dither is per step,
    the same on every rank): means, curvature and moments stay bitwise equal across ranks."""
    _spawn(_bf16_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert r0["step.0.weight"] == STEPS
