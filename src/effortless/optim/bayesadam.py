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

    average     μ̄ ← μ̄ + (η+1)/(t+η) · (μ − μ̄)   (after step t; η = 1/``averaging`` − 1)

At any time ``posterior()`` is ``N(μ̄, diag(T / (N·h + δ)))``: a Laplace-style posterior that
needs no extra pass, its mean the average of the recent mean iterates (``averaging=None``: μ).
With ``temperature=0`` there is no noise and the mean update is exactly
``torch.optim.Adam(lr, betas, eps, weight_decay=δ/N)`` (tested).

The mean follows Adam rather than the Newton-like step of IVON/VOGN so that Adam's learning rate
and schedule carry over unchanged; Adam's second moment is kept for that purpose only, and the
curvature ``h`` is estimated separately for the posterior (issue #6 measures how close they are).

Defaults: ``temperature=0.01`` (a cold posterior: with T = 1 a diagonal posterior puts noise on
each pre-activation that grows with the fan-in, and training under it underfits — Fashion-MNIST
MLP 80.2 % vs Adam's 87.2 %; the README has the sweeps over T and tasks), antithetic samples (θ = μ + σε, then
μ' − σ'ε: each exactly N(μ, σ²), half the Gaussian draws), and for models with at least
``FUSED_MIN_NUMEL`` weights the sampling and the ``reparam`` update run as compiled kernels.

References:
    Khan et al. (2018), Fast and scalable Bayesian deep learning by weight-perturbation in Adam.
    Shen et al. (2024), Variational learning is effective for large deep networks (IVON).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from .. import _rng, likelihoods
from .._checks import is_count, is_number
from .._stack import outside_stacklevel
from .._weights import weights_changed
from ..curvature import engine, estimators
from ..curvature import functional as cf
from ..posterior.diag import DiagGaussian
from ..posterior.evidence import best_log_delta
from . import _fused

__all__ = ["BayesAdam", "bayesadam_update", "hess_beta_at"]

_NONFINITE = ("raise", "skip")
_DISTRIBUTED = ("auto", "flipout", "per-rank", "shared", "off")
# keys whose estimate sums per-sample quantities (undefined through batch-coupled modules)
_PER_SAMPLE = frozenset({"efisher", "ggn-mc", "ggn", "kfac"})
_GAVE_UP = object()  # a model whose forward the hook engine gave up on (train_step's generic path)


# the hyperparameters _check_groups validates (betas last: a tuple)
_GROUP_KEYS = ("n_data", "prior_precision", "lr", "eps", "hess_init", "temperature", "hess_beta", "averaging",
               "betas")  # fmt: skip


def averaging_weight(fraction: float, step: int) -> float:
    """Weight of step ``step``'s means (step ≥ 1) in the polynomial-decay average that keeps
    roughly the last ``fraction`` of the steps: (η+1)/(t+η), η = 1/fraction − 1 (1 at step 1)."""
    eta = 1.0 / fraction - 1.0
    return (eta + 1.0) / (step + eta)


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


def _inv_sigma(h: torch.Tensor, n_data: float, prior_precision: float, temperature: float) -> torch.Tensor:
    """``1/σ = √((N·h + δ)/T)``, in a new tensor (float32 for bf16 curvature)."""
    h = h.float() if h.dtype in _fused._LOWP else h
    return h.mul(n_data / temperature).add_(prior_precision / temperature).sqrt_()


# Tensors up to this many elements in all are updated together with torch._foreach_* ops (fewer
# dispatches for the many small tensors of a network); larger ones one at a time, in place, so
# step temporaries stay bounded by the largest tensor.
FOREACH_CHUNK = 2**16


def bayesadam_update(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    hessians: list[torch.Tensor],
    hess_estimates: list[torch.Tensor | None],
    noises: list[torch.Tensor | None],
    workspaces: list[torch.Tensor | None],
    *,
    noise_sign: float,
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
    foreach: bool = True,
    noise_is_theta: bool = False,
) -> None:
    """One BayesAdam update, in place, on lists of tensors (the functional kernel).

    ``params`` hold the means μ. The curvature estimate of tensor i is ``hess_estimates[i]`` if
    given, else the reparameterisation estimate ``g ⊙ (θ − μ) / σ²`` with ``θ − μ =
    noise_sign · σ ⊙ noises[i]`` (unit noise) if ``noises[i]`` is given, else its curvature is left
    unchanged. ``hess_estimates`` and ``workspaces`` (tensors shaped like the parameter, or None)
    are consumed as scratch space. ``step``/``hess_step`` are the counts after this update; the
    caller has checked that everything is finite.

    ``foreach=False`` runs the reference loop, one tensor at a time; ``foreach=True`` batches small
    tensors through ``torch._foreach_*`` ops (same arithmetic; tested equal in float64).

    ``noise_is_theta``: the ``noises`` buffers hold the sample θ itself (drawn in place); the
    reparameterisation estimate then uses sign · ε = (θ − μ)/σ, computed here from the old μ and h
    (``noise_sign`` must be 1) and left in the buffers, for an antithetic mirror.
    """
    # (hess_step 0: no estimate has reached these tensors yet, e.g. a parameter unfrozen since; h stays)
    beta = hess_beta_at(hess_beta, hess_step, nonnegative) if hess_step > 0 else 1.0
    temp = temperature if temperature > 0 else 1.0
    hp = dict(
        step=step,
        step_tensors={},  # (the fused Adam kernel's step count, made once per device)
        bc1=1.0 - beta1**step,
        bc2_sqrt=math.sqrt(1.0 - beta2**step),
        wd=prior_precision / n_data,
        beta=beta,
        riemann=0.5 * (1.0 - beta) ** 2 * n_data / temp,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        n_data=n_data,
        prior_precision=prior_precision,
        temperature=temperature,
        temp=temp,
        nonnegative=nonnegative,
        sign=noise_sign,
        theta=noise_is_theta,
        u_v=dither(step, 0),
        u_h=dither(hess_step, 1),
    )
    rows = list(zip(params, grads, exp_avgs, exp_avg_sqs, hessians, hess_estimates, noises, workspaces))
    sizes = [p.numel() for p in params]
    chunks = _chunks(sizes, FOREACH_CHUNK) if foreach else [[i] for i in range(len(rows))]
    for idx in chunks:
        kinds = {_kind(rows[i], temperature) for i in idx}
        mixed = len({(rows[i][0].device, rows[i][0].dtype) for i in idx}) > 1
        # bf16 in any of m, v, h: one tensor at a time (float copies, rounded stores)
        lowp = any(t.dtype != rows[i][0].dtype for i in idx for t in rows[i][2:5])
        if len(idx) == 1 or len(kinds) > 1 or mixed or lowp:
            for i in idx:
                for part in _slices(rows[i], FOREACH_CHUNK):
                    _single_tensor_update(*part, **hp)
        else:
            _multi_tensor_update([rows[i] for i in idx], kinds.pop(), **hp)


def _chunks(sizes: list[int], budget: int) -> list[list[int]]:
    out, cur, total = [], [], 0
    for i, n in enumerate(sizes):
        if cur and total + n > budget:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    return out + ([cur] if cur else [])


def _noise_from_theta_(u, mu, h, group) -> torch.Tensor:
    """u ← (u − μ)/σ in place (a sample θ back to sign · ε), slice by slice; returns u."""
    n, d, t = group["n_data"], group["prior_precision"], group["temperature"]
    for u_s, mu_s, h_s in _slices([u, mu, h], FOREACH_CHUNK):
        u_s.sub_(mu_s).mul_(_inv_sigma(h_s, n, d, t))
    return u


def _slices(row, size: int):
    """The row's tensors cut into flat slices of at most ``size`` elements (views: the update is
    elementwise, so slice by slice is the same, bitwise but for the rounding of m, which the fused
    Adam kernel forms differently in its vectorised body and its scalar tail), so that the
    temporaries of one tensor's update stay bounded by ``size`` however large the tensor. Tensors
    that are not all contiguous are updated whole."""
    n = row[0].numel()
    tensors = [t for t in row if t is not None]
    if n <= size or not all(t.is_contiguous() for t in tensors):
        return [row]
    flat = [None if t is None else t.view(-1) for t in row]
    return [[None if t is None else t[a : a + size] for t in flat] for a in range(0, n, size)]


def _kind(row, temperature) -> str:
    hhat, noise = row[5], row[6]
    if hhat is not None:
        return "given"
    return "reparam" if noise is not None and temperature > 0 else "none"


def dither(step: int, which: int) -> float:
    """The dither of the stochastic rounding into bf16 state at update ``step``: the Weyl
    sequence frac(step · α) (α the golden ratio's fraction for v, √2 − 1 for h), uniform over the
    steps and without drawing from any generator. One value per step for all weights: each weight's
    rounding is unbiased over the steps, which is what a running average needs."""
    alpha = (0.6180339887498949, 0.41421356237309515)[which]
    return math.fmod(step * alpha, 1.0)


def _single_tensor_update(mu, g, m, v, h, hhat, noise, work, **hp):
    if m.dtype != mu.dtype or v.dtype != mu.dtype or h.dtype != mu.dtype:
        # bf16 state: the update on float copies, stored back rounded (v and h stochastically)
        # (v and h still hold the old values until stored: read again there, not kept in copies)
        # (state already in μ's dtype, e.g. m and v with state_dtype={"hess": bf16}, is updated in
        # place: `.to` returns it as it is, and there is nothing to store back)
        m32, v32, h32 = m.to(mu.dtype), v.to(mu.dtype), h.to(mu.dtype)
        _single_tensor_update(mu, g, m32, v32, h32, hhat, noise, work, **hp)
        if m32 is not m:
            _fused._store(m, m32)
        if v32 is not v:
            _fused._store(v, v32, hp["u_v"], v.to(mu.dtype))
        if h32 is not h:
            floor = None if hp["nonnegative"] else -_fused.FLOOR * hp["prior_precision"] / hp["n_data"]
            _fused._store(h, h32, hp["u_h"], h.to(mu.dtype), floor)
        return
    # curvature first: the reparameterisation estimate needs σ from the old h
    sign = 1.0
    if hhat is None and noise is not None and hp["temperature"] > 0:
        inv_sigma = _inv_sigma(h, hp["n_data"], hp["prior_precision"], hp["temperature"])
        if hp["theta"]:  # the buffer holds θ: make it sign · ε = (θ − μ)/σ (kept for a mirror)
            noise.sub_(mu).mul_(inv_sigma)
        hhat = torch.mul(g, noise, out=work).mul_(inv_sigma)  # sign · ĥ = g ε / σ
        sign = hp["sign"]
    elif hhat is not None and not hp["nonnegative"]:
        inv_sigma = _inv_sigma(h, hp["n_data"], hp["prior_precision"], hp["temp"])
    if hhat is not None:
        if hp["nonnegative"]:
            h.lerp_(hhat, 1.0 - hp["beta"])
        else:
            # d = h − ĥ;  h ← h − (1−β) d + ½(1−β)² d² / (h + δ/N),  1/(h + δ/N) = N σ² / T
            d = torch.sub(h, hhat, alpha=sign, out=hhat)
            h.add_(d, alpha=-(1.0 - hp["beta"]))
            d.div_(inv_sigma)
            h.addcmul_(d, d, value=hp["riemann"])
        work = hhat
    if _adam_mean_([mu], [g], [m], [v], hp):
        return
    if work is None:
        work = torch.empty_like(mu)
    # mean: Adam on the per-sample negative log joint, in the workspace
    g_tot = torch.add(g, mu, alpha=hp["wd"], out=work)
    m.lerp_(g_tot, 1.0 - hp["beta1"])
    v.mul_(hp["beta2"]).addcmul_(g_tot, g_tot, value=1.0 - hp["beta2"])
    denom = torch.sqrt(v, out=work).div_(hp["bc2_sqrt"]).add_(hp["eps"])
    mu.addcdiv_(m, denom, value=-hp["lr"] / hp["bc1"])


def _adam_mean_(mus, grads, ms, vs, hp) -> bool:
    """The mean's update (Adam with the prior's pull wd · μ added to the gradient) as PyTorch's
    own fused Adam kernel (``torch._fused_adam_``, what ``torch.optim.Adam(fused=True)`` runs):
    one pass over memory and no temporaries, against eight ``_foreach`` ops and two
    parameter-sized temporaries (on the 42k-weight MLP of ``benchmarks/step_cost.py --hidden
    50,50``, 150 against 51 µs). Same formulas; the rounding of m differs in the last bits (float64:
    ~1e-13 relative where m nearly cancels). False where it does not apply (another device, mixed
    dtypes, non-contiguous tensors): the caller then runs the ``_foreach`` ops."""
    dev, dtype = mus[0].device, mus[0].dtype
    if _FUSED_ADAM is None or dev.type not in ("cpu", "cuda") or not dtype.is_floating_point:
        return False
    for group in (mus, grads, ms, vs):
        if any(t.device != dev or t.dtype != dtype or not t.is_contiguous() for t in group):
            return False
    # the bias corrections come from the step count, as 1 − β^t in double precision (as ours); one
    # tensor per device for all the chunks and slices of an update
    steps = hp["step_tensors"]
    if dev not in steps:
        steps[dev] = torch.tensor(float(hp["step"]), device=dev)
    _FUSED_ADAM(mus, grads, ms, vs, [], [steps[dev]] * len(mus), lr=hp["lr"], beta1=hp["beta1"],
                beta2=hp["beta2"], weight_decay=hp["wd"], eps=hp["eps"], amsgrad=False,
                maximize=False)  # fmt: skip
    return True


_FUSED_ADAM = getattr(torch, "_fused_adam_", None)


def _multi_tensor_update(rows, kind, **hp):
    mu, g, m, v, h, hhat, noise, _ = (list(c) for c in zip(*rows))
    if kind != "none":
        sign = hp["sign"] if kind == "reparam" else 1.0
        if kind == "reparam" or not hp["nonnegative"]:
            t = hp["temperature"] if kind == "reparam" else hp["temp"]
            inv_sigma = torch._foreach_mul(h, hp["n_data"] / t)
            torch._foreach_add_(inv_sigma, hp["prior_precision"] / t)
            torch._foreach_sqrt_(inv_sigma)
        if kind == "reparam":
            if hp["theta"]:  # θ → sign · ε in the buffers, as in the per-tensor loop
                torch._foreach_sub_(noise, mu)
                torch._foreach_mul_(noise, inv_sigma)
            hhat = torch._foreach_mul(g, noise)
            torch._foreach_mul_(hhat, inv_sigma)
        if hp["nonnegative"]:
            torch._foreach_lerp_(h, hhat, 1.0 - hp["beta"])
        else:
            d = torch._foreach_sub(h, hhat, alpha=sign)
            torch._foreach_add_(h, d, alpha=-(1.0 - hp["beta"]))
            torch._foreach_div_(d, inv_sigma)
            torch._foreach_addcmul_(h, d, d, value=hp["riemann"])
    if _adam_mean_(mu, g, m, v, hp):
        return
    g_tot = torch._foreach_add(g, mu, alpha=hp["wd"])
    torch._foreach_lerp_(m, g_tot, 1.0 - hp["beta1"])
    torch._foreach_mul_(v, hp["beta2"])
    torch._foreach_addcmul_(v, g_tot, g_tot, value=1.0 - hp["beta2"])
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, hp["bc2_sqrt"])
    torch._foreach_add_(denom, hp["eps"])
    torch._foreach_addcdiv_(mu, m, denom, value=-hp["lr"] / hp["bc1"])


