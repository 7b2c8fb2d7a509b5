"""`effortless adam-hessian`: how well does Adam's state approximate the Hessian diagonal?

Trains a network with Adam (lr 1e-3) and, side by side from the same initialisation and data
order, BayesAdam (defaults). Every ``every`` steps it compares, on a fixed probe set of training
examples, per layer:

* ``adam v̂``: Adam's raw bias-corrected second moment (what is often taken as "the Hessian");
* ``adam F̂``: the per-sample empirical Fisher implied by Adam's moments (:func:`posterior_from_adam`);
* ``bayesadam[KEY] h``: BayesAdam's running curvature, one run per Hessian key in ``keys``
  (default ``reparam`` and ``ggn-mc``; any of :data:`effortless.curvature.estimators.ESTIMATORS`);

against the exact diagonal GGN, the exact empirical Fisher and the Hessian diagonal (Hutchinson,
many probes) at Adam's current weights (BayesAdam's h against references at its own weights), as
per-sample averages. Reported: Pearson and Spearman correlation of the log values, and the median
ratio estimate/reference. At the end every estimate is *used* as a posterior and evaluated on the
test set (accuracy, NLL, ECE, probit predictive) against MAP: ``adam-laplace`` (MAP +
``posterior_from_adam`` with the evidence-tuned prior), the naive ``N·v̂`` precision with the same
kind of prior, and each BayesAdam run's own ``posterior()``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import curvature, data, metrics
from ..api import predict
from ..curvature.estimators import ESTIMATORS
from ..optim import BayesAdam
from ..posterior.diag import DiagGaussian
from ..posterior.evidence import tune_prior_precision
from ..posterior.from_adam import posterior_from_adam
from .tasks import TASKS as REGISTRY

TASKS = ("fmnist-mlp", "fmnist-cnn", "mnist1d-mlp")  # from the registry in experiments/tasks.py


def _rank(x):
    r = torch.empty_like(x)
    r[torch.argsort(x)] = torch.arange(len(x), dtype=x.dtype)
    return r


def compare(est: torch.Tensor, ref: torch.Tensor) -> dict:
    """Pearson / Spearman correlation of log values, the median ratio and the median relative error
    |est − ref| / ref, over one tensor."""
    e, r = est.double().reshape(-1).clamp_min(1e-12), ref.double().reshape(-1).clamp_min(1e-12)
    le, lr = e.log(), r.log()
    pearson = float(torch.corrcoef(torch.stack([le, lr]))[0, 1])
    spearman = float(torch.corrcoef(torch.stack([_rank(le), _rank(lr)]))[0, 1])
    return {"pearson_log": pearson, "spearman": spearman, "median_ratio": float((e / r).median()),
            "median_rel_error": float(((e - r).abs() / r).median())}  # fmt: skip


def _references(model, x, y, probes, gen):
    n = x.shape[0]
    ggn = curvature.diag_ggn(model, x, y)
    ef = curvature.diag_efisher(model, x, y)
    hess = curvature.diag_hutchinson(model, x, y, n_probes=probes, generator=gen)
    return {
        k: {n_: t / n for n_, t in d.items()} for k, d in (("ggn", ggn), ("efisher", ef), ("hessian", hess))
    }


def run(
    task="fmnist-mlp",
    epochs=2,
    every=200,
    batch_size=128,
    probe=512,
    probes=32,
    seed=0,
    out="runs/adam-hessian",
    log=print,
    subset=None,
    keys=("reparam", "ggn-mc"),
):
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    keys = tuple(keys)
    bad = [k for k in keys if k not in ESTIMATORS]
    if bad or len(set(keys)) != len(keys):
        raise ValueError(f"keys must be distinct Hessian keys from {sorted(ESTIMATORS)}, got {list(keys)}")
    if every < 1 or epochs < 1:
        raise ValueError(f"every and epochs must be >= 1, got every={every}, epochs={epochs}")
    spec = REGISTRY[task]
    split = spec.load()
    if subset:
        split = split.subset(subset, None)
    n_data = len(split.x_train)
    total = epochs * -(-n_data // batch_size)  # (the loader keeps the last, short batch)
    if every > total:  # (found only after the whole training run before)
        raise ValueError(
            f"every={every} is more than the {total} steps of {epochs} epoch(s) over {n_data} examples in "
            f"batches of {batch_size}: no comparison would be made; lower --every"
        )
    torch.manual_seed(seed)
    adam_model = spec.model(0.0)
    adam = torch.optim.Adam(adam_model.parameters(), lr=1e-3)
    runs = {}  # key -> (model, BayesAdam), all from Adam's initialisation
    for key in keys:
        m = spec.model(0.0)
        m.load_state_dict(adam_model.state_dict())
        opt = BayesAdam(m.named_parameters(), n_data=n_data, hessian=key,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
        runs[key] = (m, opt)
    estimates = ["adam v̂", "adam F̂", *(f"bayesadam[{k}] h" for k in keys)]
    loader = data.loader(split.x_train, split.y_train, batch_size=batch_size, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randperm(n_data, generator=g)[:probe]
    xp, yp = split.x_train[idx], split.y_train[idx]
    names = [n for n, _ in adam_model.named_parameters()]
    rows, step, t0 = [], 0, time.perf_counter()
    for epoch in range(epochs):
        for x, y in loader:
            adam.zero_grad()
            F.cross_entropy(adam_model(x), y).backward()
            adam.step()
            for m, opt in runs.values():
                opt.train_step(m, x, y)
            step += 1
            if step % every:
                continue
            ref_a = _references(adam_model, xp, yp, probes, g)
            q = posterior_from_adam(adam_model, adam, n_data, batch_size, prior_precision=1.0)
            params = dict(adam_model.named_parameters())
            est = {}
            for n in names:
                st = adam.state[params[n]]
                est[("adam v̂", n)] = (st["exp_avg_sq"] / (1 - 0.999 ** float(st["step"])), ref_a)
                est[("adam F̂", n)] = ((q.precision[n] - 1.0) / n_data, ref_a)
            for key, (m, opt) in runs.items():
                ref_b = _references(m, xp, yp, probes, g)
                mp = dict(m.named_parameters())
                for n in names:
                    est[(f"bayesadam[{key}] h", n)] = (opt.state[mp[n]]["hess"], ref_b)
            for (name, n), (e, ref) in est.items():
                for kind in ("ggn", "efisher", "hessian"):
                    rows.append(dict(task=task, step=step, epoch=epoch, layer=n, estimate=name,
                                     reference=kind, **compare(e, ref[kind][n])))  # fmt: skip
            rho = {e: _mean(rows, step, e, "ggn", "spearman") for e in estimates}
            log(f"step {step}: " + ", ".join(f"{e} vs ggn ρ={r:.2f}" for e, r in rho.items()))
    if not rows:
        raise ValueError(f"no comparison was made: every={every} is more than the {step} steps run")
    train_s = time.perf_counter() - t0
    final = _used_as_posterior(adam_model, adam, runs, split, batch_size, log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"rows": rows, "posteriors": final, "keys": list(keys), "seconds": train_s}, indent=2)
    )
    table = _table(rows, final, task, estimates)
    (out / "results.md").write_text(table + "\n")
    _plots(rows, adam_model, adam, xp, yp, split, batch_size, out, estimates)
    return rows, final, table


def _mean(rows, step, est, ref, key):
    sel = [r[key] for r in rows if r["step"] == step and r["estimate"] == est and r["reference"] == ref]
    return sum(sel) / max(len(sel), 1)


def _used_as_posterior(model, adam, runs, split, batch_size, log):
    """Test accuracy / NLL / ECE of MAP and of every estimate used as a diagonal posterior (probit)."""
    n_data = len(split.x_train)

    def probit(m, q):
        return torch.cat([predict(m, q, split.x_test[i : i + 1000], method="probit")
                          for i in range(0, len(split.x_test), 1000)])  # fmt: skip

    with torch.no_grad():
        preds = {"MAP (Adam)": (model(split.x_test).softmax(-1), None)}
    q = posterior_from_adam(model, adam, n_data, batch_size, prior_precision="marglik")
    preds["adam-laplace: N·F̂ (marglik, probit)"] = (probit(model, q), q.prior_precision)
    # the naive reading: Adam's v̂ as the per-sample curvature, same evidence-tuned prior
    mean, curv = {}, {}
    for n, p in model.named_parameters():
        st = adam.state[p]
        mean[n] = p.detach().clone()
        curv[n] = st["exp_avg_sq"] / (1 - adam.param_groups[0]["betas"][1] ** float(st["step"])) * n_data
    delta = tune_prior_precision(0.0, mean, curv)
    naive = DiagGaussian(mean, {n: c + delta for n, c in curv.items()})
    preds["naive: N·v̂ (marglik, probit)"] = (probit(model, naive), delta)
    for key, (m, opt) in runs.items():
        preds[f"bayesadam[{key}] posterior() (probit)"] = (probit(m, opt.posterior()), None)
    out = {}
    for name, (p, delta) in preds.items():
        out[name] = {
            "accuracy": metrics.accuracy(p, split.y_test),
            "nll": metrics.nll(p, split.y_test),
            "ece": metrics.ece(p, split.y_test),
            "prior_precision": delta,
        }
    log(json.dumps(out))
    return out


def _table(rows, final, task, estimates):
    last = max(r["step"] for r in rows)
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    lines = [
        f"# adam-hessian ({task}), step {last}",
        "",
        "Spearman correlation / median ratio estimate ÷ reference, per layer, at the last comparison.",
        "",
        "| estimate | reference | " + " | ".join(layers) + " |",
        "|---|---|" + "---|" * len(layers),
    ]
    for est in estimates:
        for ref in ("ggn", "efisher", "hessian"):
            cells = []
            for layer in layers:
                r = next(
                    r
                    for r in rows
                    if r["step"] == last
                    and r["estimate"] == est
                    and r["reference"] == ref
                    and r["layer"] == layer
                )
                cells.append(f"{r['spearman']:.2f} / {r['median_ratio']:.3g}")
            lines.append(f"| {est} | {ref} | " + " | ".join(cells) + " |")
    lines += ["", "Each estimate used as the posterior's curvature (test set):", "",
              "| posterior | acc % | NLL | ECE % |", "|---|---|---|---|"]  # fmt: skip
    for name, m in final.items():
        lines.append(f"| {name} | {100 * m['accuracy']:.2f} | {m['nll']:.4f} | {100 * m['ece']:.2f} |")
    return "\n".join(lines)


def _plots(rows, model, adam, xp, yp, split, batch_size, out, estimates):
    from .plots import figure

    fig = figure(figsize=(6, 4))
    ax = fig.subplots()
    steps = sorted({r["step"] for r in rows})
    for est in estimates:
        ax.plot(steps, [_mean(rows, s, est, "ggn", "spearman") for s in steps], marker="o", label=est)
    ax.set(xlabel="step", ylabel="Spearman vs exact diag GGN (mean over layers)", title="Curvature agreement")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "correlation.png", dpi=110)
    ggn = {n: t / xp.shape[0] for n, t in curvature.diag_ggn(model, xp, yp).items()}
    q = posterior_from_adam(model, adam, len(split.x_train), batch_size, prior_precision=1.0)
    weights = [n for n in ggn if n.endswith("weight")]
    fig = figure(figsize=(4 * len(weights), 3.6))
    axes = fig.subplots(1, len(weights), squeeze=False)
    for ax, n in zip(axes[0], weights):
        ref = ggn[n].reshape(-1).clamp_min(1e-12)
        est = ((q.precision[n] - 1.0) / len(split.x_train)).reshape(-1).clamp_min(1e-12)
        sel = torch.randperm(len(ref))[:3000]
        ax.loglog(ref[sel], est[sel], ".", ms=2, alpha=0.5)
        lo, hi = float(ref.min()), float(ref.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(title=n, xlabel="exact diag GGN", ylabel="Adam-implied F̂")
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=110)
