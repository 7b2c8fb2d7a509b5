"""Linearised (GLM) predictive of a diagonal Gaussian posterior, without Jacobian matrices.

Linearising the network at the posterior mean, ``f(x; θ) ≈ f(x; μ) + J (θ − μ)``, turns the
posterior ``N(μ, Σ)`` into a Gaussian over outputs per input: mean ``f(x; μ)``, covariance
``J_b Σ J_bᵀ`` (C × C). For a diagonal Σ the covariance is ``Σ_p σ²_p J_bkp J_blp``; the hook
engine gets it from one batched backward of the C unit cotangents to the layer outputs and layer
rules (for a Linear layer ``Σ_o δ_kbo δ_lbo (a_b² · σ²_o)``), so neither B×C×P Jacobians nor
per-sample gradients of a Linear layer are built. Modules without a rule use ``torch.func``
per-sample Jacobians, chunked.

* ``glm``: average of softmax over samples ``f_b + L_b ξ`` (``L_b L_bᵀ`` the covariance);
* ``probit``: ``softmax(f_b / √(1 + π/8 · diag cov_b))`` (Spiegelhalter & Lauritzen 1990;
  MacKay 1992), deterministic;
* regression: mean ``f_b``, variance ``diag cov_b + σ²``.

References: Immer et al. (2021), Improving predictions of Bayesian neural nets via local
linearization; Daxberger et al. (2021), Laplace redux.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.func import functional_call, jacrev

from .. import _rng, likelihoods
from ..curvature import engine
from ..curvature.functional import (
    _chunks,
    _frozen,
    _Passes,
    _single,
    eager_forward,
    per_sample,
    refuse_coupled,
)
from .diag import DiagGaussian

__all__ = ["linearised_moments", "glm_probs", "probit_probs"]


@eager_forward
def linearised_moments(model: nn.Module, posterior: DiagGaussian, x: torch.Tensor, chunk_size: int = 64):
    """Mean ``f(x; μ)`` in the model's output shape ((B, C); (B,) for a model returning (B,)) and
    covariance ``J Σ Jᵀ`` (B, C, C), C = 1 for a (B,) output, of the linearised predictive
    (per-sample Jacobians: refused through BatchNorm that normalises with batch statistics)."""
    refuse_coupled(model, "the linearised predictive (method='glm' / 'probit')")
    params = posterior._match(model)  # posterior key -> parameter
    names = {id(p): n for n, p in model.named_parameters()}
    # (in the weights' dtype and device, as the MC predictive's samples: a float32 posterior for
    # a model cast to float64 after training failed in the covariance's matmul)
    variance = {names[id(p)]: posterior.variance[k].to(p) for k, p in params.items()}
    with posterior.mean_loaded(model):
        if x.shape[0] == 0:  # no inputs (torch.cat of no passes failed): empty moments, as the MC predictive
            with torch.no_grad():
                f = model(x)
            c = likelihoods.as_2d(f).shape[1]
            return f, f.new_zeros(0, c, c)
        plan = engine.plan(model, list(variance))
        if plan.backend == "hooks":
            try:
                parts, passes = [], _Passes(x.shape[0], most=MOMENT_CHUNK)
                for sl in passes:
                    f, cov, held = _hooks_moments(model, x[sl], plan, variance)
                    parts.append((f, cov))
                    passes.measured(held)
                return torch.cat([f for f, _ in parts]), torch.cat([c for _, c in parts])
            except engine.Unsupported:
                pass
        return _func_moments(model, x, variance, chunk_size)


# The hook path holds C output gradients per layer output (and, for layers without a covariance
# rule, C per-sample gradients) for every sample of a pass: about 60 kB a sample for
# 784-512-256-10, where 1,024 samples a pass keep a test-set-sized call near 60 MB instead of
# 3.7 GB for 60,000 inputs; convolutions hold far more per sample, so passes after the first are
# sized to the footprint (``curvature.functional._Passes``), at most this many samples.
MOMENT_CHUNK = 1024


def _hooks_moments(model, x, plan, variance):
    with torch.enable_grad():
        f, saved = engine.forward(plan, lambda: model(x), model)
    f2 = likelihoods.as_2d(f)
    c = f2.shape[1]
    eye = torch.eye(c, dtype=f.dtype, device=f.device)
    cot = eye[:, None, :].expand(c, f2.shape[0], c).reshape(c, *f.shape)  # (C, B, C): unit cotangents
    deltas = engine.output_grads(f, saved, cot)
    with torch.no_grad():
        cov = engine.output_covariance(plan, saved, deltas, variance)
    held = c * (engine.saved_numel(saved) / f2.shape[0] + engine.psg_numel(plan))  # numbers per sample
    return f.detach(), cov.detach(), held


def _func_moments(model, x, variance, chunk_size):
    theta = {n: p.detach() for n, p in model.named_parameters() if n in variance}
    f_single = _single(model, _frozen(model, theta))
    with torch.no_grad():
        f = functional_call(model, {**_frozen(model, theta), **theta}, (x,))
    f2 = likelihoods.as_2d(f)
    cov = f2.new_zeros(f2.shape[0], f2.shape[1], f2.shape[1])
    jac = per_sample(jacrev(lambda th, xb: f_single(th, xb).reshape(-1)), (None, 0))
    for sl in _chunks(x.shape[0], chunk_size):
        for n, J in jac(theta, x[sl]).items():  # (b, C, *shape)
            J = J.reshape(J.shape[0], J.shape[1], -1)
            cov[sl] += torch.einsum("bcp,bdp,p->bcd", J, J, variance[n].reshape(-1))
    return f, cov


def _output_space(fn):
    """The output-space part of the linearised predictive in float32 at least, with autocast off:
    under bf16 autocast the model's outputs come in bf16, and the draws f + L ξ and their softmax
    were bf16 (probabilities to 2⁻⁸), where the MC predictive's are float32."""

    @functools.wraps(fn)
    def run(mean, cov, *args, **kwargs):
        with torch.autocast(mean.device.type, enabled=False):
            return fn(likelihoods._wide(mean), likelihoods._wide(cov), *args, **kwargs)

    return run


