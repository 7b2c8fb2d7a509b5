"""BayesAdam: Adam that trains a diagonal Gaussian posterior over the weights.

Math (per weight; ``N`` = ``n_data``, ``δ`` = prior precision, ``T`` = temperature):

    sample      θ = μ + σ ⊙ ε,   ε ~ N(0, I),   σ² = T / (N·h + δ)
    gradient    g = ∇ L̄(θ)                       (L̄: minibatch-mean negative log-likelihood)
    mean        g̃ = g + (δ/N)·μ                  (gradient of the per-sample negative log joint)
                m ← β₁ m + (1−β₁) g̃,   v ← β₂ v + (1−β₂) g̃²
                μ ← μ − lr · m̂ / (√v̂ + eps)      (Adam, with bias corrections m̂, v̂)
    curvature   h ← running average of ĥ, an estimate of diag E_q[∇²L̄] (``hessian=`` key, see
                :mod:`effortless.curvature.estimators`); for estimators that can be negative
                (``reparam``, ``hutchinson``) h starts at ``hess_init`` and follows the
                positivity-preserving update of IVON (Shen et al., 2024)
                h ← h − (1−β)(h − ĥ) + ½(1−β)²(h − ĥ)² / (h + δ/N);
                non-negative estimators forget ``hess_init`` at the first estimate. The average
                weighs all estimates equally until the EMA horizon 1/(1−β) and then
                exponentially (:func:`hess_beta_at`), so h tracks the data within a few hundred
                steps whatever ``hess_init`` (IVON's h can sit at its init for 1e5 steps).

At any time ``posterior()`` is ``N(μ, diag(T / (N·h + δ)))``: a Laplace-style posterior that
needs no extra pass. With ``temperature=0`` there is no noise and the mean update is exactly
``torch.optim.Adam(lr, betas, eps, weight_decay=δ/N)`` (tested).

The mean follows Adam rather than the Newton-like step of IVON/VOGN so that Adam's learning rate
and schedule carry over unchanged; Adam's second moment is kept for that purpose only, and the
curvature ``h`` is estimated separately for the posterior (issue #6 measures how close they are).

References:
    Khan et al. (2018), Fast and scalable Bayesian deep learning by weight-perturbation in Adam.
    Shen et al. (2024), Variational learning is effective for large deep networks (IVON).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim import Optimizer

from .. import likelihoods
from ..curvature import estimators
from ..posterior.diag import DiagGaussian

__all__ = ["BayesAdam", "bayesadam_update", "sample_noise"]

_NONFINITE = ("raise", "skip")


def hess_beta_at(beta: float | None, k: int, nonnegative: bool) -> float:
    """Weight on the old curvature at the k-th update (k ≥ 1).

    An equal-weight running average until the EMA horizon 1/(1−β) is reached, then the EMA:
    β_k = min(β, (k−1+c)/(k+c)). Non-negative estimators forget ``hess_init`` at once (c = 0);
    signed ones count it as one estimate (c = 1) so the positivity-preserving update is safe.
    ``beta=None`` keeps the running average forever.
    """
    c = 0 if nonnegative else 1
    run = (k - 1 + c) / (k + c)
    return run if beta is None else min(beta, run)


def sample_noise(
    h_eff: torch.Tensor, n_data: float, prior_precision: float, temperature: float, generator
) -> torch.Tensor:
    """``σ ⊙ ε`` with ``σ = √(T / (N·h + δ))``, ``ε`` drawn from ``generator``."""
    eps = torch.randn(h_eff.shape, generator=generator, dtype=h_eff.dtype, device=generator.device)
    eps = eps.to(h_eff.device)
    sigma = h_eff.mul(n_data).add_(prior_precision).rsqrt_().mul_(math.sqrt(temperature))
    return eps.mul_(sigma)


def bayesadam_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    hessians: list[torch.Tensor],
    hess_estimates: list[torch.Tensor | None],
    noises: list[torch.Tensor | None],
    *,
    step: int,
    hess_step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    hess_beta: float | None,
    n_data: float,
    prior_precision: float,
    temperature: float,
    nonnegative: bool,
) -> None:
    """One BayesAdam update, in place, on lists of tensors (the functional kernel).

    ``params`` hold the means μ. The curvature estimate of tensor i is ``hess_estimates[i]`` if
    given, else the reparameterisation estimate ``g ⊙ noises[i] / σ²`` if ``noises[i]`` (the
    applied θ − μ) is given, else its curvature is left unchanged. Buffers in ``hess_estimates``
    and ``noises`` are consumed (used as workspace). ``step``/``hess_step`` are the counts after
    this update; the caller has checked that everything is finite.
    """
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    wd = prior_precision / n_data
    beta = hess_beta_at(hess_beta, hess_step, nonnegative)
    for mu, g, m, v, h, hhat, noise in zip(
        params, grads, exp_avgs, exp_avg_sqs, hessians, hess_estimates, noises
    ):
        # curvature (first: the reparameterisation estimate needs σ from the old h)
        work = None
        if hhat is None and noise is not None and temperature > 0:
            prec_t = h.mul(n_data / temperature).add_(prior_precision / temperature)  # 1/σ²
            hhat = noise.mul_(g).mul_(prec_t)  # ĥ = g (θ − μ) / σ²
        elif hhat is not None and not nonnegative:
            prec_t = h.mul(n_data / temperature if temperature > 0 else n_data).add_(prior_precision)
        if hhat is not None:
            if nonnegative:
                h.lerp_(hhat, 1.0 - beta)
            else:
                # d = h − ĥ;  h ← h − (1−β) d + ½(1−β)² d² / (h + δ/N),  (h + δ/N) = T·prec_t/N
                d = torch.sub(h, hhat, out=hhat)
                h.add_(d, alpha=-(1.0 - beta))
                scale = n_data / (temperature if temperature > 0 else 1.0)
                h.addcdiv_(d.square_(), prec_t, value=0.5 * (1.0 - beta) ** 2 * scale)
            work = hhat
        if work is None:
            work = noise if noise is not None else torch.empty_like(mu)
        # mean: Adam on the per-sample negative log joint, in the workspace
        g_tot = torch.add(g, mu, alpha=wd, out=work)
        m.lerp_(g_tot, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g_tot, g_tot, value=1.0 - beta2)
        denom = torch.sqrt(v, out=work).div_(bc2_sqrt).add_(eps)
        mu.addcdiv_(m, denom, value=-lr / bc1)


class BayesAdam(Optimizer):
    """Adam whose weights are a Gaussian posterior: sample, take the gradient, update μ and h.

    Args:
        params: parameters or ``model.named_parameters()`` (then the posterior is keyed by name),
            or param-group dicts.
        n_data: number of training examples N (the likelihood's weight against the prior).
        lr, betas, eps: Adam's, for the mean (defaults as ``torch.optim.Adam``).
        prior_precision: δ of the Gaussian prior N(0, 1/δ) (float > 0); ``"auto"`` is reserved for
            online evidence tuning (not available yet: raises NotImplementedError).
        hessian: curvature estimator key (see :mod:`effortless.curvature.estimators`).
        hess_beta: weight of the old curvature in its running average (0 ≤ β < 1), or None for
            an equal-weight average over all steps.
        hess_init: curvature before the first estimate (per-sample units; sets the first σ).
        temperature: T scaling the posterior variance; 0 trains deterministically (plain Adam).
        mc_samples: weight samples per step in :meth:`train_step`.
        batch_size: minibatch size, needed by ``hessian="gradsq"`` when stepping without
            :meth:`train_step` (which knows it).
        generator: ``torch.Generator`` for the weight noise; default: a new one seeded once from
            the global RNG (so ``torch.manual_seed`` makes runs reproducible).
        nonfinite: ``"raise"`` (default) raises ``FloatingPointError`` on a non-finite gradient or
            loss; ``"skip"`` drops that step. Either way μ, the curvature and the weights are left
            untouched.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> opt = BayesAdam(model.named_parameters(), n_data=32)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     with opt.sampled_params(train=True):
        ...         F.cross_entropy(model(x), y).backward()
        ...     opt.step()
        >>> sorted(opt.posterior().precision)
        ['bias', 'weight']
    """

    def __init__(
        self,
        params,
        n_data: int,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        prior_precision: float | str = 1.0,
        hessian: str = "reparam",
        hess_beta: float | None = 0.999,
        hess_init: float = 0.1,
        temperature: float = 0.03,
        mc_samples: int = 1,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        nonfinite: str = "raise",
    ):
        if prior_precision == "auto":
            raise NotImplementedError(
                "prior_precision='auto' (online evidence tuning) is not available yet; "
                "pass a float, or tune it post hoc"
            )
        _check_positive("n_data", n_data)
        _check_positive("lr", lr, allow_zero=True)
        _check_positive("eps", eps, allow_zero=True)
        _check_positive("prior_precision", prior_precision)
        _check_positive("hess_init", hess_init, allow_zero=True)
        _check_positive("temperature", temperature, allow_zero=True)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
        if hess_beta is not None and not 0 <= hess_beta < 1:
            raise ValueError(f"hess_beta must be in [0, 1) or None, got {hess_beta!r}")
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.estimator = estimators.get(hessian)
        self.hessian = hessian
        self.mc_samples = mc_samples
        self.batch_size = batch_size
        self.nonfinite = nonfinite
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            n_data=float(n_data),
            prior_precision=float(prior_precision),
            hess_beta=hess_beta,
            hess_init=float(hess_init),
            temperature=float(temperature),
        )
        super().__init__(params, defaults)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is None:
            raise ValueError("params: the optimizer got no parameters")
        if generator is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            generator = torch.Generator(device=first.device).manual_seed(seed)
        self.generator = generator
        self.skipped_steps = 0
        self._inside = False
        self._clear_pending()

    # -- bookkeeping ---------------------------------------------------------------------------
    def _clear_pending(self):
        self._n_samples = 0  # weight samples drawn for training since the last step
        self._noise: dict[torch.Tensor, torch.Tensor] = {}  # θ − μ of the single pending sample
        self._grad_acc: dict[torch.Tensor, torch.Tensor] = {}  # with several samples
        self._hess_acc: dict[torch.Tensor, torch.Tensor] = {}  # summed ĥ over samples
        self._batch = None

    def _params(self) -> Iterator[tuple[dict, torch.Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    yield group, p

    def _state(self, group, p) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["hess_step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hess"] = torch.full_like(p, group["hess_init"], memory_format=torch.preserve_format)
        return state

    def _h_eff(self, group, p) -> torch.Tensor:
        return self._state(group, p)["hess"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget weight samples drawn since the last step."""
        super().zero_grad(set_to_none=set_to_none)
        self._clear_pending()

    # -- sampling ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def sampled_params(self, train: bool = True):
        """Load a posterior sample into the parameters; restore the means on exit, always.

        With ``train=True`` the sample is recorded for the next :meth:`step` (call ``backward``
        inside the block). Entering several times before ``step`` averages over the samples.
        """
        if self._inside:
            raise RuntimeError("sampled_params() contexts cannot be nested")
        if train and self._n_samples == 1:
            self._fold_pending()
        means: dict[torch.Tensor, torch.Tensor] = {}
        self._inside = True
        try:
            with torch.no_grad():
                for group, p in self._params():
                    if group["temperature"] == 0:
                        continue
                    noise = sample_noise(
                        self._h_eff(group, p),
                        group["n_data"],
                        group["prior_precision"],
                        group["temperature"],
                        self.generator,
                    )
                    means[p] = p.data
                    p.data = noise.add_(p.data)  # θ = μ + σε in a fresh buffer
            completed = False
            yield
            completed = True
        finally:
            with torch.no_grad():
                thetas = {}
                for p, mu in means.items():
                    thetas[p] = p.data
                    p.data = mu
            self._inside = False
        # only reached without an exception: record the sample
        if train and completed:
            for p, theta in thetas.items():
                theta.sub_(p.data)  # θ − μ, the noise actually applied
            self._record_sample(thetas)

    def _record_sample(self, noise: dict):
        if self._n_samples == 0:
            self._noise = noise
        else:
            self._accumulate(noise)
        self._n_samples += 1

    def _fold_pending(self):
        """Move the single pending sample into the accumulators (a second sample is coming)."""
        noise, self._noise = self._noise, {}
        self._accumulate(noise)

    def _accumulate(self, noise):
        for group, p in self._params():
            if p.grad is None:
                continue
            g = p.grad.detach()
            if p in self._grad_acc:
                self._grad_acc[p].add_(g)
            else:
                self._grad_acc[p] = g.clone()
            est = self._optimizer_side_estimate(group, p, g, noise.get(p))
            if est is not None:
                if p in self._hess_acc:
                    self._hess_acc[p].add_(est)
                else:
                    self._hess_acc[p] = est
            p.grad = None

    def _optimizer_side_estimate(self, group, p, g, noise):
        if self.hessian == "reparam":
            if noise is None or group["temperature"] == 0:
                return None
            prec = self._h_eff(group, p).mul(group["n_data"]).add_(group["prior_precision"])
            return noise.mul_(g).mul_(prec).div_(group["temperature"])  # noise is ours to reuse
        if self.hessian == "gradsq":
            b = self._batch or self.batch_size
            if b is None:
                raise ValueError(
                    "hessian='gradsq' needs the minibatch size: pass batch_size= to BayesAdam "
                    "or use train_step()"
                )
            return g.square().mul_(b)
        return None

    def add_curvature(self, estimates: dict[torch.Tensor, torch.Tensor]) -> None:
        """Add model-side curvature estimates ĥ (per-sample averages) for the pending sample."""
        for p, est in estimates.items():
            if p in self._hess_acc:
                self._hess_acc[p].add_(est)
            else:
                self._hess_acc[p] = est.detach().clone()

    # -- the step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Update means and curvature from the recorded sample(s).

        With a ``closure`` (as Lightning and L-BFGS-style loops call it), the closure runs inside
        :meth:`sampled_params` and its loss is returned.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad(), self.sampled_params(train=True):
                loss = closure()
            if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
                return self._reject(f"the loss is {float(loss)}", loss)
        needs_sample = any(g["temperature"] > 0 for g in self.param_groups)
        if self._n_samples == 0 and needs_sample:
            raise RuntimeError(
                "step() needs a weight sample: run forward and backward inside "
                "`with opt.sampled_params(train=True):` (or use opt.train_step)"
            )
        if self.estimator.needs_model and needs_sample and not self._hess_acc:
            raise RuntimeError(
                f"hessian={self.hessian!r} needs the model's outputs: use "
                "opt.train_step(model, x, y, likelihood=...) instead of step()"
            )
        n = max(self._n_samples, 1)
        many = bool(self._grad_acc)
        if many:  # several samples: fold the last one, then average
            self._fold_pending()
            for p, g in self._grad_acc.items():
                p.grad = g.div_(n)
        bad = _first_nonfinite(
            [p.grad for _, p in self._params() if p.grad is not None] + list(self._hess_acc.values())
        )
        if bad:
            return self._reject(f"a {bad} is not finite", loss)

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # group parameters by their step counts (they agree unless parameters joined late)
            buckets: dict[tuple[int, int], list] = {}
            for p in group["params"]:
                if not p.requires_grad or p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("BayesAdam does not support sparse gradients")
                st = self._state(group, p)
                noise = None
                if many or self.estimator.needs_model:
                    est = self._hess_acc.get(p)
                    est = None if est is None else est.div_(n)
                elif self.hessian == "reparam":
                    est, noise = None, self._noise.get(p)
                else:
                    est = self._optimizer_side_estimate(group, p, p.grad, self._noise.get(p))
                st["step"] += 1
                if est is not None or (noise is not None and group["temperature"] > 0):
                    st["hess_step"] += 1
                buckets.setdefault((st["step"], st["hess_step"]), []).append((p, st, est, noise))
            for (step, hess_step), items in buckets.items():
                bayesadam_update(
                    [p for p, *_ in items],
                    [p.grad for p, *_ in items],
                    [st["exp_avg"] for _, st, *_ in items],
                    [st["exp_avg_sq"] for _, st, *_ in items],
                    [st["hess"] for _, st, *_ in items],
                    [e for *_, e, _ in items],
                    [z for *_, z in items],
                    step=step,
                    hess_step=hess_step,
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    hess_beta=group["hess_beta"],
                    n_data=group["n_data"],
                    prior_precision=group["prior_precision"],
                    temperature=group["temperature"],
                    nonnegative=self.estimator.nonnegative,
                )
        self._clear_pending()
        return loss

    def _reject(self, what: str, loss):
        self._clear_pending()
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            return loss
        raise FloatingPointError(
            f"BayesAdam: {what}; the step was not taken and the means, curvature and weights are "
            "unchanged (pass nonfinite='skip' to drop such steps instead)"
        )

    def train_step(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        likelihood: str | likelihoods.Likelihood = "classification",
        sigma_noise: float = 1.0,
    ) -> torch.Tensor:
        """Zero grads, sample weights ``mc_samples`` times, forward, backward, curvature, step.

        Works for every ``hessian=`` key. Returns the minibatch-mean loss (averaged over samples).
        """
        lik = likelihoods.get(likelihood, sigma_noise)
        names = self._names_in(model)
        self.zero_grad()
        self._batch = x.shape[0]
        total = 0.0
        for _ in range(self.mc_samples):
            with self.sampled_params(train=True):
                loss = lik.nll(model(x), y).mean()
                finite = bool(torch.isfinite(loss))
                if finite:
                    loss.backward()
                    if self.estimator.needs_model:
                        sums = self.estimator.fn(model, x, y, lik, self.generator, list(names))
                        self.add_curvature({names[n]: s.div_(x.shape[0]) for n, s in sums.items()})
            if not finite:
                return self._reject(f"the loss is {float(loss.detach())}", loss.detach())
            total = total + loss.detach()
        self.step()
        return total / self.mc_samples

    def _names_in(self, model: nn.Module) -> dict[str, torch.Tensor]:
        mine = {p for _, p in self._params()}
        names = {n: p for n, p in model.named_parameters() if p in mine}
        if len(names) != len(mine):
            raise ValueError("train_step: the optimizer holds parameters that are not in `model`")
        return names

    # -- posterior -----------------------------------------------------------------------------
    def posterior(self) -> DiagGaussian:
        """``N(μ, diag(T / (N·h + δ)))`` over the trainable parameters (T = 1 if trained at T = 0)."""
        mean, prec = {}, {}
        i = 0
        for group in self.param_groups:
            names = group.get("param_names")
            temp = group["temperature"] or 1.0
            for j, p in enumerate(group["params"]):
                key = names[j] if names is not None else str(i)
                i += 1
                if not p.requires_grad:
                    continue
                h = self._h_eff(group, p)
                mean[key] = p.detach().clone()
                prec[key] = h.mul(group["n_data"]).add_(group["prior_precision"]).div_(temp)
        return DiagGaussian(mean, prec)

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["bayesadam"] = {
            "hessian": self.hessian,
            "mc_samples": self.mc_samples,
            "rng_state": self.generator.get_state(),
            "skipped_steps": self.skipped_steps,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("bayesadam", None)
        if extra is None:
            raise ValueError("load_state_dict: not a BayesAdam state dict (no 'bayesadam' entry)")
        if extra["hessian"] != self.hessian:
            raise ValueError(
                f"load_state_dict: saved with hessian={extra['hessian']!r}, this optimizer uses "
                f"hessian={self.hessian!r}"
            )
        super().load_state_dict(state_dict)
        self.generator.set_state(extra["rng_state"])
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self.mc_samples = int(extra["mc_samples"])
        self._clear_pending()


def _check_positive(name, value, allow_zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _first_nonfinite(tensors) -> str | None:
    """Name what is not finite among gradients/estimates, or None.

    Fast path: the sums of the tensors are finite iff every element is, unless a sum overflows;
    only then is every element checked.
    """
    if not tensors:
        return None
    sums = torch.stack([t.sum().to(tensors[0].device, torch.float32) for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return None
    if all(bool(torch.isfinite(t).all()) for t in tensors):
        return None
    return "gradient or curvature estimate"
