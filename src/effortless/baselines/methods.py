"""Method implementations for the benchmark: MAP, BayesAdam (any Hessian key), MC dropout, deep
ensembles, temperature scaling, post-hoc last-layer KFAC Laplace, adam-laplace, SWAG
(:mod:`.swag`), mean-field VI (:mod:`.vi`, Linear layers), and the peers IVON and laplace-torch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import api
from ..curvature import estimators
from ..data import Split, loader
from ..experiments.memory import measure_step
from ..experiments.train import RunResult, train
from ..posterior.from_adam import posterior_from_adam


@dataclass
class Fitted:
    predict: Callable[[torch.Tensor], torch.Tensor]  # x -> probs (B, C)
    train_seconds: float
    step_ms: float
    peak_mem_mb: float | None = None  # all tensor memory during one training step (one member)
    train_loss: list[float] | None = None  # mean training loss per epoch (first member)


def _chunked(fn, x, chunk=2000):
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def _softmax(model):
    def predict(x):
        with torch.no_grad():
            model.eval()
            return _chunked(lambda xb: model(xb).softmax(-1), x)

    return predict


def _run(task, split, seed, epochs, progress, method="map", dropout=0.0, **kwargs) -> RunResult:
    """The shared training run of the task's network (memory measured), MAP or BayesAdam."""
    return train(method, lambda: task.model(dropout), split, epochs=epochs, batch_size=task.batch_size,
                 seed=seed, progress=progress, measure_memory=True, **kwargs)  # fmt: skip


def _map_run(task, split, seed, epochs, progress, dropout=0.0) -> RunResult:
    return _run(task, split, seed, epochs, progress, dropout=dropout)


def fit_map(task, split, seed, epochs, progress):
    run = _map_run(task, split, seed, epochs, progress)
    return Fitted(_softmax(run.model), run.train_seconds, run.step_ms, run.peak_mem_mb, run.history)


def make_bayesadam(key):
    def fit(task, split, seed, epochs, progress):
        run = _run(task, split, seed, epochs, progress, method="bayesadam", hessian=key)

        def predict(x):
            gen = torch.Generator().manual_seed(seed)
            return _chunked(
                lambda xb: api.predict(run.model, run.posterior, xb, n_samples=32, generator=gen), x
            )

        return Fitted(predict, run.train_seconds, run.step_ms, run.peak_mem_mb, run.history)

    return fit


def fit_mc_dropout(task, split, seed, epochs, progress, p=0.2, samples=30):
    run = _map_run(task, split, seed, epochs, progress, dropout=p)
    model = run.model

    def predict(x):
        torch.manual_seed(seed)
        model.train()  # dropout on
        with torch.no_grad():
            out = _chunked(lambda xb: torch.stack([model(xb).softmax(-1) for _ in range(samples)]).mean(0), x)
        model.eval()
        return out

    return Fitted(predict, run.train_seconds, run.step_ms, run.peak_mem_mb, run.history)


def fit_ensemble(task, split, seed, epochs, progress, members=5):
    runs = [_map_run(task, split, 1000 * seed + i, epochs, progress) for i in range(members)]

    def predict(x):
        return torch.stack([_softmax(r.model)(x) for r in runs]).mean(0)

    return Fitted(
        predict, sum(r.train_seconds for r in runs), sum(r.step_ms for r in runs), runs[0].peak_mem_mb,
        runs[0].history,
    )


def fit_temperature(task, split, seed, epochs, progress, n_val=0.1):
    """MAP on 90 % of the training set, then one temperature fitted on the held-out 10 % by NLL."""
    n = len(split.x_train)
    k = int(n * (1 - n_val))
    train_split = Split(
        split.name, split.x_train[:k], split.y_train[:k], split.x_test, split.y_test, split.n_classes
    )
    run = _map_run(task, train_split, seed, epochs, progress)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = run.model.eval()(split.x_train[k:])
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), split.y_train[k:])
        loss.backward()
        return loss

    opt.step(closure)
    temp = float(log_t.detach().exp())

    def predict(x):
        with torch.no_grad():
            return _chunked(lambda xb: (run.model(xb) / temp).softmax(-1), x)

    return Fitted(predict, run.train_seconds + time.perf_counter() - t0, run.step_ms, run.peak_mem_mb,
                  run.history)  # fmt: skip


def fit_laplace(task, split, seed, epochs, progress):
    """MAP, then effortless' last-layer KFAC Laplace with the evidence-tuned prior, probit predictive."""
    run = _map_run(task, split, seed, epochs, progress)
    t0 = time.perf_counter()
    post = api.laplace(
        run.model,
        loader(split.x_train, split.y_train, 512, shuffle=False),
        hessian="kfac",
        subset="last_layer",
        prior_precision="marglik",
    )
    extra = time.perf_counter() - t0
    return Fitted(
        lambda x: api.predict(run.model, post, x, method="probit"),
        run.train_seconds + extra,
        run.step_ms,
        run.peak_mem_mb,
        run.history,
    )


