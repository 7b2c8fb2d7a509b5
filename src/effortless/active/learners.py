"""Learners for the active-learning loop: fit on the labelled set, return per-sample log-probs.

A learner is ``fit(x, y, seed, warm=None) -> Trained``. ``Trained.log_probs(x, n_samples,
generator)`` gives the (N, C, S) tensor the acquisition functions read; ``Trained.probs(x)`` the
point prediction used for the test-set evaluation after each round (cheap: one forward pass, or one
per ensemble member). ``warm`` is the previous round's ``Trained`` when warm-starting.

Training on a labelled set of n points runs ``max(min_steps, epochs · ⌈n / batch⌉)`` Adam-style
steps (lr 1e-3, minibatches of ``batch``), so the first rounds (20 labels) still train.

* ``map``: Adam, deterministic (S = 1: BALD is 0 everywhere; the non-Bayesian control);
* ``bayesadam``: :class:`~effortless.BayesAdam` (``n_data`` = labelled-set size) on the same
  network as ``mc-dropout``, trained with its dropout (p = ``dropout``) as a regulariser; the
  predictions and the (N, C, S) samples come from the weight posterior with dropout off, so the
  two learners differ in where their uncertainty comes from, not in the network (held-out
  training images: 74.0 / 85.7 / 90.7 % at 60 / 200 / 500 labels against 72.2 / 84.3 / 89.2 %
  without the dropout, MC dropout 72.9 / 84.9 / 90.5 %; ``docs/results/active-heldout.md``). Prior
  precision δ = 0.01 and temperature T = 5e-4 instead of the defaults (δ = 1, T = 0.01). With
  20–150 labels the default prior's pull on the mean, δ/N per step (0.05 at N = 20), keeps LeNet
  at chance on MNIST — so does plain Adam with that L2 (T = 0) — and the default temperature's
  weight noise adds to it (weights the data do not pin down get σ² ≈ T/δ). Measured (2,000 test
  images, one seed): N = 20 / 60 / 150 labels, Adam 58.7 / 71.7 / 81.8 %; δ = 1, T = 1e-3:
  9.7 / 65.0 / 81.7 %; δ = 0.01, T = 1e-4: 59.5 / 72.0 / 83.0 %. T is chosen on held-out
  training images (``python benchmarks/active_heldout.py``, the active loop's schedule,
  ``docs/results/active-heldout.md``), never the test set: at 20 / 200 labels, mean over seeds
  4–9, T = 1e-3 reaches 37.9 / 84.8 %, T = 5e-4 51.1 / 84.5 %, MC dropout 50.2 / 85.2 % (at 1e-3
  the prior-dominated noise σ² ≈ T/δ = 0.1 wrecks the first round); at 60 / 500 labels (seeds 4–6)
  1e-3 and 5e-4 are within 0.3 points. The learner used T = 1e-3 before (chosen at 60–500 labels,
  where it trains better than 1e-4: 71.96 / 84.68 / 89.15 % against 70.47 / 82.50 / 88.85 % at
  60 / 200 / 500), T = 3e-3 is at chance with
  60 labels on some seeds, and T = 1e-4 was used before 1e-3. Weight samples from
  ``posterior()``. Curvature: the default ``reparam``, although its estimate g ε / σ has noise
  growing as 1/σ ∝ 1/√T and at T = 1e-4 inflates h (``python benchmarks/active_curvature.py``:
  LeNet, 200 random MNIST labels, one round: h against the exact diagonal GGN / N, median ratio
  439 and Spearman 0.88 with ``reparam``, 2.0 and 0.93 with ``ggn-mc``). The closer curvature did
  not make better acquisitions at T = 1e-4: BALD with ``hessian="ggn-mc"`` (``--hessian ggn-mc``)
  needed 420 / 600 and 280 / 630 labels for 90 / 95 % test accuracy on repeats 0 and 1, against
  230 / 530 and 180 / 440 with ``reparam`` (the run was stopped after those two repeats);
* ``mc-dropout``: Adam with dropout (p = 0.25 by default), S dropout masks;
* ``ensemble``: 5 independently initialised Adam members (S = 5);
* ``laplace``: MAP, then a last-layer KFAC Laplace (evidence-tuned prior), S output-space draws
  of its linearised predictive.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import api
from .._checks import is_count, is_number
from ..curvature.estimators import ESTIMATORS
from ..optim import BayesAdam


@dataclass
class Trained:
    models: list[nn.Module]
    log_probs: Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]
    probs: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer | None = None


@dataclass
class TrainConfig:
    epochs: int = 50
    min_steps: int = 250
    batch: int = 64
    lr: float = 1e-3
    dropout: float = 0.25  # the network's: MC dropout's masks; BayesAdam trains with it (see above)
    members: int = 5
    temperature: float = 5e-4  # BayesAdam's (see the module docstring)
    prior_precision: float = 0.01
    hessian: str = "reparam"  # BayesAdam's curvature estimator (see the module docstring)
    eval_samples: int = 0  # test-set predictions: 0 = the mean network (dropout off); S = average S draws

    def __post_init__(self):  # checked here: a bad value failed only inside the first round's fit
        counts = {"epochs": 0, "min_steps": 0, "batch": 1, "members": 1, "eval_samples": 0}
        for name, least in counts.items():
            v = getattr(self, name)
            if not is_count(v, least):
                raise ValueError(f"TrainConfig: {name} must be an int >= {least}, got {v!r}")
            setattr(self, name, int(v))
        if self.epochs == 0 and self.min_steps == 0:
            raise ValueError("TrainConfig: epochs and min_steps are both 0: no training step")
        for name in ("lr", "prior_precision"):
            v = getattr(self, name)
            if not (is_number(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"TrainConfig: {name} must be a finite number > 0, got {v!r}")
        if not (is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"TrainConfig: temperature must be a finite number >= 0, got "
                             f"{self.temperature!r}")  # fmt: skip
        if not (is_number(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"TrainConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if self.hessian not in ESTIMATORS:
            raise ValueError(f"TrainConfig: hessian must be one of {sorted(ESTIMATORS)}, got "
                             f"{self.hessian!r}")  # fmt: skip


def _steps(n, cfg):
    return max(cfg.min_steps, cfg.epochs * math.ceil(n / cfg.batch))


def _batches(x, y, cfg, seed):
    """An endless stream of shuffled minibatches (reshuffled every pass), seeded. Every batch is
    full (``min(batch, n)`` examples): the remainder of a pass is dropped, because a 2-example
    batch at 130 labels (64 + 64 + 2) was enough to wreck a round (LeNet on MNIST: 44 % test
    accuracy for BayesAdam, 64 % for Adam, against about 80 % either side of it)."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    b = min(cfg.batch, n)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - b + 1, b):
            j = perm[i : i + b]
            yield x[j], y[j]