@_output_space
def probit_probs(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``softmax(f / √(1 + π/8 · var))`` per class (the extended probit approximation)."""
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    return torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)


@_output_space
def glm_logits(mean, cov, n_samples: int = 32, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n_samples`` output-space draws ``f + L ξ`` of the linearised predictive, shape (S, B, C)."""
    xi = _rng.randn((n_samples, *mean.shape), generator, mean)
    return mean + torch.einsum("bcd,sbd->sbc", _factor(cov.to(mean.dtype)), xi)


def _factor(cov: torch.Tensor) -> torch.Tensor:
    """A square root ``L`` of each (C, C) covariance, ``L Lᵀ = cov``: Cholesky where the matrix is
    positive definite, else ``V diag(√λ₊)`` from its eigendecomposition. A posterior over fewer
    directions than outputs (``params=`` on a layer behind a narrow bottleneck, an input row that
    meets only bias-free weights at zero) has a singular covariance, which Cholesky refused ("not
    positive-definite"; its jitter, 1e-10 of the batch's mean variance, was below float32's
    spacing, and in float64 it added that much variance to every input's draws)."""
    L, info = torch.linalg.cholesky_ex(cov)
    finite = torch.isfinite(cov).flatten(-2).all(-1)
    bad = (info != 0) & finite
    if bad.any():
        lam, vec = torch.linalg.eigh(cov[bad])
        L[bad] = vec * lam.clamp_min(0).sqrt().unsqueeze(-2)
    L[~finite] = torch.nan  # (an input with NaN: NaN draws, as the other predictives give)
    return L


def glm_probs(mean, cov, n_samples: int = 32, generator: torch.Generator | None = None) -> torch.Tensor:
    """Monte-Carlo average of ``softmax(f + L ξ)`` over output-space samples (cheap: C numbers)."""
    return glm_logits(mean, cov, n_samples, generator).softmax(-1).mean(0)