def fit_laplace_diag(task, split, seed, epochs, progress):
    """MAP, then effortless' all-weights diagonal Laplace (exact diagonal GGN from the hook engine,
    evidence-tuned prior), probit predictive through the linearised covariance."""
    run = _map_run(task, split, seed, epochs, progress)
    t0 = time.perf_counter()
    post = api.laplace(run.model, loader(split.x_train, split.y_train, 512, shuffle=False), hessian="ggn",
                       prior_precision="marglik")  # fmt: skip
    extra = time.perf_counter() - t0

    def predict(x):
        return _chunked(lambda xb: api.predict(run.model, post, xb, method="probit"), x, 500)

    return Fitted(predict, run.train_seconds + extra, run.step_ms, run.peak_mem_mb, run.history)


def fit_adam_laplace(task, split, seed, epochs, progress):
    """MAP with Adam, then posterior_from_adam (evidence-tuned prior), probit: no extra data pass."""
    run = _map_run(task, split, seed, epochs, progress)
    post = posterior_from_adam(run.model, run.optimizer, len(split.x_train), task.batch_size, "marglik")

    def predict(x):
        return _chunked(lambda xb: api.predict(run.model, post, xb, method="probit"), x, 500)

    return Fitted(predict, run.train_seconds, run.step_ms, run.peak_mem_mb, run.history)


def fit_laplace_torch(task, split, seed, epochs, progress):
    """The peer: MAP, then laplace-torch's last-layer KFAC Laplace, marglik prior, probit GLM."""
    from laplace import Laplace

    run = _map_run(task, split, seed, epochs, progress)
    t0 = time.perf_counter()
    la = Laplace(run.model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(split.x_train, split.y_train),
                                       batch_size=512))  # fmt: skip
    la.optimize_prior_precision(method="marglik")
    extra = time.perf_counter() - t0

    def predict(x):
        with torch.no_grad():
            return _chunked(lambda xb: la(xb, pred_type="glm", link_approx="probit"), x, 1000)

    return Fitted(predict, run.train_seconds + extra, run.step_ms, run.peak_mem_mb, run.history)


def fit_ivon(task, split, seed, epochs, progress, lr=0.1, hess_init=0.1, samples=30):
    import ivon

    torch.manual_seed(seed)
    model = task.model(0.0)
    opt = ivon.IVON(model.parameters(), lr=lr, ess=len(split.x_train), hess_init=hess_init)
    data = loader(split.x_train, split.y_train, batch_size=task.batch_size, seed=seed)

    def one_step(x, y):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        return loss

    steps, peak, t0, history = 0, None, time.perf_counter(), []
    for _ in range(epochs):
        total = 0.0
        for x, y in data:
            if steps == 3:
                t1 = time.perf_counter()
                loss, peak = measure_step(lambda x=x, y=y: one_step(x, y), model, opt, (x, y))
                peak /= 2**20
                t0 += time.perf_counter() - t1
            else:
                loss = one_step(x, y)
            total += float(loss.detach()) * len(x)
            steps += 1
        history.append(total / len(split.x_train))
    seconds = time.perf_counter() - t0

    def predict(x):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs = []
            for _ in range(samples):
                with opt.sampled_params():
                    outs.append(_chunked(lambda xb: model(xb).softmax(-1), x))
            return torch.stack(outs).mean(0)

    return Fitted(predict, seconds, 1000 * seconds / max(steps, 1), peak, history)


METHODS: dict[str, Callable] = {
    "map": fit_map,
    "bayesadam": make_bayesadam("reparam"),
    **{f"bayesadam-{k}": make_bayesadam(k) for k in estimators.ESTIMATORS},
    "mc-dropout": fit_mc_dropout,
    "ensemble": fit_ensemble,
    "temperature": fit_temperature,
    "laplace": fit_laplace,
    "laplace-diag": fit_laplace_diag,
    "adam-laplace": fit_adam_laplace,
    "swag": lambda *a, **k: _swag().fit_swag(*a, **k),
    "vi": lambda *a, **k: _vi().fit_vi(*a, **k),
    "ivon": fit_ivon,
    "laplace-torch": fit_laplace_torch,
}


def _swag():
    from . import swag

    return swag


def _vi():
    from . import vi

    return vi


def available(name: str) -> str | None:
    """Why ``name`` cannot run here, or None."""
    if name not in METHODS:
        return f"unknown method (choose from {', '.join(METHODS)})"
    if name == "ivon":
        try:
            import ivon  # noqa: F401
        except ImportError:
            return "ivon-opt is not installed (scripts/setup.sh --peers)"
    if name == "laplace-torch":
        try:
            import laplace  # noqa: F401
        except ImportError:
            return "laplace-torch is not installed (scripts/setup.sh --peers)"
    return None
