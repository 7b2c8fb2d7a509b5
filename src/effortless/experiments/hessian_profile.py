"""`effortless hessian-profile`: what each curvature quantity costs, against model size.

For MLPs 784-w-w-10 (batch 128, one CPU thread by default), every quantity is timed in its own
steady state, alternating with a plain forward+backward on the same inputs (fwd+bwd, quantity,
fwd+bwd, quantity, ... as a training loop would repeat it), and reported as the median over
repetitions of the paired ratio t(quantity) / t(the forward+backward just before it). Timing
all quantities in one cycle instead let each one's neighbours (the torch.func rows take hundreds
of forward+backwards; BackPACK runs on a copy of the model) move the ratios by 10-15 %. "+grad"
quantities also produce the training gradient (what an optimizer step needs), so their ratio is
the full cost of a curvature-aware step. Peak memory is counted at the dispatcher (all tensor
bytes alive during the call). Peer rows on the same model and batch are added when the packages
are installed (``scripts/setup.sh --peers``): BackPACK's diagonal GGN / MC GGN / gradient squares /
KFAC, curvlinops' GGN- and Hessian-vector products and KFAC factors, and laplace-torch's
all-weights diagonal fit with its default backend (up to ``LAPLACE_TORCH_MAX_PARAMS`` weights,
with ``SLOW_REPS`` repetitions: seconds per call).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import likelihoods
from ..curvature import engine, functional, operators
from ..models import MLP
from .memory import PeakMemory

FUNC_MAX_PARAMS = 300_000  # the torch.func rows are skipped above this size (minutes per call)
LAPLACE_TORCH_MAX_PARAMS = 300_000  # laplace-torch's all-weights diagonal fit: seconds per call
SLOW_REPS = 3  # warm-up 1 and this many repetitions for the rows named in SLOW
SLOW = {"laplace-torch diag GGN fit (default backend)"}
PEER_OR_GENERIC = ("torch.func", "BackPACK", "curvlinops", "laplace-torch")  # dashed in the plot
GOALS = {"ggn+grad": 2.0, "ggn-mc+grad": 1.5, "efisher+grad": 1.3, "kfac-mc+grad": 2.0}
BF16 = ", bf16 products"  # the same quantity with product_dtype=torch.bfloat16


def quantities(model, x, y) -> dict[str, Callable[[], object]]:
    """name -> a closure computing that quantity on (model, x, y)."""
    plan = engine.plan(model)
    gen = torch.Generator().manual_seed(0)
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    lik = likelihoods.get("classification")

    def with_grad(kind, product_dtype=None):
        def run():
            model.zero_grad(set_to_none=True)
            return functional.training_pass(model, x, y, lik, plan, kind, gen, product_dtype=product_dtype)

        return run

    def cg10():
        def matvec(u):
            g = operators.gvp(model, x, y, u)
            return {k: g[k] + 1.0 * u[k] for k in u}

        with warnings.catch_warnings():  # ten iterations, always "not converged" at tol=0: timed, not used
            warnings.simplefilter("ignore", RuntimeWarning)
            return operators.cg(matvec, v, tol=0.0, maxiter=10)

    out = {
        "fwd+bwd": fwd_bwd,
        "efisher+grad": with_grad("efisher"),
        "ggn-mc+grad": with_grad("ggn-mc"),
        "ggn+grad": with_grad("ggn"),
        "kfac-mc+grad": with_grad("kfac-mc"),
        **{f"{k}+grad{BF16}": with_grad(k, torch.bfloat16) for k in ("efisher", "ggn-mc", "ggn", "kfac-mc")},
        "hutchinson, 1 probe": lambda: functional.diag_hutchinson(model, x, y, generator=gen),
        "hvp": lambda: functional.hvp(model, x, y, v),
        "gvp": lambda: operators.gvp(model, x, y, v),
        "cg, 10 gvp": cg10,
    }
    n_params = sum(p.numel() for p in model.parameters())
    if n_params <= FUNC_MAX_PARAMS:  # the generic path is slow
        out["ggn (torch.func)"] = lambda: functional.diag_ggn(model, x, y, backend="func")
        out["efisher (torch.func)"] = lambda: functional.diag_efisher(model, x, y, backend="func")
    out.update(_backpack_quantities(model, x, y))
    out.update(_curvlinops_quantities(model, x, y))
    if n_params <= LAPLACE_TORCH_MAX_PARAMS:
        out.update(_laplace_torch_quantities(model, x, y))
    return out


def _curvlinops_quantities(model, x, y):
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator, KFACLinearOperator
    except ImportError:
        return {}
    params = [p for p in model.parameters() if p.requires_grad]
    lossf = torch.nn.CrossEntropyLoss(reduction="sum")  # the sum, as effortless' operators
    data = [(x, y)]
    ggn = GGNLinearOperator(model, lossf, params, data, check_deterministic=False)
    hess = HessianLinearOperator(model, lossf, params, data, check_deterministic=False)
    v = [torch.randn_like(p) for p in params]

    def kfac():
        op = KFACLinearOperator(model, lossf, params, data, check_deterministic=False)
        op.compute_kronecker_factors()
        return op

    return {
        "curvlinops GGN matvec": lambda: ggn @ v,
        "curvlinops Hessian matvec": lambda: hess @ v,
        "curvlinops KFAC (MC) factors": kfac,
    }


def _laplace_torch_quantities(model, x, y):
    try:
        from laplace import Laplace
    except ImportError:
        return {}
    lmodel = copy.deepcopy(model)  # laplace-torch may attach hooks (its backends): keep them off ours
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))

    def fit():
        la = Laplace(lmodel, "classification", subset_of_weights="all", hessian_structure="diag")
        la.fit(loader, progress_bar=False)
        return la

    return {"laplace-torch diag GGN fit (default backend)": fit}


def _backpack_quantities(model, x, y):
    try:
        from backpack import backpack, extend
        from backpack.extensions import KFAC, DiagGGNExact, DiagGGNMC, SumGradSquared
    except ImportError:
        return {}
    bmodel = extend(copy.deepcopy(model))  # BackPACK adds backward hooks in place: keep them off ours
    lossf = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

    def run(ext):
        def fn():
            bmodel.zero_grad(set_to_none=True)
            with backpack(ext()):
                lossf(bmodel(x), y).backward()

        return fn

    return {
        "BackPACK DiagGGNExact+grad": run(DiagGGNExact),
        "BackPACK DiagGGNMC+grad": run(DiagGGNMC),
        "BackPACK SumGradSquared+grad": run(SumGradSquared),
        "BackPACK KFAC (MC)+grad": run(KFAC),
    }


def profile(widths=(1, 8, 32, 128, 256, 512, 1024), batch=128, reps=30, warmup=3, progress=True, log=print):
    for name, v in (("batch", batch), ("reps", reps), *(("widths", w) for w in widths)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be positive ints, got {v!r}")
    rows = []
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it = tqdm(widths, desc="hessian-profile", unit="width") if (progress and tqdm) else widths
    for w in it:
        torch.manual_seed(0)
        model = MLP(784, [w, w], 10)
        x = torch.rand(batch, 784)
        y = torch.randint(0, 10, (batch,))
        qs = quantities(model, x, y)
        n_params = sum(p.numel() for p in model.parameters())
        r = max(3, reps if n_params < 2e6 else reps // 3)
        times = {k: [] for k in qs}
        bases = {k: [] for k in qs}  # the forward+backward timed just before each quantity
        fb = qs["fwd+bwd"]
        for k, fn in qs.items():  # one quantity at a time, in its steady state
            for _ in range(1 if k in SLOW else warmup):
                fb()
                fn()
            for _ in range(min(r, SLOW_REPS) if k in SLOW else r):
                t0 = time.perf_counter()
                fb()
                t1 = time.perf_counter()
                fn()
                t2 = time.perf_counter()
                bases[k].append(t1 - t0)
                times[k].append(t2 - t1)
        for k, fn in qs.items():
            baseline = list(model.parameters()) + [x, y]
            with PeakMemory(baseline) as mem:
                fn()
            rows.append(
                dict(
                    width=w,
                    n_params=n_params,
                    batch=batch,
                    quantity=k,
                    ms=1000 * statistics.median(times[k]),
                    ratio=statistics.median([t / b for t, b in zip(times[k], bases[k])]),
                    peak_mb=(mem.peak_bytes - 4 * (n_params + x.numel()) - 8 * y.numel()) / 2**20,
                )
            )
    return rows


def write(rows, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    widths = sorted({r["width"] for r in rows})
    names = list(dict.fromkeys(r["quantity"] for r in rows))
    cell = {(r["quantity"], r["width"]): r for r in rows}
    n_params = {r["width"]: r["n_params"] for r in rows}
    lines = [
        "# hessian-profile",
        "",
        f"MLP 784-w-w-10, batch {rows[0]['batch']}; time as a multiple of the forward+backward run "
        "just before it, each quantity alternating with forward+backwards in its own steady state "
        "(median of paired ratios); peak extra memory in MiB beside it.",
        "",
        "| quantity | " + " | ".join(f"w={w} ({n_params[w]:,} params)" for w in widths) + " |",
        "|---|" + "---|" * len(widths),
    ]
    for q in names:
        cells = [
            f"{cell[(q, w)]['ratio']:.2f}× / {cell[(q, w)]['peak_mb']:.1f}" if (q, w) in cell else "–"
            for w in widths
        ]
        lines.append(f"| {q} | " + " | ".join(cells) + " |")
    if 256 in widths:
        lines += ["", "Goals at 784-256-256-10 (issue #3):", "", "| quantity | goal | measured | met |",
                  "|---|---|---|---|"]  # fmt: skip
        for q0, goal in GOALS.items():
            for q in (q0, q0 + BF16):
                if (q, 256) in cell:
                    got = cell[(q, 256)]["ratio"]
                    met = "yes" if got <= goal else "**no**"
                    lines.append(f"| {q} | ≤ {goal:.1f}× | {got:.2f}× | {met} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, names, out / "profile.png")
    return "\n".join(lines)


def _plot(rows, names, path):
    import matplotlib

    from .plots import figure

    fig = figure(figsize=(9, 4.8))
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab20"].colors
    for i, q in enumerate(names):
        sel = sorted((r for r in rows if r["quantity"] == q), key=lambda r: r["n_params"])
        style = "--" if any(s in q for s in PEER_OR_GENERIC) else "-"
        ax.plot([r["n_params"] for r in sel], [r["ratio"] for r in sel], style, marker="o",
                color=colors[(2 * i) % 20 + (i // 10) % 2], label=q)  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="time / (forward + backward)",
           title="Curvature cost against model size (MLP 784-w-w-10)")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
