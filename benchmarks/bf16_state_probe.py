"""What-if: BayesAdam's Adam momentum m and curvature h kept in bfloat16 (the memory goal's path).

Not an option of the optimizer: this probe converts ``exp_avg`` and ``hess`` of an ordinary
``ef.BayesAdam`` to bf16 after its state exists (the fused kernels compute in float32 and round on
store, so they run unchanged), and measures on the MLP 784-256-256-10, batch 128, one thread:

* the peak tensor memory of a step beyond weights, gradients and the batch (as
  ``benchmarks/step_cost.py`` counts it), float32 state against bf16 m and h, with and without the
  averaged mean (which stays float32 here);
* the step time against ``torch.optim.Adam``: the three run in one interleaved cycle of blocks of
  10 iterations, medians of the per-repetition ratios;
* with ``--quality-seeds K``: Fashion-MNIST MLP (the defaults study's task, BayesAdam's defaults)
  accuracy / NLL / ECE with float32 and with bf16 m and h, K seeds each;
* with ``--kernels``: where the step time goes, the compiled step kernel alone
  (``reparam_step`` on the MLP's six tensors) with float32 state, m and h in bf16, and m, v
  and h in bf16, float32 followed by the averaging pass, m, h and the averaged mean's difference
  from μ in bf16 with the averaging inside the kernel (a sketch of another split of the state),
  and a one-tensor update in float32 and bf16, interleaved, medians.
  ``TORCH_LOGS=output_code`` shows the C++ inductor writes for each.

    python benchmarks/bf16_state_probe.py --reps 80 --quality-seeds 3
    python benchmarks/bf16_state_probe.py --reps 0 --kernels
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import effortless as ef
from effortless.experiments.memory import measure_step
from effortless.models import MLP
from effortless.optim import bayesadam

LOW = ("exp_avg", "hess")  # the state kept in bf16 by the probe


def _to_bf16(opt) -> None:
    for st in opt.state.values():
        for k in LOW:
            if k in st and st[k].dtype == torch.float32:
                st[k] = st[k].to(torch.bfloat16)


def _runner(kind: str, x, y, averaging=0.05):
    torch.manual_seed(0)
    model = MLP(784, [256, 256], 10)
    if kind == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def it():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return model, opt, it
    opt = ef.BayesAdam(model.parameters(), n_data=60000, averaging=averaging)

    def it():
        opt.zero_grad()
        with opt.sampled_params():
            F.cross_entropy(model(x), y).backward()
        opt.step()

    it()  # (the state exists after the first step)
    if kind == "bf16":
        _to_bf16(opt)
    for _ in range(4):
        it()
    return model, opt, it


def _quality(kind: str, seeds: int) -> dict:
    from effortless.experiments.defaults_study import TASKS
    from effortless.experiments.train import evaluate, train

    original = bayesadam.BayesAdam._state

    def state_bf16(self, group, p):
        st = original(self, group, p)
        if group["temperature"] > 0:
            for k in LOW:
                if st[k].dtype == torch.float32:
                    st[k] = st[k].to(torch.bfloat16)
        return st

    spec, rows = TASKS["fmnist-mlp"], []
    if kind == "bf16":
        bayesadam.BayesAdam._state = state_bf16
    try:
        for seed in range(seeds):
            split = spec.split(seed)
            run = train("bayesadam", lambda: spec.model(0.0), split, epochs=spec.epochs,
                        batch_size=spec.batch_size, seed=seed, progress=False)  # fmt: skip
            rows.append(evaluate(run, split))
    finally:
        bayesadam.BayesAdam._state = original
    return {k: statistics.fmean(r[k] for r in rows) for k in ("accuracy", "nll", "ece")}


def _kernel_times(reps: int = 200) -> dict:
    from effortless.optim import _fused

    sizes = [784 * 256, 256, 256 * 256, 256, 256 * 10, 10]
    f32, b16 = torch.float32, torch.bfloat16
    gen = torch.Generator().manual_seed(0)

    def tensors(dm, dv, dh):
        def r(scale=1.0):
            return [torch.randn(s, generator=gen) * scale for s in sizes]

        mu = r()
        return (mu, r(1e-2), [t.to(dm) for t in r(1e-3)], [(t * t).to(dv) for t in r(1e-2)],
                [(t.abs()).to(dh) for t in r(0.1)], r())  # fmt: skip

    # hp as the optimizer builds it: sign, N/T, δ/T, 1−β, riemann, δ/N, 1−β₁, β₂, 1−β₂, √bc₂, eps, −lr/bc₁,
    # and the dither of bf16 state's stochastic rounding
    hp = torch.tensor([1.0, 6e6, 100.0, 1e-3, 3.0, 1 / 6e4, 0.1, 0.999, 1e-3, 0.1, 1e-8, -1e-3, 0.3, 0.7])
    step = _fused.kernel("reparam_step")  # (ε given: repeated calls stay finite)
    cases = {"float32": tensors(f32, f32, f32), "m, h in bf16": tensors(b16, f32, b16),
             "m, v, h in bf16": tensors(b16, b16, b16)}  # fmt: skip
    calls = {k: (lambda a=args: step(*a, hp)) for k, args in cases.items()}

    # the averaged mean: a separate lerp pass after the kernel (what the optimizer does), or kept
    # in bf16 as its difference d = μ̄ − μ and updated inside the kernel, d ← (1 − w)(d + μ_old − μ)
    def step_with_difference(mus, gs, ms, vs, hs, es, ds, hp, w):
        for mu, g, m, v, h, e, d in zip(mus, gs, ms, vs, hs, es, ds):
            mu_old = mu.clone()
            _fused._reparam_step_math(mu, g, m, v, h, e, hp)
            d.copy_((1 - w) * (d.to(mu.dtype) + mu_old - mu))

    fold = torch.compile(step_with_difference, dynamic=True, fullgraph=True)
    w = torch.tensor(0.01)
    with_avg = tensors(f32, f32, f32)
    avg = [t.clone() for t in with_avg[0]]

    def then_average():
        step(*with_avg, hp)
        torch._foreach_lerp_(avg, with_avg[0], 0.01)

    calls["float32, then the averaging pass"] = then_average
    folded = (*tensors(b16, f32, b16), [torch.zeros(s, dtype=b16) for s in sizes])
    calls["m, h and μ̄ − μ in bf16, averaging in the kernel"] = lambda: fold(*folded, hp, w)
    with _fused._compile_settings(lowp=True):  # (as the optimizer's kernels compile with bf16 state)
        calls["m, h and μ̄ − μ in bf16, averaging in the kernel"]()

    def ema(m, g):  # one bf16 tensor and nothing else stored: inductor runs it 16 wide
        m.copy_(m + 0.1 * (g - m))

    ema_c = torch.compile(ema, dynamic=True)
    g = torch.randn(sum(sizes), generator=gen)
    for dtype, label in ((f32, "float32"), (b16, "bf16")):
        m = torch.zeros(sum(sizes), dtype=dtype)
        calls[f"m ← m + 0.1 (g − m) alone, {label}"] = lambda m=m: ema_c(m, g)
    for call in calls.values():  # (compiles once per dtype combination)
        call()
    times = {k: [] for k in calls}
    for _ in range(reps):
        for k, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=80, help="interleaved repetitions of 10 iterations")
    ap.add_argument("--quality-seeds", type=int, default=0, help="Fashion-MNIST MLP seeds (0: skip)")
    ap.add_argument("--kernels", action="store_true", help="time the step kernel alone per state dtype")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.kernels:
        print("| state | compiled kernel, ms (median) |\n|---|---|")
        for k, ms in _kernel_times().items():
            print(f"| {k} | {ms:.3f} |")
        if not args.reps:
            return
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    n = 269322
    batch = x.numel() + y.numel() * 8 / 4  # (the batch's bytes in float32 numbers)
    print("| state | averaged mean | peak beyond weights and gradients (× params) |")
    print("|---|---|---|")
    for kind in ("fp32", "bf16"):
        for averaging in (0.05, None):
            model, opt, it = _runner(kind, x, y, averaging)
            _, peak = measure_step(it, model, opt, (x, y))
            print(f"| {'float32' if kind == 'fp32' else 'm, h in bf16'} | {'yes' if averaging else 'no'} | "
                  f"{(peak / 4 - batch) / n - 2:.2f} |")  # fmt: skip
    its = {k: _runner(k, x, y)[2] for k in ("adam", "fp32", "bf16")}
    for f in its.values():
        for _ in range(20):
            f()
    ratios = {"fp32": [], "bf16": []}
    for _ in range(args.reps):
        t = {}
        for k, f in its.items():
            t0 = time.perf_counter()
            for _ in range(10):
                f()
            t[k] = time.perf_counter() - t0
        for k in ratios:
            ratios[k].append(t[k] / t["adam"])
    print(f"\nstep time × Adam (one interleaved cycle, {args.reps} reps of 10 iterations, medians): "
          f"float32 state {statistics.median(ratios['fp32']):.3f}, m and h in bf16 "
          f"{statistics.median(ratios['bf16']):.3f}")  # fmt: skip
    if args.quality_seeds:
        for kind in ("fp32", "bf16"):
            q = _quality(kind, args.quality_seeds)
            print(f"fmnist-mlp, {kind} state, {args.quality_seeds} seeds: accuracy "
                  f"{100 * q['accuracy']:.2f} %, NLL {q['nll']:.4f}, ECE {100 * q['ece']:.2f} %")  # fmt: skip


if __name__ == "__main__":
    main()