def _chunked(fn, x, chunk=2048):
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def _adam(make_model, x, y, seed, cfg, dropout, warm_model=None):
    torch.manual_seed(seed)
    model = make_model(dropout)
    if warm_model is not None:
        model.load_state_dict(warm_model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    stream = _batches(x, y, cfg, seed)
    for _ in range(_steps(len(x), cfg)):
        xb, yb = next(stream)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    model.eval()
    return model, opt


def _eval_probs(model):
    def probs(x):
        model.eval()
        with torch.no_grad():
            return _chunked(lambda xb: model(xb).softmax(-1), x)

    return probs


def make_learner(name: str, make_model: Callable[[float], nn.Module], cfg: TrainConfig | None = None):
    """The learner called ``name`` (one of :data:`LEARNERS`) for networks built by ``make_model(p)``."""
    if name not in LEARNERS:
        raise ValueError(f"method must be one of {sorted(LEARNERS)}, got {name!r}")
    cfg = cfg or TrainConfig()
    return lambda x, y, seed, warm=None: LEARNERS[name](make_model, x, y, seed, cfg, warm)


def fit_map(make_model, x, y, seed, cfg, warm):
    model, opt = _adam(make_model, x, y, seed, cfg, 0.0, warm.models[0] if warm else None)

    def log_probs(xq, n_samples, generator=None):
        with torch.no_grad():
            return _chunked(lambda xb: model(xb).log_softmax(-1), xq)[:, :, None]

    return Trained([model], log_probs, _eval_probs(model), opt)


def _averaged(log_probs, cfg, seed, fallback):
    """Test-set probabilities: the learner's point prediction, or with ``cfg.eval_samples`` = S > 0
    the average of S predictive draws (seeded, so a resumed run evaluates the same way)."""
    if cfg.eval_samples <= 0:
        return fallback

    def probs(xq):
        g = torch.Generator().manual_seed(10_007 * seed + 1)
        return log_probs(xq, cfg.eval_samples, g).exp().mean(-1)

    return probs


def fit_mc_dropout(make_model, x, y, seed, cfg, warm):
    model, opt = _adam(make_model, x, y, seed, cfg, cfg.dropout, warm.models[0] if warm else None)

    def log_probs(xq, n_samples, generator=None):
        if generator is not None:  # dropout masks come from the global RNG: seed it from the generator
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        model.train()
        try:
            with torch.no_grad():
                return _chunked(
                    lambda xb: torch.stack([model(xb).log_softmax(-1) for _ in range(n_samples)], -1), xq
                )
        finally:
            model.eval()

    return Trained([model], log_probs, _averaged(log_probs, cfg, seed, _eval_probs(model)), opt)


def fit_ensemble(make_model, x, y, seed, cfg, warm):
    members = [
        _adam(make_model, x, y, 1000 * seed + i, cfg, 0.0, warm.models[i] if warm else None)[0]
        for i in range(cfg.members)
    ]

    def log_probs(xq, n_samples, generator=None):
        with torch.no_grad():
            return torch.stack([_chunked(lambda xb, m=m: m(xb).log_softmax(-1), xq) for m in members], -1)

    def probs(xq):
        return torch.stack([_eval_probs(m)(xq) for m in members]).mean(0)

    return Trained(members, log_probs, probs)


def fit_bayesadam(make_model, x, y, seed, cfg, warm):
    torch.manual_seed(seed)
    model = make_model(cfg.dropout)  # MC dropout's network; its dropout is off when predicting
    if warm is not None:
        model.load_state_dict(warm.models[0].state_dict())
    # the last iterate (averaging=None) and fresh noise every pair (noise_reuse=1): the learner
    # measured in docs/results/active-mnist-dropout.md, before BayesAdam averaged its means and reused
    # its noise by default; neither is measured for active learning
    opt = BayesAdam(model.named_parameters(), n_data=len(x), lr=cfg.lr, temperature=cfg.temperature,
                    prior_precision=cfg.prior_precision, hessian=cfg.hessian, averaging=None, noise_reuse=1,
                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
    if warm is not None and warm.optimizer is not None:  # keep the curvature; the data size changed
        old = warm.optimizer.state_dict()
        old["param_groups"][0]["n_data"] = len(x)
        opt.load_state_dict(old)
    model.train()
    stream = _batches(x, y, cfg, seed)
    for _ in range(_steps(len(x), cfg)):
        xb, yb = next(stream)
        opt.train_step(model, xb, yb)
    model.eval()
    post = opt.posterior()

    def log_probs(xq, n_samples, generator=None):
        return _chunked(lambda xb: api.predict_samples(model, post, xb, n_samples, generator=generator), xq)

    return Trained([model], log_probs, _averaged(log_probs, cfg, seed, _eval_probs(model)), opt)


def fit_laplace(make_model, x, y, seed, cfg, warm):
    model, opt = _adam(make_model, x, y, seed, cfg, 0.0, warm.models[0] if warm else None)
    post = api.laplace(model, [(x, y)], hessian="kfac", subset="last_layer", prior_precision="marglik")

    def log_probs(xq, n_samples, generator=None):
        return _chunked(
            lambda xb: api.predict_samples(model, post, xb, n_samples, method="glm", generator=generator), xq
        )

    return Trained([model], log_probs, _eval_probs(model), opt)


LEARNERS = {
    "map": fit_map,
    "bayesadam": fit_bayesadam,
    "mc-dropout": fit_mc_dropout,
    "ensemble": fit_ensemble,
    "laplace": fit_laplace,
}