class BayesAdam(Optimizer):
    """Adam whose weights are a Gaussian posterior: sample, take the gradient, update μ and h.

    Args:
        params: parameters or ``model.named_parameters()`` (then the posterior is keyed by name),
            or param-group dicts.
        n_data: number of training examples N (the likelihood's weight against the prior).
        lr, betas, eps: Adam's, for the mean (defaults as ``torch.optim.Adam``).
        prior_precision: δ of the Gaussian prior N(0, 1/δ) (float > 0), or ``"auto"`` (also
            ``"marglik"``, the name ``ef.laplace`` uses): start at 1
            and, every ``prior_update_every`` steps, set each group's δ to the maximiser of the
            diagonal Laplace evidence given the current μ and curvature (MacKay's fixed point
            δ = γ/‖μ‖², γ = Σ N h/(N h + δ)), after ``prior_warmup`` steps and by at most a factor
            2 per update; no extra pass over the data. Experimental: measured to hurt small
            networks (README), so not the default.
        hessian: curvature estimator key (see :mod:`effortless.curvature.estimators`).
        hess_beta: weight of the old curvature in its running average (0 ≤ β < 1), or None for
            an equal-weight average over all steps.
        hess_init: curvature before the first estimate (per-sample units; sets the first σ).
        temperature: T scaling the posterior variance; 0 trains deterministically (plain Adam).
        averaging: the posterior's mean is an average of the mean iterates that weights roughly
            the last ``averaging`` fraction of the steps so far (polynomial-decay averaging,
            Shamir & Zhang 2013: after step t the average moves towards μ by (η+1)/(t+η),
            η = 1/averaging − 1; 1 is the plain mean of all iterates). Training is unchanged:
            the parameters hold the running μ; :meth:`posterior`, ``sampled_params(train=False)``
            and :func:`effortless.predict` use the average, and :meth:`load_averaged_means`
            (which ``ef.fit`` calls at its end) copies it into the parameters. The iterates of a
            sampled-weight optimizer scatter around the optimum; their average is the better
            estimate of the posterior mean (fmnist-mlp, 5 epochs, 3 seeds: test accuracy 88.64
            against 87.90 %, NLL 0.316 against 0.341 for the last iterate; it lags a network
            still improving fast: mnist1d-cnn NLL +0.01; docs/results/averaging.md). One more
            buffer the size of the parameters. ``None``: the last iterate.
        mc_samples: weight samples per step in :meth:`train_step`.
        batch_size: minibatch size, needed by ``hessian="gradsq"`` when stepping without
            :meth:`train_step` (which knows it).
        generator: ``torch.Generator`` for the weight noise; default: a new one seeded once from
            the global RNG (so ``torch.manual_seed`` makes runs reproducible).
        nonfinite: ``"raise"`` (default) raises ``FloatingPointError`` on a non-finite gradient or
            loss; ``"skip"`` drops that step. Either way μ, the curvature and the weights are left
            untouched.
        antithetic: draw weight samples in antithetic pairs (θ = μ + σε, then μ' − σ'ε): each
            sample is still exactly N(μ, σ²); pairs cancel first-order noise, and only every other
            sample costs a Gaussian draw (the slowest part of a step on CPU).
        noise_reuse: each fresh Gaussian draw serves this many draws (pairs, with ``antithetic``);
            the later ones reuse each tensor's last unit noise cyclically shifted by a random
            offset, a copy instead of a draw (torch's CPU ``normal_`` is serial MT19937). A
            permutation of independent N(0, 1) entries is again independent N(0, 1), so every
            sample is still exactly N(μ, σ²) and no weight meets its own earlier noise; what
            repeats is the set of values, across the draws of a cycle. Tensors under
            ``REUSE_MIN_NUMEL`` elements, later samples of a step (``mc_samples`` > 1) and
            distributed runs with per-rank noise (``"per-rank"``, ``"flipout"``) always draw
            fresh. 1: every draw fresh. The default 4 takes the step from 1.41× to 1.29–1.31×
            Adam's (MLP 784-256-256-10, one CPU thread, ``benchmarks/step_cost.py``); on the
            seven tasks of ``benchmarks/defaults.py`` (3 seeds) 4 and 8 are within the seeds'
            spread of fresh noise (docs/results/noise-reuse.md).
        foreach: batch the many small tensors through ``torch._foreach_*`` ops (same arithmetic as
            the per-tensor loop, which ``foreach=False`` selects).
        fused: run the sampling and the update (``reparam``, and the non-negative model-side keys
            through :meth:`train_step`) as ``torch.compile``d kernels (one pass over memory
            instead of ~12-20). ``None`` (default) turns it on for models with at least
            ``FUSED_MIN_NUMEL`` weights, where the one-time compilation (~15-30 s on CPU) pays off;
            if compilation fails it warns once and runs eager.
        distributed: under ``torch.distributed`` with more than one process (DDP computes the
            gradients' all-reduce), how the ranks' weight samples relate:

            * ``"flipout"``: a different sample on every rank (free extra Monte-Carlo samples)
              at no extra communication. One Gaussian draw ζ is shared by all ranks and rank r
              flips its signs with its own random sign vector s_r (Flipout, Wen et al. 2018):
              ε_r = ζ ⊙ s_r is exactly N(0, I) on every rank and uncorrelated across ranks (not
              independent: |ε_r| is shared). As in Flipout, each weight tensor (seen as rows ×
              the rest) gets a rank-one sign matrix s_r = a_r b_rᵀ, so a rank draws rows + cols
              signs per tensor, not one per weight. The signs are seeded each step from the
              shared generator, so every rank knows Σ_r ε_r = ζ ⊙ Σ_r a_r b_rᵀ, which the
              ``reparam`` curvature needs, without a collective.
            * ``"per-rank"``: an independent Gaussian draw on every rank; the ``reparam``
              curvature then needs Σ_r ε_r, one extra all-reduce of P floats per step (started
              when the sample is drawn, to overlap forward and backward).
            * ``"shared"``: the same sample on every rank (then the run equals one process on
              the global batch, up to float reduction order).
            * ``"auto"`` (default) is ``"flipout"`` when a process group of size > 1 is
              initialised, else off; ``"off"`` never communicates.

            Model-side curvature estimates (``ggn``, ``ggn-mc``, …) are all-reduced in one flat
            collective per step; rank 0's generator state is broadcast once at the first
            sample; the means, curvature and step counters stay identical on every rank.
        process_group: the process group for that (default: the world).
        product_dtype: precision of the curvature's products in :meth:`train_step` with the hook
            engine (``efisher``, ``ggn``, ``ggn-mc``), e.g. ``torch.bfloat16``: 3–4× faster
            products on CPUs with AVX512-BF16/AMX and on GPUs; Linear layers' entries stay within
            about 1.2 % of the exact ones (see :func:`effortless.curvature.diag_ggn`). The
            gradient, the weights and the update keep their dtype. ``None`` (default): exact.
        state_dtype: ``torch.bfloat16`` keeps Adam's moments m, v and the curvature h in bf16
            (float32 parameters only): 1.5 parameter-sized tensors less, 5.12 → 3.62× the
            parameter count beyond weights and gradients on the MLP of ``benchmarks/step_cost.py``.
            The update computes in float32 and rounds on store: m to nearest, v and h
            stochastically (their 0.999 running averages would stall under round-to-nearest; the
            dither is a Weyl sequence over the steps, so no generator is drawn from and resume stays
            bit-identical), h kept above −0.97·δ/N so that N·h + δ stays positive. The posterior's
            precision is float32. Costs step time on CPUs without bf16 arithmetic (1.33–1.38×
            against 1.24–1.28× Adam on an AVX2 CPU); with ``temperature=0`` the update is then no
            longer exactly ``torch.optim.Adam``'s. A dict names which of ``"exp_avg"`` (m),
            ``"exp_avg_sq"`` (v) and ``"hess"`` (h) to keep in which dtype, the others in the
            parameters': ``{"hess": torch.bfloat16}`` saves half a parameter's worth and keeps
            ``temperature=0`` exactly Adam; with ``averaging=None`` too it is 3.62× at 1.26× Adam
            on that MLP (``docs/results/bf16-state-probe.md``). ``None`` (default): the parameters'
            dtype.

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
        temperature: float = 0.01,
        averaging: float | None = 0.05,
        mc_samples: int = 1,
        batch_size: int | None = None,
        generator: torch.Generator | None = None,
        nonfinite: str = "raise",
        antithetic: bool = True,
        noise_reuse: int = 4,
        foreach: bool = True,
        fused: bool | None = None,
        prior_update_every: int = 100,
        prior_warmup: int = 1000,
        distributed: str = "auto",
        process_group=None,
        product_dtype: torch.dtype | None = None,
        state_dtype: torch.dtype | dict | None = None,
    ):
        self._state_dtypes = _state_dtypes(state_dtype)
        self.state_dtype = state_dtype
        self.product_dtype = product_dtype
        # "marglik": ef.laplace's name for the same thing (tuned by the marginal likelihood)
        self.auto_prior = isinstance(prior_precision, str) and prior_precision in ("auto", "marglik")
        if self.auto_prior:
            prior_precision = 1.0  # the starting value; tuned every `prior_update_every` steps
        elif isinstance(prior_precision, str):
            raise ValueError(
                f"prior_precision must be a float > 0 or 'auto' ('marglik'), got {prior_precision!r}"
            )
        if not is_count(prior_update_every):
            raise ValueError(f"prior_update_every must be a positive int, got {prior_update_every!r}")
        self.prior_update_every = int(prior_update_every)
        if not is_count(prior_warmup, 0):
            raise ValueError(f"prior_warmup must be an int >= 0, got {prior_warmup!r}")
        self.prior_warmup = int(prior_warmup)
        _check_positive("n_data", n_data)
        _check_positive("lr", lr, allow_zero=True)
        _check_positive("eps", eps, allow_zero=True)
        _check_positive("prior_precision", prior_precision)
        _check_positive("hess_init", hess_init, allow_zero=True)
        _check_positive("temperature", temperature, allow_zero=True)
        _check_betas(betas)
        _check_hess_beta(hess_beta)
        _check_averaging(averaging)
        if not is_count(mc_samples):
            raise ValueError(f"mc_samples must be a positive int, got {mc_samples!r}")
        _check_noise_reuse(noise_reuse)
        if batch_size is not None and not is_count(batch_size):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if distributed not in _DISTRIBUTED:
            raise ValueError(f"distributed must be one of {_DISTRIBUTED}, got {distributed!r}")
        self.distributed = distributed
        self.process_group = process_group
        self._synced = False  # generator broadcast from rank 0 (distributed runs, once)
        self._noise_seed = None  # per-rank runs: the shared seed of the last training noise draw
        self._flip_buffers: dict = {}  # flipout runs: reused workspace per (device, dtype)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.estimator = estimators.get(hessian)
        self.hessian = hessian
        # (plain ints: a checkpoint loads with weights_only=True, which refuses NumPy scalars)
        self.mc_samples = int(mc_samples)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.nonfinite = nonfinite
        self.antithetic = bool(antithetic)
        self.noise_reuse = int(noise_reuse)
        self.foreach = bool(foreach)
        if fused not in (None, True, False):
            raise ValueError(f"fused must be True, False or None (auto), got {fused!r}")
        self._phase = 0  # antithetic: 0 draws new unit noise ε, 1 reuses it as −ε
        self._pair = 0  # training draws of fresh unit noise so far (state["noise_pair"]: whose ε it holds)
        defaults = dict(
            lr=float(lr),
            betas=tuple(float(b) for b in betas),
            eps=float(eps),
            n_data=float(n_data),
            prior_precision=float(prior_precision),
            hess_beta=None if hess_beta is None else float(hess_beta),
            hess_init=float(hess_init),
            temperature=float(temperature),
            averaging=None if averaging is None else float(averaging),
        )
        super().__init__(params, defaults)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        cf._check_product_dtype(product_dtype, next(iter(devices)) if len(devices) == 1 else None)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        if first is None:
            raise ValueError("params: the optimizer got no parameters")
        if generator is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            generator = torch.Generator(device=first.device).manual_seed(seed)
        self.generator = generator
        self._eval_gen: torch.Generator | None = None  # (made when first needed: _eval_generator)
        lowp = torch.bfloat16 in self._state_dtypes.values()
        if lowp and any(p.dtype != torch.float32 for _, p in self._params()):
            raise ValueError("state_dtype: bf16 state needs float32 parameters")
        self.fused = self._choose_fused(fused)
        if lowp and self.fused and not _fused.lowp_state_supported(first.device.type):
            why = ("this torch's compiled code drops the round trip through bf16 that the stochastic "
                   "rounding of bf16 state is made of (checked by compiling it once)")  # fmt: skip
            if fused:
                raise ValueError(f"fused=True with bf16 state: {why}; use fused=False")
            warnings.warn(f"BayesAdam: {why}: the update runs uncompiled (fused=False: slower)",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
            self.fused = False
        self.skipped_steps = 0
        self.sigma_noise = None  # the regression noise train_step trained with (posterior() records it)
        self.likelihood = None  # the likelihood train_step trained with (posterior() records it)
        # model -> (names of the parameters it was made for, hook-engine plan or None) for train_step;
        # remade when the trainable parameters change (freezing, unfreezing)
        self._plans: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()
        self._inside = False
        self._closure_sampled = False  # step(closure) is running the closure in its own block
        self._clear_pending()

    def __getstate__(self) -> dict:
        """All of the optimizer (torch's ``Optimizer`` keeps only its defaults, state and parameter
        groups, which left a ``copy.deepcopy`` or an unpickled BayesAdam without its settings);
        the estimator (which holds functions) comes back from its key, the hook engine's plans
        are remade on use."""
        state = dict(self.__dict__)
        state["_plans"] = state["estimator"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._plans = weakref.WeakKeyDictionary()
        self.estimator = estimators.get(self.hessian)

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer``'s, refusing parameters BayesAdam cannot hold a posterior in."""
        params = param_group["params"]
        if isinstance(params, set):  # torch refuses it (unordered): let it say so
            return super().add_param_group(param_group)
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            t = p[1] if isinstance(p, tuple) else p
            if not isinstance(t, torch.Tensor):
                continue  # (torch's own check names the bad entry)
            if t.dtype in (torch.float16, torch.bfloat16):
                raise ValueError(f"params: a {t.dtype} parameter; {_HALF_PARAMS}")
            if t.is_complex():
                raise ValueError(f"params: a {t.dtype} parameter; BayesAdam needs real parameters")
            if t.is_meta:
                raise ValueError(
                    "params: a parameter on the meta device (no data); materialise the model first "
                    "(e.g. model.to_empty(device=...) and load or initialise its weights), then "
                    "create the optimizer"
                )
        param_group = dict(param_group, params=params)
        super().add_param_group(param_group)
        try:  # a group's own hyperparameters, checked now rather than at the next sample or step
            self._check_groups()
        except ValueError:
            self.param_groups.pop()  # (torch keeps no other record of the group)
            raise

    def _check_groups(self) -> None:
        """The hyperparameters in ``param_groups`` are read at every sample and step, and a
        scheduler or a user may have changed them since the constructor checked: refuse values
        that would give a wrong posterior silently (n_data ≤ 0 flips the curvature's sign, a
        negative lr ascends) or a misleading error later (NaN surfaces as a non-finite estimate),
        before anything is drawn or updated. Groups whose values (plain floats) are those checked
        last time are not checked again (twice a step, it cost ~0.1 ms of a 3.6 ms step)."""
        checked = self.__dict__.setdefault("_checked", {})
        for i, g in enumerate(self.param_groups):
            values = tuple(g.get(k) for k in _GROUP_KEYS)
            plain = all(type(v) is float or v is None for v in values[:-1]) and type(values[-1]) is tuple
            if plain and checked.get(i) == values:
                continue
            try:
                _check_positive("n_data", g["n_data"])
                _check_positive("prior_precision", g["prior_precision"])
                for key in ("lr", "eps", "hess_init", "temperature"):
                    _check_positive(key, g[key], allow_zero=True)
                _check_betas(g["betas"])
                _check_hess_beta(g["hess_beta"])
                _check_averaging(g.get("averaging"))
            except ValueError as e:
                raise ValueError(f"param_groups[{i}]: {e}") from None
            if plain and all(type(b) is float for b in values[-1]):
                checked[i] = values

    def _check_placement(self) -> None:
        """Refuse a parameter whose dtype or device is no longer its state's: a model cast or moved
        after the first step (``model.double()``, ``model.to(device)``) failed mid-way with an
        unrelated message ("mat1 and mat2 must have the same dtype", or "expected dtype double for
        `end`" in the step, after some tensors had been updated; the fused path also gave up its
        kernels for good). Checked before anything is drawn or updated (3.7 µs for 6 tensors)."""
        hess_dtype = self._state_dtypes["hess"]
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                h = self.state[p].get("hess") if p in self.state else None
                if h is not None and h.device == p.device and h.dtype == (hess_dtype or p.dtype):
                    continue
                names = group.get("param_names")
                what = f"parameter {names[i]!r}" if names else f"a parameter of shape {tuple(p.shape)}"
                if h is None:  # (no state yet: refused as the constructor refuses it)
                    if p.dtype in (torch.float16, torch.bfloat16):
                        raise ValueError(f"BayesAdam: {what} was cast to {p.dtype}; {_HALF_PARAMS}")
                    continue
                raise RuntimeError(
                    f"BayesAdam: {what} is {p.dtype} on {p.device}, but its optimizer state is "
                    f"{h.dtype} on {h.device}: the model was cast or moved after the optimizer's first "
                    "sample or step. Cast or move the model before making the optimizer, or carry the "
                    "state over: sd = opt.state_dict(); opt = BayesAdam(model.named_parameters(), ...); "
                    "opt.load_state_dict(sd) (which casts and moves it). Nothing was drawn or updated"
                )

    def _choose_fused(self, fused: bool | None) -> bool:
        params = [p for _, p in self._params()]
        floats = (torch.float32, torch.float64)
        eligible = all(p.is_contiguous() and p.dtype in floats and not p.is_sparse for p in params)
        if fused is None:
            return eligible and sum(p.numel() for p in params) >= FUSED_MIN_NUMEL
        if fused and not eligible:
            raise ValueError("fused=True needs contiguous float32/float64 parameters")
        return fused

    # -- distributed ---------------------------------------------------------------------------
    def _world(self) -> tuple[str, int, int]:
        """(mode, world size, rank): mode is "off" unless a process group of size > 1 is up."""
        if self.distributed == "off" or not (dist.is_available() and dist.is_initialized()):
            return "off", 1, 0
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return "off", 1, 0
        mode = "flipout" if self.distributed == "auto" else self.distributed
        return mode, world, dist.get_rank(self.process_group)

    def _noise_generator(self, record: bool = False) -> torch.Generator:
        """The generator for a fresh draw of unit noise (the shared one unless per-rank). With
        ``record`` (training samples), a per-rank draw's seed is kept for checkpoints."""
        mode, _, rank = self._world()
        if mode == "off":
            return self.generator
        self._sync_generator()
        if mode == "shared":
            return self.generator
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
        if record:
            self._noise_seed = seed
            if mode == "flipout":  # ζ from the shared generator; the ranks' signs from the seed
                return self.generator
        return self._rank_generator(seed, rank)

    def _drawn_edited(self) -> bool:
        """Whether a group's N, δ or T changed since the pending sample was drawn over the buffers."""
        return any(group[k] != v for group, drawn_with in self._drawn_groups for k, v in drawn_with.items())

    def _sync_generator(self) -> None:
        """Every rank starts from rank 0's generator state (once)."""
        if self._synced:
            return
        state = self.generator.get_state()
        dev = self._comm_device()
        buf = state.to(dev)
        dist.broadcast(buf, src=dist.get_global_rank(self.process_group, 0) if self.process_group
                       else 0, group=self.process_group)  # fmt: skip
        self.generator.set_state(buf.cpu())
        self._synced = True

    def _eval_generator(self) -> torch.Generator:
        """The generator of evaluation samples (``sampled_params(train=False)``): a stream of its
        own, so that evaluating at samples between steps leaves every training sample as it was.
        Seeded from the training generator's seed (the same on every rank, synchronised first)."""
        if self._eval_gen is None:
            if self._world()[0] != "off":
                self._sync_generator()
            seed = (self.generator.initial_seed() * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63
            self._eval_gen = torch.Generator(device=self.generator.device).manual_seed(seed)
        return self._eval_gen

    def _reuses_noise(self) -> bool:
        """Whether this training draw (the ``self._pair``-th) reuses the last pair's unit noise,
        rolled, instead of drawing (see ``noise_reuse``): not the first draw of each cycle, not
        a later sample of a step (``mc_samples`` > 1: buffers may hold θ), not with per-rank
        noise (a rank's noise is regenerated from its seed on resume: it must be a fresh draw)."""
        return (
            self.noise_reuse > 1
            and (self._pair - 1) % self.noise_reuse != 0
            and self._n_samples == 0
            and self._world()[0] in ("off", "shared")
        )

    def _refill_generator(self) -> torch.Generator:
        """The generator for unit noise drawn outside a pair's first draw (see sampled_params):
        the shared one (every rank draws the same; Flipout's ζ must be shared), a fresh per-rank
        one for per-rank samples."""
        mode = self._world()[0]
        return self._noise_generator() if mode == "per-rank" else self.generator

    def _rank_generator(self, seed: int, rank: int) -> torch.Generator:
        gen = torch.Generator(device=self.generator.device)
        return gen.manual_seed((seed + 0x9E3779B97F4A7C1 * (rank + 1)) % 2**63)

    def _restore_rank_noise(self) -> None:
        """After loading a checkpoint (written by one rank) in the middle of an antithetic pair,
        redraw this rank's pending unit noise from the recorded seed, so the next sample is −ε of
        this rank's own ε, exactly as without the interruption."""
        mode, _, rank = self._world()
        if mode != "per-rank" or self._phase != 1 or self._noise_seed is None:
            return
        gen = self._rank_generator(self._noise_seed, rank)
        with torch.no_grad():
            for group, p in self._params():
                st = self.state.get(p)
                if group["temperature"] == 0 or not st or "noise" not in st:
                    continue
                _fill_normal(st["noise"], gen)

    def _comm_device(self) -> torch.device:
        backend = dist.get_backend(self.process_group)
        first = next(p for _, p in self._params())
        return first.device if backend != "gloo" else torch.device("cpu")

    def _reduce_curvature(self, mode: str, world: int) -> None:
        """Make every rank's curvature estimate the same, with one flat all-reduce.

        Gradients are already averaged over ranks (DDP). With per-rank samples, the single-sample
        ``reparam`` estimate Σ_r ḡ ε_r / σ (E ḡ ε_r = E g_r ε_r / R, so the sum is unbiased) is
        ḡ (Σ_r ε_r) / σ: the ranks' unit noise is summed — launched asynchronously when the sample
        is drawn, so it overlaps forward and backward — and the fused update runs on the sum.
        Otherwise the estimates themselves are reduced here: model-side estimates averaged (each
        rank saw its own data), several-sample ``reparam`` sums summed; ``gradsq`` is scaled by
        the global batch; a shared sample needs nothing.
        """
        if self._noise_sum is not None:  # per-rank single-sample reparam: wait for Σ_r ε_r
            handle, flat, tensors = self._noise_sum
            handle.wait()
            flat = flat.to(next(iter(tensors.values())).device)
            self._noise_summed = {}
            i = 0
            for p, t in tensors.items():
                self._noise_summed[p] = flat[i : i + t.numel()].view_as(t)
                i += t.numel()
            self._noise_sum = None
            return
        ests, op_sum = {}, False
        for group, p in self._params():
            if p.grad is None:
                continue
            if self.estimator.needs_model or self._grad_acc:
                if p in self._hess_acc:
                    ests[p] = self._hess_acc[p]
                op_sum = self.hessian == "reparam" and not self.estimator.needs_model
                self._reduced = True
            elif self.hessian == "gradsq":
                self._hess_acc[p] = self._optimizer_side_estimate(group, p, p.grad, self._sign).mul_(world)
                self._reduced = True
        if not ests or (self.hessian == "reparam" and mode in ("shared", "flipout")):
            return  # nothing to reduce, or identical on every rank already (flipout: ḡ ⊙ Σ_r ε_r)
        tensors = list(ests.values())
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(self._comm_device())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
        if not op_sum:
            flat.div_(world)
        flat = flat.to(tensors[0].device)
        i = 0
        for t in tensors:
            t.copy_(flat[i : i + t.numel()].view_as(t))
            i += t.numel()

    def _start_noise_sum(self, noise: dict[torch.Tensor, torch.Tensor]) -> None:
        """Independent per-rank single-sample reparam under DDP: Σ_r ε_r, by an all-reduce started
        now, to overlap forward and backward."""
        self._drop_noise_sum()
        flat = torch.cat([t.reshape(-1) for t in noise.values()]).to(self._comm_device())
        handle = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True)
        self._noise_sum = (handle, flat, noise)

    def _fused_sample(self, name: str, todo, sign):
        """The compiled sampling kernel ``name`` on every (p, h, ε, group) in ``todo``, or
        ``_FAILED`` when it cannot run (fused off, several groups, mixed dtypes/devices, a
        compilation failure)."""
        if not (self.fused and todo):
            return _FAILED
        if len({id(g) for *_, g in todo}) > 1 or len({(p.dtype, p.device) for p, *_ in todo}) > 1:
            return _FAILED
        g = todo[0][3]
        n, d, t = g["n_data"], g["prior_precision"], g["temperature"]
        hp = torch.tensor([sign, n / t, d / t], dtype=todo[0][0].dtype, device=todo[0][0].device)
        flat = [_kernel_views(col) for col in list(zip(*todo))[:3]]
        return self._run_fused(name, flat[0], flat[1], flat[2], hp)

    def _draw_inplace(self, todo, sign) -> list[torch.Tensor]:
        """θ = μ ± σ ⊙ ε written over ε in each unit-noise buffer (the training sample needs no
        buffer of its own: one parameter-sized tensor less at the backward pass, where the peak
        is). ε comes back as (θ − μ)/σ in :meth:`_theta_to_noise` when it is needed again (the
        estimate, an antithetic mirror). Returns the buffers."""
        if self._fused_sample("sample_inplace", todo, sign) is not _FAILED:
            return [unit for _, _, unit, _ in todo]
        for p, h, unit, g in todo:
            for mu_s, h_s, u_s in _slices([p.data, h, unit], FOREACH_CHUNK):  # bounded temporaries
                inv_sigma = _inv_sigma(h_s, g["n_data"], g["prior_precision"], g["temperature"])
                torch.addcdiv(mu_s, u_s, inv_sigma, value=sign, out=u_s)
        return [unit for _, _, unit, _ in todo]

    def _theta_to_noise(self, without_grad_only: bool = False) -> None:
        """state["noise"] ← (θ − μ)/σ = sign · ε for every tensor whose buffer holds a sample θ
        (drawn in place), with σ from the hyperparameters it was drawn with; or only for those the
        update will not convert (no gradient, frozen or at temperature 0 since the draw). μ and h
        must be those the sample was drawn with."""
        done = self._converted  # buffers already holding ε again (reset by _clear_pending, draws)
        with torch.no_grad():
            for p, (group, drawn_with) in self._drawn.items():
                st = self.state.get(p)
                if not st or "noise" not in st or p in done:
                    continue
                if without_grad_only and p.requires_grad and p.grad is not None and group["temperature"] > 0:
                    continue
                _noise_from_theta_(st["noise"], p.data, st["hess"], drawn_with)
                done.add(p)

    def _draw(self, todo, sign) -> list[torch.Tensor]:
        """θ = μ ± σ ⊙ ε for every (p, h, ε, group) in ``todo`` (fused when possible)."""
        out = self._fused_sample("sample", todo, sign)
        if out is not _FAILED:
            return out
        out = []
        for p, h, unit, g in todo:
            inv_sigma = _inv_sigma(h, g["n_data"], g["prior_precision"], g["temperature"])
            out.append(torch.addcdiv(p.data, unit, inv_sigma, value=sign))
        return out

    def _run_fused(self, name: str, *args):
        """Run a compiled kernel; on a compilation failure warn once and return _FAILED (go eager).
        Under a user's dispatch mode (``FlopCounterMode``, a memory counter) torch.compile refuses to
        run, and a refused frame stays refused for the process: the same math then runs uncompiled
        for this call, and the kernels stay fused for the calls after it."""
        if _fused.user_dispatch_mode():
            return _fused.eager(name)(*args)
        try:
            return _fused.kernel(name)(*args)
        except Exception as err:  # compilation problems surface as many exception types; a real
            # error in the inputs raises again from the eager path that runs instead
            warnings.warn(
                f"BayesAdam: torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                "continuing without fused kernels (fused=False)",
                RuntimeWarning,
                stacklevel=outside_stacklevel(),
            )
            self.fused = False
            return _FAILED

    # -- bookkeeping ---------------------------------------------------------------------------
    def _clear_pending(self):
        if getattr(self, "_pending_theta", False):  # a discarded sample: its buffers hold θ, and an
            self._check_groups()  # (σ from the groups' values: refuse bad ones before converting)
            self._theta_to_noise()  # antithetic mirror may still need ε (μ and h are unchanged)
        self._converted: set = set()  # (only those converted before a rejection are skipped above)
        # p -> (its group, the group's N, δ, T at the draw) for buffers that received θ in place
        self._drawn: dict[torch.Tensor, tuple[dict, dict]] = {}
        self._drawn_groups: list[tuple[dict, dict]] = []  # (the same, once per group)
        self._pending_theta = False  # the pending sample's θ lives in state["noise"] (see _draw_inplace)
        self._n_samples = 0  # weight samples drawn for training since the last step
        self._sign = 1.0  # the single pending sample is θ = μ + sign · σ ⊙ state["noise"]
        self._work: dict[torch.Tensor, torch.Tensor] = {}  # its θ buffers, reused as workspace
        self._grad_acc: dict[torch.Tensor, torch.Tensor] = {}  # with several samples
        self._mean_shown = False  # p.grad holds the mean over the pending samples (see _show_mean)
        self._tainted = False  # a failed block added to pre-existing gradients (until zero_grad)
        self._hess_acc: dict[torch.Tensor, torch.Tensor] = {}  # summed ĥ over samples
        self._batch = None
        self._block_marks = (True, None)  # (gradients changed inside the last block, their marks at exit)
        self._idle_blocks = 0  # training blocks since the last step with no backward inside
        self._clean_marks = self._grad_marks()  # gradients as zero_grad / step left them
        self._outside_before = False  # gradients accumulated outside any block before the first
        self._reduced = False  # estimates all-reduced over ranks into _hess_acc this step
        if getattr(self, "_noise_sum", None) is not None:  # a pending noise all-reduce must finish
            self._noise_sum[0].wait()
        self._noise_sum = None  # (handle, buffer, {p: unit noise}) of the in-flight Σ_r ε_r
        self._noise_summed: dict[torch.Tensor, torch.Tensor] = {}
        self._flip_pending = None  # Flipout plans of the pending sample whose Σ_r ε_r is implicit

    def _accumulated_outside(self, now: dict) -> bool:
        """Did a backward add to the gradients (marks ``now``) since zero_grad / the last step,
        before any sample? (Zeroed gradients do not count: ``model.zero_grad(set_to_none=False)``
        also edits them.) A parameter trained now that zero_grad did not see (added or unfrozen
        since) counts if it holds a gradient."""
        return any(
            m is not None and m != self._clean_marks.get(p) and bool(p.grad.any()) for p, m in now.items()
        )

    def _grad_marks(self) -> dict:
        """Which gradient tensor each trained parameter holds and its version: changes exactly when
        a backward accumulates into it (or it is replaced / edited in place). Keyed by parameter:
        the trained set changes with ``requires_grad`` and ``add_param_group``."""
        return {p: None if p.grad is None else (id(p.grad), p.grad._version) for _, p in self._params()}

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
            dtypes = {k: d or p.dtype for k, d in self._state_dtypes.items()}
            fmt = torch.preserve_format
            state["exp_avg"] = torch.zeros_like(p, dtype=dtypes["exp_avg"], memory_format=fmt)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtypes["exp_avg_sq"], memory_format=fmt)
            state["hess"] = torch.full_like(
                p, group["hess_init"], dtype=dtypes["hess"], memory_format=torch.preserve_format
            )
        return state

    def _h_eff(self, group, p) -> torch.Tensor:
        return self._state(group, p)["hess"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and forget weight samples drawn since the last step. Inside
        :meth:`sampled_params` (Lightning's closure calls it there) it only zeroes the gradients:
        the sample being drawn stays pending for :meth:`step`."""
        super().zero_grad(set_to_none=set_to_none)
        if not self._inside:
            self._clear_pending()

    # -- sampling ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def sampled_params(self, train: bool = True):
        """Load a posterior sample into the parameters; restore the means on exit, always.

        With ``train=True`` the sample is recorded for the next :meth:`step` (call ``backward``
        inside the block). Entering several times before ``step`` averages over the samples: after
        each block ``p.grad`` holds the mean gradient so far (what clipping sees and the step uses).
        ``train=False`` draws an independent sample and records nothing, from a generator of its
        own (saved in the checkpoint), so evaluating between steps leaves training as it was
        (through eval-mode BatchNorm, whose running statistics belong to other weights, prefer
        ``ef.predict(..., bn_data=...)``, which recomputes them for each sample).
        """
        if self._inside and self._closure_sampled:
            raise RuntimeError(
                "step(closure) already runs the closure inside sampled_params(train=True): take the "
                "`with opt.sampled_params():` block out of the closure (or run your block, then call "
                "step() without a closure)"
            )
        if self._inside:
            raise RuntimeError("sampled_params() contexts cannot be nested")
        self._check_groups()
        self._check_placement()
        if train and self._tainted:
            raise RuntimeError(
                "an earlier sampled_params(train=True) block raised after its backward had added to "
                "gradients that existed before it; they cannot be told apart: call zero_grad() "
                "before sampling again"
            )
        if train and self._mean_shown:
            self._take_back_mean()  # (p.grad shows the samples' mean: back into the sums)
        elif train and self._n_samples == 1:
            self._fold_pending()  # (moves the gradients away: marks after it)
        entry = self._grad_marks() if train else None  # (the draw below leaves the gradients alone)
        if train and self._n_samples == 0 and self._accumulated_outside(entry):
            self._outside_before = True  # refused at step(), which says why
        sign = 1.0
        if train:
            sign = -1.0 if (self.antithetic and self._phase == 1) else 1.0
            self._phase = (1 - self._phase) if self.antithetic else 0
        means: dict[torch.Tensor, torch.Tensor] = {}
        self._inside = True
        completed = False
        try:
            with torch.no_grad():
                todo = []  # (p, h, unit noise, group)
                if not train:  # (a stream of its own: evaluating leaves the training samples alone)
                    gen = self._eval_generator()
                else:
                    gen = self._noise_generator(record=True) if sign > 0 else None
                shift = None  # reused noise: each tensor's last ε rolled by a random offset
                if train and sign > 0:
                    self._pair += 1
                    if self._reuses_noise():
                        shift = int(torch.randint(0, 2**62, (), generator=gen, device=gen.device))
                for group, p in self._params():
                    if group["temperature"] == 0:
                        continue
                    st = self._state(group, p)
                    if train:
                        new = "noise" not in st
                        if new:
                            st["noise"] = torch.empty_like(p, memory_format=torch.preserve_format)
                        if sign > 0:
                            if shift is not None and _rollable(st, self._pair):
                                _roll_noise_(st["noise"], shift)
                            else:
                                _fill_normal(st["noise"], gen)
                            st["noise_pair"] = self._pair
                        elif new or st.get("noise_pair", self._pair) != self._pair:
                            # an antithetic mirror for a tensor that was not in its pair's first draw
                            # (unfrozen or added since, or its temperature raised from 0): its buffer
                            # is empty or stale, so it gets fresh unit noise (−ε is as good a draw)
                            gen = gen or self._refill_generator()
                            _fill_normal(st["noise"], gen)
                            st["noise_pair"] = self._pair
                        unit = st["noise"]
                    else:
                        unit = _fill_normal(torch.empty_like(p), gen)
                    todo.append((p, st["hess"], unit, group))
                mode = self._world()[0] if train and todo else "off"
                inplace = bool(train and todo and mode in ("off", "shared"))  # θ over state["noise"]
                if train and todo and mode == "flipout":  # θ in a workspace (ζ stays intact)
                    thetas_new = self._flipout_draw(todo, sign)
                else:
                    thetas_new = self._draw_inplace(todo, sign) if inplace else self._draw(todo, sign)
                    if inplace:  # fresh θ in every buffer: none holds ε yet
                        self._converted = set()
                        keys = ("n_data", "prior_precision", "temperature")  # (σ as drawn: one per group)
                        drawn_with = {id(g): (g, {k: g[k] for k in keys}) for *_, g in todo}
                        self._drawn = {p: drawn_with[id(g)] for p, _, _, g in todo}
                        self._drawn_groups = list(drawn_with.values())
                if not train:  # a posterior sample: around the averaged means (see `averaging`)
                    thetas_new = self._around_average(todo, thetas_new)
                for p, theta in zip([t[0] for t in todo], thetas_new):
                    means[p] = p.data
                    p.data = theta.view_as(p.data)
                if not train:  # (T = 0: no noise, the sample is the posterior mean)
                    for group, p in self._params():
                        avg = self._average(group, p) if group["temperature"] == 0 else None
                        if avg is not None:
                            means[p] = p.data
                            p.data = avg.clone()
                weights_changed()
                first = train and todo and self.hessian == "reparam" and self._n_samples == 0
                if first and mode == "per-rank":  # overlap Σ_r ε_r with fwd and bwd
                    self._start_noise_sum({t[0]: t[2] for t in todo})
            yield
            completed = True
        finally:
            with torch.no_grad():
                thetas = {}
                for p, mu in means.items():
                    thetas[p] = p.data
                    p.data = mu
                weights_changed()
                if means and inplace and not completed:  # the buffers hold θ: back to ±ε
                    self._theta_to_noise()
            self._inside = False
            if train and not completed:
                self._discard_failed_block(entry)
        # only reached without an exception: record the sample
        if train and completed:
            marks = self._grad_marks()  # did a backward run inside the block? (see step)
            ran = _marks_changed(marks, entry)
            self._block_marks = (ran, marks)
            self._idle_blocks += not ran
            if self._n_samples == 0:
                self._sign = sign
                self._work = {} if inplace else thetas  # separate θ buffers become the step's workspace
                self._pending_theta = inplace
            else:
                self._accumulate(sign, theta_in_noise=inplace)
                self._show_mean(self._n_samples + 1)
                self._block_marks = (self._block_marks[0], self._grad_marks())
            self._n_samples += 1

    def _around_average(self, todo, thetas) -> list[torch.Tensor]:
        """θ = μ + σ ⊙ ε moved to the averaged mean: θ + (μ̄ − μ) where an average exists."""
        out = []
        for (p, _, _, group), theta in zip(todo, thetas):
            avg = self._average(group, p)
            out.append(theta if avg is None else theta.view_as(p.data).add_(avg).sub_(p.data))
        return out

    def _flipout_draw(self, todo, sign) -> list[torch.Tensor]:
        """Flipout under DDP: rank r's sample θ = μ + sign · σ ⊙ ε_r with ε_r = ζ ⊙ a_r b_rᵀ
        (every tensor seen as a matrix, rows × the rest; ζ the shared unit noise in
        state["noise"], left intact), written into a reused workspace. The rank-one sign matrices
        (Wen et al. 2018) take rows + cols random signs per tensor and rank instead of rows · cols;
        they are drawn from the step's recorded seed (the same for both halves of an antithetic
        pair, and after a resume). Every rank knows Σ_q ε_q = ζ ⊙ Σ_q a_q b_qᵀ, which the
        ``reparam`` estimate needs: the fused step forms it on the fly, other paths materialise it
        (:meth:`_materialize_flipout_sums`). Returns the samples."""
        _, world, rank = self._world()
        kinds: dict[tuple, list[int]] = {}  # the signs are drawn per (device, dtype) of the weights
        for j, (p, *_) in enumerate(todo):
            kinds.setdefault((p.device, p.dtype), []).append(j)
        thetas: list = [None] * len(todo)
        plans = []
        for k, (kind, idx) in enumerate(kinds.items()):
            plan = self._flipout_plan(kind, [todo[j] for j in idx], world)
            seed = (self._noise_seed + 0x2545F4914F6CDD1D * k) % 2**62
            if plan["seed"] != seed:  # (an antithetic mirror reuses its pair's factors)
                flipout_factors(seed, world, plan["signs"].shape[1], self._rank_generator, *kind,
                                out=plan["signs"])  # fmt: skip
                plan["seed"] = seed
            if plan["fused"] is None or self._run_flipout_kernel(plan, sign, rank) is _FAILED:
                for p, h, zeta, g, A, B, theta in plan["rows"]:
                    shape_a, shape_b = _factor_shapes(p)
                    torch.mul(zeta, A[rank].view(shape_a), out=theta).mul_(B[rank].view(shape_b))
                    inv_sigma = _inv_sigma(h, g["n_data"], g["prior_precision"], g["temperature"])
                    torch.addcdiv(p.data, theta, inv_sigma, value=sign, out=theta)
            for j, row in zip(idx, plan["rows"]):
                thetas[j] = row[6]
            plans.append(plan)
        self._flip_pending = plans if self.hessian == "reparam" else None
        return thetas

    def _flipout_plan(self, kind, todo, world) -> dict:
        """The reused workspace of :meth:`_flipout_draw` for tensors of one (device, dtype): the θ
        buffer, the sign-factor buffer, the per-tensor views and the compiled kernels' argument
        lists, rebuilt only when the tensors, their storage or the world change."""
        states = [self.state[p] for p, *_ in todo]
        key = (world, self.fused, tuple(
            (id(p), p.data_ptr(), h.data_ptr(), z.data_ptr(), st["exp_avg"].data_ptr(),
             st["exp_avg_sq"].data_ptr(), id(g)) for (p, h, z, g), st in zip(todo, states)))  # fmt: skip
        plan = self._flip_buffers.get(kind)
        if plan is not None and plan["key"] == key:
            return plan
        device, dtype = kind
        dims = [_matrix_dims(p) for p, *_ in todo]
        buf = torch.empty(sum(p.numel() for p, *_ in todo), device=device, dtype=dtype)
        signs = torch.empty(world, _padded(sum(r + c for r, c in dims)), device=device, dtype=dtype)
        rows = []  # (p, h, ζ, group, A (R, rows), B (R, cols), θ view)
        i = o = 0
        for (p, h, zeta, group), (r, c) in zip(todo, dims):
            n = p.numel()
            rows.append((p, h, zeta, group, signs[:, o : o + r], signs[:, o + r : o + r + c],
                         buf[i : i + n].view(p.shape)))  # fmt: skip
            i, o = i + n, o + r + c
        fused = None  # the compiled kernels' arguments: 2-D views, contiguous tensors, one group
        one_group = len({id(row[3]) for row in rows}) == 1
        if self.fused and one_group and all(r[0].is_contiguous() and r[2].is_contiguous() for r in rows):
            fused = {k: [] for k in ("mu", "h", "z", "A", "B", "theta", "m", "v")}
            for (p, h, zeta, _, A, B, theta), st in zip(rows, states):
                r, c = A.shape[1], B.shape[1]
                for k, x in zip(("mu", "h", "z", "theta", "m", "v"),
                                (p.data, h, zeta, theta, st["exp_avg"], st["exp_avg_sq"])):  # fmt: skip
                    fused[k].append(x.view(r, c))
                fused["A"].append(A.unsqueeze(2))
                fused["B"].append(B.unsqueeze(1))
        plan = self._flip_buffers[kind] = dict(key=key, rows=rows, signs=signs, fused=fused, seed=None)
        return plan

    def _run_flipout_kernel(self, plan, sign, rank):
        g, first = plan["rows"][0][3], plan["rows"][0][0]
        n, d, t = g["n_data"], g["prior_precision"], g["temperature"]
        hp = torch.tensor([sign, n / t, d / t], dtype=first.dtype, device=first.device)
        f = plan["fused"]
        args = [f[k] for k in ("mu", "h", "z", "A", "B", "theta")]
        return self._run_fused("flipout_sample", *args, hp, rank)

    def _flipout_noise_sum(self, into_workspace: bool = False) -> dict[torch.Tensor, torch.Tensor]:
        """Σ_q ε_q = ζ ⊙ Σ_q a_q b_qᵀ of the pending Flipout sample, per parameter: new tensors (for
        inspection), or ``into_workspace`` written over the θ workspace (free once the backward has
        run)."""
        out = {}
        for plan in self._flip_pending or []:
            for p, _, zeta, _, A, B, theta in plan["rows"]:
                dest = theta if into_workspace else torch.empty_like(theta)
                torch.mm(A.T, B, out=dest.view(A.shape[1], B.shape[1]))
                out[p] = dest.mul_(zeta)
        return out

    def _materialize_flipout_sums(self) -> None:
        """Σ_q ε_q of the pending Flipout sample into its θ workspace and ``_noise_summed``, for
        the paths that read it as a tensor."""
        for p, total in self._flipout_noise_sum(into_workspace=True).items():
            self._noise_summed[p] = total
            self._work.pop(p, None)  # (the workspace now holds the noise)
        self._flip_pending = None

    def _drop_noise_sum(self) -> None:
        if self._noise_sum is not None:  # an in-flight collective must complete before it is dropped
            self._noise_sum[0].wait()
            self._noise_sum = None
        self._noise_summed = {}

    def _fold_pending(self):
        """Move the single pending sample into the accumulators (a second sample is coming)."""
        if self._noise_sum is not None:  # independent per-rank: several samples' estimates are
            self._drop_noise_sum()  # reduced instead of the noise
        self._accumulate(self._sign, theta_in_noise=self._pending_theta)  # (a flipout sum Σ_r ε_r,
        self._pending_theta = False  # local, is read here)
        self._drop_noise_sum()
        self._work = {}

    def _show_mean(self, n: int) -> None:
        """With several samples pending, ``p.grad`` shows their mean gradient between blocks and
        before :meth:`step`, as a user's code (gradient clipping, logging) expects; what it does to
        ``p.grad`` is what the step uses. (The sums stay in ``_grad_acc``.)"""
        for p, acc in self._grad_acc.items():
            p.grad = acc / n
        self._mean_shown = True

    def _discard_failed_block(self, entry: dict) -> None:
        """A training block that raised records no sample; the gradients its backward may have
        added are dropped, so that neither step() nor a retried block counts them."""
        params = [p for _, p in self._params()]
        if self._n_samples:  # the pending samples' gradients were set aside at entry
            for p in params:
                p.grad = None
            self._show_mean(self._n_samples)
            return
        now_marks = self._grad_marks()
        for p in params:
            was, now = entry.get(p), now_marks[p]
            if was is None:
                p.grad = None
            elif now != was:  # added to a gradient that was there before: not separable
                self._tainted = True

    def _take_back_mean(self) -> None:
        """Before another sample: the shown mean (as the user left it) times n becomes the sum."""
        n = self._n_samples
        for p in list(self._grad_acc):
            if p.grad is None:  # (the user dropped it: the parameter skips this step)
                del self._grad_acc[p]
            else:
                self._grad_acc[p] = p.grad.detach().mul(n)
                p.grad = None
        self._mean_shown = False

    def _accumulate(self, sign: float, theta_in_noise: bool = False):
        if self._flip_pending is not None:  # the estimate reads Flipout's Σ_r ε_r as a tensor
            self._materialize_flipout_sums()
        if theta_in_noise:  # the sample's θ is in state["noise"]: turn it into sign · ε first
            self._theta_to_noise()
            sign = 1.0
        for group, p in self._params():
            if p.grad is None:
                continue
            g = p.grad.detach()
            if p in self._grad_acc:
                self._grad_acc[p].add_(g)
            else:
                self._grad_acc[p] = g.clone()
            est = self._optimizer_side_estimate(group, p, g, sign)
            if est is not None:
                if p in self._hess_acc:
                    self._hess_acc[p].add_(est)
                else:
                    self._hess_acc[p] = est
            p.grad = None

    def _optimizer_side_estimate(self, group, p, g, sign):
        if self.hessian == "reparam":
            st = self.state.get(p, {})
            drawn_with = self._drawn[p][1] if p in self._drawn else group  # (σ of the sample)
            if drawn_with["temperature"] == 0 or "noise" not in st:
                return None
            inv_sigma = _inv_sigma(
                st["hess"], drawn_with["n_data"], drawn_with["prior_precision"], drawn_with["temperature"]
            )
            noise = self._noise_summed.get(p, st["noise"])  # flipout: Σ_r ε_r, known locally
            return torch.mul(g, noise).mul_(inv_sigma).mul_(sign)  # g (θ − μ) / σ²
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
        :meth:`sampled_params` and its loss is returned; when a sample is already pending (the
        user's own block, as in Lightning's manual optimisation, which passes a do-nothing
        closure), the closure runs as it is.
        """
        loss = None
        self._check_groups()
        self._check_placement()
        if self._tainted:
            raise RuntimeError(
                "a sampled_params(train=True) block raised after its backward had added to gradients "
                "that existed before it; they cannot be told apart: call zero_grad(). Nothing was updated"
            )
        if closure is not None:
            # a sample already pending (Lightning's manual optimisation passes a do-nothing closure
            # after the user's own block): the closure runs as it is, not as a second sample
            block = contextlib.nullcontext() if self._n_samples else self.sampled_params(train=True)
            self._closure_sampled = not self._n_samples
            try:
                with torch.enable_grad(), block:
                    loss = closure()
            finally:
                self._closure_sampled = False
            if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
                return self._reject(f"the loss is {float(loss)}", loss)
        needs_sample = any(g["temperature"] > 0 for g in self.param_groups)
        if self._n_samples and self._outside_before:
            raise RuntimeError(
                "gradients were accumulated before the sampled_params() block, at the means (e.g. "
                "Lightning's accumulate_grad_batches in automatic optimisation, whose backward for "
                "all but the last micro-batch runs outside optimizer.step): every backward belongs "
                "inside `with opt.sampled_params(train=True):` (or use opt.train_step(..., "
                "accumulate=k), or manual optimisation); a parameter added by add_param_group since "
                "the last zero_grad() keeps the gradient it had: call zero_grad() first. Nothing was "
                "updated"
            )
        if self._n_samples > 1 and self._idle_blocks:
            raise RuntimeError(
                f"{self._idle_blocks} of the {self._n_samples} sampled_params(train=True) blocks since "
                "the last step ran no backward: each block records a sample, and the gradient would "
                "be averaged over all of them (use train=False to evaluate at a sample). Nothing "
                "was updated"
            )
        inside, marks = self._block_marks
        if self._n_samples and not inside and _marks_changed(self._grad_marks(), marks):
            raise RuntimeError(
                "the gradients changed after the sampled_params() block exited, and not inside it: "
                "call loss.backward() inside `with opt.sampled_params(train=True):`. Outside, the "
                "parameters hold the means again, and the gradient mixes the sample and the mean "
                "(nothing was updated)"
            )
        sparse = next((p for _, p in self._params() if p.grad is not None and p.grad.is_sparse), None)
        if sparse is not None:  # (before any group is updated)
            raise RuntimeError(
                f"BayesAdam does not support sparse gradients (a parameter of shape {tuple(sparse.shape)}: "
                "an nn.Embedding(..., sparse=True)? Built with sparse=False its gradient is dense). "
                "Nothing was updated"
            )
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
        if self._pending_theta and not self._grad_acc and self._drawn_edited():
            # N, δ or T changed since the sample was drawn: its ε and its estimate need the σ it was
            # drawn with, which the path for several samples uses (the kernels read the groups' new
            # values); the step itself uses the new ones
            self._fold_pending()
        if self._pending_theta and not self._grad_acc:  # one sample, θ in the noise buffers: the
            # estimate and an antithetic mirror need sign · ε = (θ − μ)/σ, from μ and h before the
            # update; the fused reparam kernel computes it itself (and writes it back), the
            # other paths convert first. Either way the estimate then uses sign 1.
            if self.hessian != "reparam" and not self._given_fusable():
                self._theta_to_noise()
                self._pending_theta = False
            else:  # tensors the update skips (no gradient) keep their ε too; the others are
                # converted by the fused kernels or just before the eager update
                self._theta_to_noise(without_grad_only=True)
            self._sign = 1.0
        n = max(self._n_samples, 1)
        many = bool(self._grad_acc)
        if many and not self._mean_shown:  # several samples: fold the last one, then average
            self._fold_pending()
            for p, g in self._grad_acc.items():
                p.grad = g.div_(n)
        # (else p.grad holds the mean already, shown after the last block, maybe clipped since)
        mode, world, _ = self._world()
        if mode != "off" and needs_sample:  # before the finiteness check: every rank decides alike
            self._reduce_curvature(mode, world)
        bad = _first_nonfinite(
            [p.grad for _, p in self._params() if p.grad is not None] + list(self._hess_acc.values())
        )
        if bad:
            return self._reject(f"a {bad} is not finite", loss)

        if self._flip_pending is not None and not self._flipout_step_fusable(many):
            self._materialize_flipout_sums()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            # group parameters by their step counts (they agree unless parameters joined late)
            buckets: dict[tuple[int, int], list] = {}
            for p in group["params"]:
                if not p.requires_grad or p.grad is None:
                    continue
                st = self._state(group, p)
                noise, work = None, self._work.get(p)
                if many or self.estimator.needs_model or self._reduced:
                    est = self._hess_acc.get(p)
                    est = None if est is None else est.div_(n)
                elif (
                    self.hessian == "reparam"
                    and group["temperature"] > 0
                    and "noise" in st
                    and (work is not None or self._n_samples == 1)
                ):  # the single sample: its noise (θ drawn in place: no workspace, slices' scratch)
                    est, noise = None, self._noise_summed.get(p, st["noise"])
                else:
                    est = self._optimizer_side_estimate(group, p, p.grad, self._sign)
                st["step"] += 1
                if est is not None or noise is not None:
                    st["hess_step"] += 1
                buckets.setdefault((st["step"], st["hess_step"]), []).append((p, st, est, noise, work))
            self._averaged, fresh = set(), set()
            if self.fused and group.get("averaging") is not None and group["temperature"] > 0:
                for p, st, *_ in (it for items in buckets.values() for it in items):
                    if "mean_avg" not in st:  # (the kernels update it; it starts at the new μ)
                        st["mean_avg"] = p.detach().clone(memory_format=torch.preserve_format)
                        fresh.add(p)
            for (step, hess_step), items in buckets.items():
                if self.fused and group["temperature"] > 0:
                    items = self._fused_reparam(group, items, step, hess_step)
                    if self._given_fusable():
                        items = self._fused_given(group, items, step, hess_step)
                if self._pending_theta and self.hessian != "reparam" and group["temperature"] > 0:
                    for p, st, *_ in items:  # θ still in these buffers: ε first, from the old μ, h
                        if "noise" in st:
                            _noise_from_theta_(st["noise"], p.data, st["hess"], group)
                if not items:
                    continue
                bayesadam_update(
                    [p for p, *_ in items],
                    [p.grad for p, *_ in items],
                    [st["exp_avg"] for _, st, *_ in items],
                    [st["exp_avg_sq"] for _, st, *_ in items],
                    [st["hess"] for _, st, *_ in items],
                    [it[2] for it in items],
                    [it[3] for it in items],
                    [it[4] for it in items],
                    noise_sign=self._sign,
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
                    foreach=self.foreach,
                    noise_is_theta=self._pending_theta,
                )
            for (step, _), items in buckets.items():  # (μ of every item updated, fused or not)
                self._average_means(group, [(p, st) for p, st, *_ in items], step, fresh)
        self._pending_theta = False  # converted (and μ, h updated): nothing left to turn back
        self._clear_pending()
        if self.auto_prior:
            self._maybe_update_prior()
        return loss

    @torch.no_grad()
    def _average_means(self, group: dict, pairs: list, step: int, fresh=()) -> None:
        """Polynomial-decay average of the means just updated (see ``averaging``): the average
        moves towards μ by (η+1)/(t+η) after step t; a tensor without one yet starts at μ.
        Tensors in ``self._averaged`` were moved by the step kernel already; ``fresh`` ones were
        created for this step (from μ before it) and start at μ."""
        fraction = group.get("averaging")
        if fraction is None:
            for _, st in pairs:  # (turned off: the posterior is the last iterate again)
                st.pop("mean_avg", None)
            return
        for p, st in pairs:
            if p in fresh:
                st["mean_avg"].copy_(p.detach())
        done = self._averaged | set(fresh)
        pairs = [(p, st) for p, st in pairs if p not in done]
        old = [(p, st) for p, st in pairs if "mean_avg" in st]
        for p, st in pairs:
            if "mean_avg" not in st:
                st["mean_avg"] = p.detach().clone(memory_format=torch.preserve_format)
        if old:  # (lerp with weight 1, at step 1, gives μ exactly)
            avgs, mus = [st["mean_avg"] for _, st in old], [p.detach() for p, _ in old]
            torch._foreach_lerp_(avgs, mus, averaging_weight(fraction, step))

    def _average(self, group: dict, p: torch.Tensor) -> torch.Tensor | None:
        """The averaged means of ``p`` (its posterior mean when averaging), or None (then μ)."""
        st = self.state.get(p)
        if group.get("averaging") is not None and st and "mean_avg" in st:
            return st["mean_avg"]
        return None

    @torch.no_grad()
    def load_averaged_means(self) -> None:
        """Copy the averaged means (the posterior's mean) into the parameters, which hold the
        last iterate during training; training goes on from there. ``ef.fit`` calls this at its
        end. Nothing to do without ``averaging``."""
        self._refuse_inside("load_averaged_means()")
        for group, p in self._params():
            avg = self._average(group, p)
            if avg is not None:
                p.copy_(avg)
        weights_changed()

    @torch.no_grad()
    def _maybe_update_prior(self):
        for group in self.param_groups:
            states = [self.state[p] for p in group["params"] if p.requires_grad and self.state.get(p)]
            if not states or states[0]["step"] % self.prior_update_every:
                continue
            if states[0]["step"] < self.prior_warmup:
                continue
            params = [p for p in group["params"] if p.requires_grad and self.state.get(p)]
            sq = sum(float(p.double().pow(2).sum()) for p in params)
            dev = states[0]["hess"].device
            nh = torch.cat([st["hess"].to(dev, torch.float64).reshape(-1) for st in states])
            nh = nh.clamp_min_(0).mul_(group["n_data"])
            d0 = group["prior_precision"]
            # the evidence-maximising δ, MacKay's δ = γ/‖μ‖², as the exact root (50 fixed-point
            # iterations stopped short where γ(δ)/‖μ‖² contracts slowly)
            d = min(max(math.exp(best_log_delta(sq, nh, math.log(d0))[0]), 1e-8), 1e8)
            # move at most a factor 2 per update: the running curvature is noisy early on
            group["prior_precision"] = min(max(d, d0 / 2), d0 * 2)

    def _fused_reparam(self, group, items, step, hess_step):
        """Update the single-sample reparam tensors with the compiled kernel; return the rest."""
        rest = []
        beta1, beta2 = group["betas"]
        n, d, t = group["n_data"], group["prior_precision"], group["temperature"]
        beta = hess_beta_at(group["hess_beta"], hess_step, False)
        hp_list = [
            self._sign, n / t, d / t, 1.0 - beta, 0.5 * (1.0 - beta) ** 2 * n / t, d / n,
            1.0 - beta1, beta2, 1.0 - beta2, math.sqrt(1.0 - beta2**step), group["eps"],
            -group["lr"] / (1.0 - beta1**step), dither(step, 0), dither(hess_step, 1),
        ]  # fmt: skip
        todo = []
        for item in items:
            p, st, est, noise, _ = item
            if est is not None or noise is None:
                rest.append(item)
            else:
                todo.append(item)
        if self._flip_pending is not None:  # Flipout: Σ_r ε_r formed inside the kernel
            return rest + self._fused_flipout_step(todo, hp_list)
        if not todo or len({(it[0].dtype, it[0].device) for it in todo}) > 1:
            return rest + todo
        hp = torch.tensor(hp_list, dtype=todo[0][0].dtype, device=todo[0][0].device)
        cols = [
            _kernel_views(col)
            for col in (
                [it[0].data for it in todo], [it[0].grad for it in todo],
                [it[1]["exp_avg"] for it in todo], [it[1]["exp_avg_sq"] for it in todo],
                [it[1]["hess"] for it in todo], [it[3] for it in todo],
            )
        ]  # fmt: skip
        name = "reparam_step_theta" if self._pending_theta else "reparam_step"
        if not self._run_step_kernel(name, todo, cols, hp, group, step):
            return rest + todo
        return rest

    def _given_fusable(self) -> bool:
        """Whether model-side estimates can be applied by the compiled kernel (non-negative keys;
        the signed ones, e.g. hutchinson, keep the eager positivity-preserving update)."""
        return bool(self.fused and self.estimator.needs_model and self.estimator.nonnegative)

    def _fused_given(self, group, items, step, hess_step):
        """Update the tensors with a model-side estimate with the compiled kernel (turning a
        pending θ back into ε in the same pass); return the rest."""
        beta1, beta2 = group["betas"]
        n, d, t = group["n_data"], group["prior_precision"], group["temperature"]
        beta = hess_beta_at(group["hess_beta"], hess_step, True)
        rest, todo = [], []
        for item in items:
            p, st, est, noise, _ = item
            usable = est is not None and noise is None and (not self._pending_theta or "noise" in st)
            (todo if usable else rest).append(item)
        if not todo or len({(it[0].dtype, it[0].device) for it in todo}) > 1:
            return rest + todo
        hp_list = [
            n / t, d / t, 1.0 - beta, d / n, 1.0 - beta1, beta2, 1.0 - beta2,
            math.sqrt(1.0 - beta2**step), group["eps"], -group["lr"] / (1.0 - beta1**step),
            dither(step, 0), dither(hess_step, 1),
        ]  # fmt: skip
        hp = torch.tensor(hp_list, dtype=todo[0][0].dtype, device=todo[0][0].device)
        cols = [
            [it[0].data for it in todo], [it[0].grad for it in todo], [it[1]["exp_avg"] for it in todo],
            [it[1]["exp_avg_sq"] for it in todo], [it[1]["hess"] for it in todo], [it[2] for it in todo],
        ]  # fmt: skip
        if self._pending_theta:
            cols.append([it[1]["noise"] for it in todo])
        cols = [_kernel_views(col) for col in cols]
        name = "given_step_theta" if self._pending_theta else "given_step"
        if not self._run_step_kernel(name, todo, cols, hp, group, step):
            return rest + todo
        return rest

    def _run_step_kernel(self, name, todo, cols, hp, group, step) -> bool:
        """Run the step kernel ``name`` over ``todo``; False when it cannot run (go eager). Where
        every tensor has an averaged mean, its ``_avg`` variant, which also moves them towards the
        new μ in the same pass (saving the averaging's own pass over μ̄ and μ, ~0.1 ms of a 3.6 ms
        step on the MLP of ``benchmarks/step_cost.py``); those tensors are then marked done for
        :meth:`_average_means`."""
        if group.get("averaging") is None or not all("mean_avg" in it[1] for it in todo):
            return self._run_fused(name, *cols, hp) is not _FAILED
        first = todo[0][0]
        aw = torch.tensor([averaging_weight(group["averaging"], step)], dtype=first.dtype,
                          device=first.device)  # fmt: skip
        avgs = _kernel_views([it[1]["mean_avg"] for it in todo])
        if self._run_fused(name + "_avg", *cols, avgs, hp, aw) is _FAILED:
            return False
        self._averaged.update(it[0] for it in todo)
        return True

    def _flipout_step_fusable(self, many: bool) -> bool:
        """Whether the pending Flipout sample's update can run as the compiled kernel that forms
        Σ_r ε_r on the fly: one plan with kernel arguments, one sample, every tensor with a
        gradient and the same step counts."""
        plans = self._flip_pending
        if not self.fused or many or self._reduced or len(plans) != 1 or plans[0]["fused"] is None:
            return False
        rows = plans[0]["rows"]
        if any(p.grad is None or p.grad.is_sparse for p, *_ in rows) or rows[0][3]["temperature"] == 0:
            return False
        return len({(self.state[p]["step"], self.state[p]["hess_step"]) for p, *_ in rows}) == 1

    def _fused_flipout_step(self, todo, hp_list):
        """Run the compiled Flipout update over ``todo`` (the plan's tensors); on a mismatch or a
        compilation failure materialise Σ_r ε_r and hand the items back for the eager update."""
        plan = self._flip_pending[0]
        f = plan["fused"]
        if [id(it[0]) for it in todo] == [id(row[0]) for row in plan["rows"]]:
            first = todo[0][0]
            hp = torch.tensor(hp_list, dtype=first.dtype, device=first.device)
            grads = [p.grad.reshape(m.shape) for (p, *_), m in zip(todo, f["m"])]
            if self._run_fused("reparam_step_flipout", f["mu"], grads, f["m"], f["v"], f["h"], f["z"],
                               f["A"], f["B"], hp) is not _FAILED:  # fmt: skip
                return []
        self._materialize_flipout_sums()
        return [(p, st, est, self._noise_summed.get(p, noise), None) for p, st, est, noise, _ in todo]

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
        accumulate: int = 1,
    ) -> torch.Tensor:
        """Zero grads, sample weights ``mc_samples`` times, forward, backward, curvature, step.

        Works for every ``hessian=`` key. ``accumulate=k`` splits the batch into k micro-batches
        (forward and backward one at a time, so activation memory is that of a micro-batch) under
        the same weight sample: gradients and curvature are weighted by micro-batch size, so the
        step equals one on the whole batch (for ``kfac`` the Kronecker factors are per micro-batch,
        a slightly different approximation). Returns the minibatch-mean loss (averaged over samples).

        It trains, so it runs with gradients enabled, as ``step(closure)`` runs its closure (under
        ``torch.no_grad()`` it failed with "element 0 of tensors does not require grad"); inside
        ``torch.inference_mode()``, where autograd cannot run, it is refused.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "BayesAdam.train_step trains: it cannot run inside torch.inference_mode(), where autograd "
                "is off (a Lightning validation/test/predict step runs in it); call it from training code"
            )
        with torch.enable_grad():
            return self._train_step(model, x, y, likelihood, sigma_noise, accumulate)

    def _train_step(self, model, x, y, likelihood, sigma_noise, accumulate) -> torch.Tensor:
        cf._check_batch(x, y)
        if next(self._params(), None) is None:  # (the backward failed: "element 0 ... does not require grad")
            raise ValueError(
                "train_step: every parameter of the optimizer has requires_grad=False (frozen): there is "
                "nothing to train; unfreeze some, or leave the step out"
            )
        if not (is_count(accumulate) and accumulate <= max(int(x.shape[0]), 1)):
            raise ValueError(f"accumulate must be an int in [1, batch size], got {accumulate!r}")
        accumulate = int(accumulate)
        if self.hessian in _PER_SAMPLE:  # before anything is drawn
            cf.refuse_coupled(model, f"hessian={self.hessian!r}")
        lik = likelihoods.get(likelihood, sigma_noise)
        names = self._names_in(model)
        self.likelihood = lik.name
        if lik.name == "regression":
            self.sigma_noise = float(lik.sigma_noise)
        self.zero_grad()
        b = x.shape[0]
        self._batch = b
        small = [g["n_data"] for g in self.param_groups if g["n_data"] < b]
        if small:  # n_data is the training-set size: the batch size passed for it shrinks N·h
            warnings.warn(
                f"BayesAdam.train_step: n_data={small[0]:g} is smaller than this batch of {b}; n_data is "
                "the number of training examples (the likelihood's weight against the prior), not the "
                "batch size",
                RuntimeWarning,
                stacklevel=outside_stacklevel(),
            )
        plan = self._engine_plan(model, names)
        # distributed: every rank runs backward and step even on a non-finite local loss (DDP
        # would hang otherwise); the reduced gradients carry it and step() rejects on all ranks
        distributed = self._world()[0] != "off"
        size = -(-b // accumulate)
        chunks = list(zip(x.split(size), y.split(size)))
        total = 0.0
        for _ in range(self.mc_samples):
            with self.sampled_params(train=True):
                sums, loss = {}, 0.0
                for xc, yc in chunks:
                    w = xc.shape[0] / b
                    est_c, loss_c = None, None
                    if plan is not None:
                        try:
                            est_c, loss_c = self._engine_sample(model, xc, yc, lik, plan, distributed, w)
                        except engine.Unsupported:  # e.g. a module ran twice: generic path from now on
                            self._plans[model] = (_GAVE_UP, None)
                            plan = None
                            if len(chunks) > 1:
                                raise RuntimeError("train_step: the hook engine gave up on this model "
                                                   "mid-accumulation; call again") from None  # fmt: skip
                            model.zero_grad(set_to_none=True)
                    if plan is None:
                        loss_c = lik.nll(model(xc), yc).mean()
                        if distributed or bool(torch.isfinite(loss_c)):
                            (loss_c * w).backward()
                            if self.estimator.needs_model:
                                est_c = self.estimator.fn(model, xc, yc, lik, self.generator, list(names))
                                est_c = {names[n]: t for n, t in est_c.items()}
                    loss = loss + loss_c.detach() * w
                    for p, t in (est_c or {}).items():
                        sums[p] = sums[p].add_(t) if p in sums else t
                    if not (distributed or bool(torch.isfinite(loss_c))):
                        break
                finite = bool(torch.isfinite(loss))
                if sums and (finite or distributed):
                    self.add_curvature({p: t.div_(b) for p, t in sums.items()})
            if not (finite or distributed):
                return self._reject(f"the loss is {float(loss)}", loss)
            total = total + loss
        self.step()
        return total / self.mc_samples

    def _engine_plan(self, model, names):
        """The hook-engine plan for ``model`` when this estimator can share the training pass, made
        for the parameters trained now: one made before a parameter was frozen or unfrozen would
        skip the unfrozen one's curvature (its h would stay put) or estimate a frozen one's."""
        if not (self.estimator.needs_model and self.estimator.engine_kind):
            return None
        key = tuple(names)
        cached = self._plans.get(model)
        if cached is not None and cached[0] in (key, _GAVE_UP):
            return cached[1]
        p = engine.plan(model, list(names))
        self._plans[model] = (key, p if p.backend == "hooks" else None)
        if cached is None and any(hasattr(m, "_orig_mod") for m in model.modules()):
            warnings.warn(
                f"BayesAdam.train_step with hessian={self.hessian!r} runs the torch.compile'd "
                "model eagerly: the curvature needs each layer's output, which a compiled "
                "forward does not expose ('reparam' and 'gradsq' keep the compiled forward)",
                RuntimeWarning,
                stacklevel=outside_stacklevel(),
            )
        return self._plans[model][1]

    def _engine_sample(self, model, x, y, lik, plan, distributed=False, loss_scale=1.0):
        """Forward once with hooks; backward; curvature from the same pass. Returns (batch sums of
        ĥ keyed by parameter, loss)."""
        kind = self.estimator.engine_kind
        loss, sums = cf.training_pass(
            model, x, y, lik, plan, kind, self.generator,
            proceed=lambda loss: distributed or bool(torch.isfinite(loss)), loss_scale=loss_scale,
            kfac_diagonal=True,  # the step needs diag(G ⊗ A) only
            product_dtype=self.product_dtype,
        )  # fmt: skip
        if sums is None:
            return None, loss
        if kind == "kfac":
            sums = engine.kfac_diagonal(plan, sums)
        params = dict(model.named_parameters())
        return {params[n]: s for n, s in sums.items()}, loss

    def _names_in(self, model: nn.Module, what: str = "train_step") -> dict[str, torch.Tensor]:
        mine = {p for _, p in self._params()}
        names = {n: p for n, p in model.named_parameters() if p in mine}
        if len(names) != len(mine):
            raise ValueError(f"{what}: the optimizer holds parameters that are not in `model`")
        return names

    # -- posterior -----------------------------------------------------------------------------
    def posterior(self, model: nn.Module | None = None) -> DiagGaussian:
        """``N(μ̄, diag(T / (N·h + δ)))`` over the trainable parameters (T = 1 if trained at T = 0);
        μ̄ the averaged means (``averaging``), else the running μ.

        Keys: the parameter names when the optimizer was given ``named_parameters()`` or when
        ``model`` is passed (``model``'s names), else positions ``"0"``, ``"1"``, … in the
        optimizer's order. A positional posterior matches a model through the parameters it came
        from while they live; saved and loaded, it matches by the model's order, so pass ``model``
        to save one that is keyed by name. After a regression :meth:`train_step` the posterior
        records its ``sigma_noise`` (``ef.predict``'s default). Warns if the curvature of a
        trained parameter was never estimated (``reparam`` at ``temperature=0``: no noise to
        estimate it from), or no gradient ever reached a parameter while the others trained
        (unused in the training forward), whose precision is then only ``hess_init``'s."""
        self._refuse_inside("posterior()")  # (its mean would be the sample)
        self._check_groups()
        by_param = None
        if model is not None:
            by_param = {p: n for n, p in self._names_in(model, "posterior").items()}
        mean, prec, sources = {}, {}, {}
        i = 0
        for group in self.param_groups:
            names = group.get("param_names")
            temp = group["temperature"] or 1.0
            for j, p in enumerate(group["params"]):
                i += 1
                if not p.requires_grad:  # (frozen: no posterior; `model`'s names hold only the others)
                    continue
                key = by_param[p] if by_param is not None else names[j] if names is not None else str(i - 1)
                h = self._h_eff(group, p)
                avg = self._average(group, p)
                mean[key] = (p.detach() if avg is None else avg).clone()
                prec[key] = h.to(p.dtype).mul(group["n_data"]).add_(group["prior_precision"]).div_(temp)
                sources[key] = p
        steps = {k: (self.state[p]["step"], self.state[p]["hess_step"]) for k, p in sources.items()}
        unestimated = [k for k, (step, hess_step) in steps.items() if step and not hess_step]
        # and, once others have been updated, the tensors no gradient ever reached (unused in the
        # training forward): they kept hess_init, a confident posterior for weights the data say
        # nothing about, without a word
        trained = any(step for step, _ in steps.values())
        unreached = [k for k, (step, _) in steps.items() if not step] if trained else []
        if unestimated or unreached:
            if not unestimated:
                why = "no gradient reached them while the others trained: unused in the training forward?"
            elif self.hessian == "reparam" and any(g["temperature"] == 0 for g in self.param_groups):
                why = "temperature=0 draws no weight noise, from which hessian='reparam' estimates it"
            else:
                why = "no step has updated it"
            unestimated += unreached
            warnings.warn(
                f"posterior(): the curvature of {len(unestimated)} of {len(sources)} parameter tensors "
                f"({', '.join(unestimated[:3])}{', …' if len(unestimated) > 3 else ''}) was never "
                f"estimated ({why}): their precision N·hess_init + δ is set by hess_init, not by the "
                "data, and predictions sampled from it are meaningless. Fit the curvature after "
                "training with ef.laplace(model, loader, hessian='ggn'), or train with temperature > 0 "
                "or a model-side hessian key",
                RuntimeWarning,
                stacklevel=outside_stacklevel(),
            )
        post = DiagGaussian(mean, prec)
        post.sources = sources  # which parameter each key came from (positional keys match by it)
        post.from_training = True  # (curvature from training passes: see ef.predict's bn_data)
        if self.sigma_noise is not None:  # ef.predict's default σ (it used σ = 1 whatever train_step's)
            post.sigma_noise = self.sigma_noise
        if self.likelihood is not None:  # ef.predict's default likelihood, and its check
            post.likelihood = self.likelihood
        return post

    # -- persistence ---------------------------------------------------------------------------
    def _refuse_inside(self, what: str) -> None:
        if self._inside:  # the parameters hold θ, the noise buffers θ too (the in-place draw)
            raise RuntimeError(
                f"{what} inside sampled_params(): the parameters hold a weight sample, not the means, "
                "and the sample is not recorded yet; call it outside the block (e.g. after step())"
            )

    def state_dict(self) -> dict:
        self._refuse_inside("state_dict()")
        sd = super().state_dict()
        if self._pending_theta:  # saved between a sample and its step: write the noise, not θ
            index = 0  # torch numbers the parameters across groups in order
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        st = sd["state"].get(index)
                        if st is not None and "noise" in st and p in self._drawn and p not in self._converted:
                            drawn_with = self._drawn[p][1]
                            noise = _noise_from_theta_(st["noise"].clone(), p.data, st["hess"], drawn_with)
                            sd["state"][index] = dict(st, noise=noise)
                        index += 1
        sd["bayesadam"] = {
            "hessian": self.hessian,
            "mc_samples": self.mc_samples,
            "rng_state": self.generator.get_state(),
            "eval_rng_state": None if self._eval_gen is None else self._eval_gen.get_state(),
            "antithetic_phase": self._phase,
            "noise_reuse": self.noise_reuse,
            "auto_prior": self.auto_prior,
            "skipped_steps": self.skipped_steps,
            "noise_seed": self._noise_seed,
            "noise_pair": self._pair,
            # the curvature's product precision changes the numbers: a resumed run keeps it
            "product_dtype": None if self.product_dtype is None else str(self.product_dtype).split(".")[-1],
            "sigma_noise": self.sigma_noise,
            "likelihood": self.likelihood,
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        self._refuse_inside("load_state_dict()")
        state_dict = dict(state_dict)
        extra = state_dict.pop("bayesadam", None)
        if extra is None:
            raise ValueError("load_state_dict: not a BayesAdam state dict (no 'bayesadam' entry)")
        if extra["hessian"] != self.hessian:
            raise ValueError(
                f"load_state_dict: saved with hessian={extra['hessian']!r}, this optimizer uses "
                f"hessian={self.hessian!r}"
            )
        self._check_shapes(state_dict)
        # checkpoints from before `averaging` existed trained without it: they resume without it
        state_dict["param_groups"] = [{"averaging": None, **g} for g in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
        for key, dtype in self._state_dtypes.items():  # (torch casts floating state to the parameter's dtype)
            for st in self.state.values():
                if dtype is not None and key in st:
                    st[key] = st[key].to(dtype)
        self.generator.set_state(extra["rng_state"])
        self._eval_gen = None  # (checkpoints without one: made again from the loaded generator's seed)
        if extra.get("eval_rng_state") is not None:
            self._eval_gen = torch.Generator(device=self.generator.device)
            self._eval_gen.set_state(extra["eval_rng_state"])
        self._phase = int(extra["antithetic_phase"])
        # checkpoints from before `noise_reuse` existed drew fresh noise every pair
        self.noise_reuse = int(extra.get("noise_reuse", 1))
        self.auto_prior = bool(extra.get("auto_prior", self.auto_prior))
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self.mc_samples = int(extra["mc_samples"])
        self._noise_seed = extra.get("noise_seed")
        self._pair = int(extra.get("noise_pair", 0))  # (older checkpoints: their buffers count as current)
        if "product_dtype" in extra:  # (checkpoints from before it was saved keep the constructor's)
            pd = extra["product_dtype"]
            self.product_dtype = None if pd is None else getattr(torch, pd)
        self.sigma_noise = extra.get("sigma_noise", self.sigma_noise)
        self.likelihood = extra.get("likelihood", self.likelihood)
        self._pending_theta = False  # the loaded buffers hold noise, whatever was pending before
        self._clear_pending()
        self._restore_rank_noise()

    # state buffers shaped like the parameter
    _PER_PARAM = ("exp_avg", "exp_avg_sq", "hess", "noise", "mean_avg")

    def _check_shapes(self, state_dict: dict) -> None:
        """Every saved per-parameter buffer has its parameter's shape (torch only checks the group
        sizes: a state dict of a differently shaped model with as many tensors would load, and the
        next step fail or broadcast)."""
        saved = state_dict.get("param_groups", [])
        if len(saved) != len(self.param_groups):
            return  # torch's own check names the mismatch
        for gs, g in zip(saved, self.param_groups):
            if len(gs["params"]) != len(g["params"]):
                return
            names = g.get("param_names") or [None] * len(g["params"])
            for idx, p, name in zip(gs["params"], g["params"], names):
                for key, buf in state_dict["state"].get(idx, {}).items():
                    if key in self._PER_PARAM and torch.is_tensor(buf) and buf.shape != p.shape:
                        which = f"parameter {name!r}" if name else f"parameter #{idx}"
                        raise ValueError(
                            f"load_state_dict: {which} has shape {tuple(p.shape)}, the saved "
                            f"{key!r} has shape {tuple(buf.shape)}: the state dict is from another model"
                        )


def _marks_changed(now: dict, before: dict) -> bool:
    """Whether a gradient changed between two :meth:`BayesAdam._grad_marks` (a parameter trained
    only since ``before`` changed if it holds a gradient; one no longer trained is not looked at)."""
    return any(m != before.get(p) for p, m in now.items())


def _kernel_views(tensors) -> list[torch.Tensor]:
    """A list argument of the elementwise kernels: the tensors as they are when one compiled call
    takes them all (≤ ``CHUNK_ABOVE``: 60 flattening views a step cost ~0.1 ms of a 3.6 ms step),
    else flat views (a gradient may be copied: it is only read), which the chunks need to share a
    graph."""
    tensors = list(tensors)
    if len(tensors) <= _fused.CHUNK_ABOVE:
        return tensors
    return [t.reshape(-1) for t in tensors]


_FAILED = object()
FUSED_MIN_NUMEL = 2**17
_SIGN_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _sign_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8) table of ±1: row b holds the 8 bits of byte b as signs (set bit → +1)."""
    key = (device, dtype)
    if key not in _SIGN_TABLES:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        _SIGN_TABLES[key] = (2 * bits - 1).to(device=device, dtype=dtype)
    return _SIGN_TABLES[key]


def _padded(numel: int) -> int:
    return 8 * ((numel + 7) // 8)


def random_signs(numel: int, generator: torch.Generator, device=None, dtype=torch.float32,
                 out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``numel`` independent uniform ±1 signs from ``generator``: 64 signs per random int64 (one
    table lookup per 8), about 8× cheaper than a Gaussian fill of the same size on CPU. ``out``:
    a buffer of at least ``_padded(numel)`` elements to write into (no allocation)."""
    device = torch.device(device) if device is not None else generator.device
    n_bytes = (numel + 7) // 8
    words = torch.randint(-(2**63), 2**63 - 1, ((n_bytes + 7) // 8,), dtype=torch.int64,
                          generator=generator, device=generator.device)  # fmt: skip
    idx = words.view(torch.uint8)[:n_bytes].to(device=device, dtype=torch.int32)
    table = _sign_table(device, dtype)
    if out is None:
        return torch.index_select(table, 0, idx).reshape(-1)[:numel]
    torch.index_select(table, 0, idx, out=out[: 8 * n_bytes].view(n_bytes, 8))
    return out[:numel]


def flipout_factors(seed: int, world: int, length: int, generator_for, device=None,
                    dtype=torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(world, length) random signs, row q drawn from ``generator_for(seed, q)``: every rank draws
    all ranks' sign factors (a few per weight-matrix row and column), so every rank knows both its
    own rank-one sign matrices and their sum over ranks. ``out``: a (world, ≥ ``_padded(length)``)
    buffer to write into (no allocation)."""
    if out is None:
        out = torch.empty(world, _padded(length), device=device, dtype=dtype)
    for q in range(world):
        random_signs(length, generator_for(seed, q), device, dtype, out=out[q])
    return out[:, :length]


def _matrix_dims(p: torch.Tensor) -> tuple[int, int]:
    """A tensor seen as a matrix for Flipout's rank-one signs: (first dim, the rest); a 1-D
    tensor is a column, a scalar 1 × 1."""
    if p.dim() == 0:
        return 1, 1
    return p.shape[0], math.prod(p.shape[1:])


def _factor_shapes(p: torch.Tensor) -> tuple[tuple, tuple]:
    """Shapes that broadcast the row and column sign factors of ``p`` to its shape (any layout)."""
    if p.dim() == 0:
        return (), ()
    return (p.shape[0],) + (1,) * (p.dim() - 1), (1,) + tuple(p.shape[1:])


def _fill_normal(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill ``t`` with N(0, 1) draws from ``generator`` (drawn on the generator's device)."""
    if t.device == generator.device:
        return t.normal_(generator=generator)
    return t.copy_(_rng.randn(t.shape, generator, t))


# tensors with fewer elements always get fresh noise: rolled, their few values would repeat
# (and drawing them costs next to nothing)
REUSE_MIN_NUMEL = 1024


def _rollable(st: dict, pair: int) -> bool:
    """Whether a tensor's noise buffer holds the unit noise of the previous draw (``pair`` − 1),
    large enough to be reused rolled."""
    noise = st.get("noise")
    return noise is not None and st.get("noise_pair") == pair - 1 and noise.numel() >= REUSE_MIN_NUMEL


def _roll_noise_(noise: torch.Tensor, shift: int) -> torch.Tensor:
    """Cyclically shift ``noise`` (flattened) by 1 + shift mod (n − 1) places, in place: a
    permutation of N(0, 1) entries is N(0, 1) again, independent across entries, and no entry
    keeps its own value."""
    flat = noise.reshape(-1)
    k = 1 + shift % (flat.numel() - 1)
    noise.copy_(torch.roll(flat, k).view(noise.shape))
    return noise


def _check_noise_reuse(noise_reuse) -> None:
    if not is_count(noise_reuse):
        raise ValueError(f"noise_reuse must be a positive int, got {noise_reuse!r}")


def _check_betas(betas) -> None:
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2
    if not (ok and all(is_number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")


def _check_averaging(averaging) -> None:
    ok = averaging is None or (is_number(averaging) and 0 < averaging <= 1)
    if not ok:
        raise ValueError(f"averaging must be a fraction in (0, 1] or None, got {averaging!r}")


def _check_hess_beta(hess_beta) -> None:
    if hess_beta is not None and not (is_number(hess_beta) and 0 <= hess_beta < 1):
        raise ValueError(f"hess_beta must be in [0, 1) or None, got {hess_beta!r}")


_STATE_KEYS = ("exp_avg", "exp_avg_sq", "hess")


_HALF_PARAMS = (
    "BayesAdam keeps μ, the curvature and the sample in the parameters' dtype, where half precision "
    "rounds the weight noise and the updates away (and Adam's eps underflows in float16, making μ "
    "NaN): keep the parameters in float32 and use torch.autocast for mixed precision"
)


def _state_dtypes(state_dtype) -> dict:
    """``state_dtype`` (one dtype for m, v and h, or a dict naming some of ``exp_avg``,
    ``exp_avg_sq``, ``hess``) as a dtype or None (the parameters') for each of the three."""
    allowed = (None, torch.float32, torch.bfloat16)
    if isinstance(state_dtype, dict):
        unknown = set(state_dtype) - set(_STATE_KEYS)
        if unknown:
            raise ValueError(f"state_dtype: unknown keys {sorted(unknown)}; the keys are {list(_STATE_KEYS)}")
        bad = {k: v for k, v in state_dtype.items() if v not in allowed}
        if bad:
            raise ValueError(f"state_dtype: dtypes must be None, torch.float32 or torch.bfloat16, got {bad}")
        return {k: state_dtype.get(k) for k in _STATE_KEYS}
    if state_dtype not in allowed:
        raise ValueError(
            "state_dtype must be None, torch.float32, torch.bfloat16 or a dict of them keyed by "
            f"{list(_STATE_KEYS)}, got {state_dtype!r}"
        )
    return dict.fromkeys(_STATE_KEYS, state_dtype)


def _check_positive(name, value, allow_zero=False):
    bound = "≥ 0" if allow_zero else "> 0"
    if isinstance(value, torch.Tensor):  # (torch.optim takes a tensor lr for capturable steps)
        raise ValueError(f"{name} must be a Python number {bound}, got a tensor; pass float({name})")
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
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
