"""The tensor-memory counters of effortless.experiments.memory (deterministic, not timed)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import effortless as ef
from effortless.experiments.memory import PeakMemory, measure_step, optimizer_tensors, profiled_peak
from effortless.models import MLP


def _work(x):
    y = x + x  # tensor-tensor ops: a Python scalar would be wrapped in a tensor below the dispatcher
    del y
    z = x * x
    w = z.sum()  # a 0-d tensor: 4 bytes more
    return z, w


def test_profiled_peak_agrees_with_the_dispatcher_count_on_eager_code():
    x = torch.zeros(1000)
    with PeakMemory([x]) as mem:
        _work(x)
    _, peak = profiled_peak(lambda: _work(x), baseline=[x])
    if peak is None:
        pytest.skip("this torch has no profiler memory timeline")
    assert mem.peak_bytes == 2 * 4000 + 4
    assert peak == mem.peak_bytes


def test_profiled_peak_sees_compiled_code_and_the_dispatcher_count_does_not():
    x = torch.zeros(4096)
    fn = torch.compile(lambda t: (t * 2 + 1) * 3, dynamic=False)
    fn(x)
    _, peak = profiled_peak(lambda: fn(x), baseline=[x])
    if peak is None:
        pytest.skip("this torch has no profiler memory timeline")
    assert peak == 2 * 4 * 4096  # the input and the one output buffer inductor fuses it into
    with PeakMemory([x]) as mem:
        torch.mul(x, 2)
    assert mem.peak_bytes == peak  # (the dispatcher sees an eager op's output the same)


def _mlp_run(fused):
    torch.manual_seed(0)
    model = MLP(30, [64, 64], 5)
    x, y = torch.rand(32, 30), torch.randint(0, 5, (32,))
    gen = torch.Generator().manual_seed(0)
    opt = ef.BayesAdam(model.parameters(), n_data=1000, fused=fused, generator=gen)

    def it():
        opt.zero_grad()
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        it()
    return model, opt, it, (x, y)


def test_measure_step_counts_the_compiled_step_and_leaves_it_compiled():
    """The fused optimizer is measured on its compiled kernels (no dispatch mode that would make
    torch.compile refuse them), stays fused, holds at least weights, gradients and its five state
    tensors, and needs no more than the eager path."""
    model, opt, it, batch = _mlp_run(True)
    if not opt.fused:
        pytest.skip("no working torch.compile here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, peak_fused = measure_step(it, model, opt, batch)
    assert opt.fused and not [w for w in caught if "BayesAdam" in str(w.message)]
    n_bytes = 4 * sum(p.numel() for p in model.parameters())
    state = sum(4 * t.numel() for t in optimizer_tensors(opt))
    assert state == 5 * n_bytes
    floor = 2 * n_bytes + state + sum(t.numel() * t.element_size() for t in batch)
    model_e, opt_e, it_e, batch_e = _mlp_run(False)
    _, peak_eager = measure_step(it_e, model_e, opt_e, batch_e)
    if profiled_peak(lambda: None)[1] is not None:
        assert floor <= peak_fused < peak_eager
    else:
        assert floor <= peak_fused


def test_measure_step_runs_the_step_once_without_the_profiler_timeline(monkeypatch):
    """In a torch without the profiler's memory timeline the fused step is counted at the
    dispatcher (BayesAdam runs its kernels' math uncompiled there), and still runs once."""
    from effortless.experiments import memory

    monkeypatch.setattr(memory, "_memory_timeline", lambda: None)
    model, opt, it, batch = _mlp_run(True)
    calls = []
    _, peak = measure_step(lambda: calls.append(1) or it(), model, opt, batch)
    assert calls == [1] and opt.fused
    n_bytes = 4 * sum(p.numel() for p in model.parameters())
    assert peak >= 7 * n_bytes  # weights, gradients, five state tensors


def test_profiled_peak_keeps_the_profilers_log_lines_off_stderr_and_passes_the_rest(capfd):
    import os

    x = torch.zeros(1000)
    kept = torch.ones(10)  # allocated before profiling, freed inside it: the allocator notes that

    def fn():
        nonlocal kept
        os.write(2, b"a line of the user's\n")  # straight to the file descriptor, as C++ code writes
        kept = None
        return x + x

    _, peak = profiled_peak(fn, baseline=[x])
    if peak is None:
        pytest.skip("this torch has no profiler memory timeline")
    err = capfd.readouterr().err
    assert "a line of the user's" in err
    assert "profiler_start" not in err and "SyncActivityProfilerHandler" not in err
    assert "Memory block of unknown size" not in err
