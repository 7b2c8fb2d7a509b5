"""Matrix-free curvature operators: GGN-vector products, conjugate gradients, and posterior samples
with a full (implicit) precision ``G + δI`` drawn by CG solves, never forming a P×P matrix.

Vectors are dicts keyed like ``model.named_parameters()`` (trainable ones), as everywhere in
:mod:`effortless.curvature`.

Sampling (the "CG-GVP" sampler): with ``G = Jᵀ S Sᵀ J`` (S the output-Hessian factor) and
``ξ₁ ~ N(0, I_K·B)``, ``ξ₂ ~ N(0, I_P)``, the vector ``r = Jᵀ S ξ₁ + √δ ξ₂`` has covariance
``G + δI = Λ``; then ``Λ⁻¹ r ~ N(0, Λ⁻¹)``. One sample costs one vector-Jacobian product and a
CG solve (a few dozen GVPs).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    >>> v = {"weight": torch.ones(1, 3, dtype=torch.float64)}
    >>> torch.allclose(gvp(model, x, y, v, "regression")["weight"], (x.T @ x).sum(1)[None])
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from .. import _rng, likelihoods
from .._stack import outside_stacklevel
from .functional import _check_batch, _frozen, stateless, trainable

__all__ = ["gvp", "cg", "sample_precision"]

Vec = dict[str, torch.Tensor]


def _model_fn(model, names):
    theta = trainable(model, names)
    frozen = _frozen(model, theta)

    def f(th, x):
        return functional_call(model, {**frozen, **th}, (x,))

    return {n: p.detach() for n, p in theta.items()}, f


@stateless
def gvp(model: nn.Module, x, y, v: Vec, likelihood="classification", sigma_noise: float = 1.0) -> Vec:
    """GGN-vector product ``Σ_b J_bᵀ (∇²_f nll_b) J_b v`` (one JVP, one VJP)."""
    lik = likelihoods.get(likelihood, sigma_noise)
    _check_batch(x, y)
    theta, f = _model_fn(model, v.keys())
    out, jv = jvp(lambda th: f(th, x), (theta,), ({n: v[n] for n in theta},))  # (B, C)
    lik.check(out, y)  # y is not read, but a wrong kind of target is a caller's bug
    out2 = likelihoods.as_2d(out)
    jv2 = jv if jv.dim() == 2 else jv[:, None]
    S = lik.hessian_factor(out2.detach())  # (B, C, K)
    hjv = torch.einsum("bck,bdk,bd->bc", S, S, jv2).reshape(out.shape)
    _, pullback = vjp(lambda th: f(th, x), theta)
    return pullback(hjv)[0]


def _dot(a: Vec, b: Vec) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def cg(matvec: Callable[[Vec], Vec], b: Vec, tol: float = 1e-6, maxiter: int = 200, x0: Vec | None = None):
    """Solve ``A x = b`` for symmetric positive-definite ``A`` given as ``matvec`` (dict vectors).

    Stops when ``‖r‖ ≤ tol · ‖b‖``. Returns ``(x, info)`` with ``info = {"iterations", "residual"}``
    (the relative residual). Warns (``RuntimeWarning``) when ``maxiter`` iterations end above
    ``tol``; raises ``ValueError`` for a non-finite ``b`` and when a search direction has
    ``pᵀAp ≤ 0`` or a non-finite ``pᵀAp`` (``A`` is not positive definite on it: a singular GGN
    without damping, an indefinite Hessian), instead of returning NaNs or a diverged iterate.
    """
    if not all(torch.isfinite(t).all() for t in b.values()):
        raise ValueError("cg: the right-hand side b has non-finite entries")
    bnorm = _dot(b, b).sqrt()
    if bnorm == 0:  # the solution is 0 (A is positive definite)
        return {k: torch.zeros_like(t) for k, t in b.items()}, {"iterations": 0, "residual": 0.0}
    if x0 is None:
        x = {k: torch.zeros_like(t) for k, t in b.items()}
        r = {k: t.clone() for k, t in b.items()}
    else:
        x = {k: t.clone() for k, t in x0.items()}
        r = {k: b[k] - t for k, t in matvec(x).items()}
    p = {k: t.clone() for k, t in r.items()}
    rs = _dot(r, r)
    it = 0
    for it in range(1, maxiter + 1):  # noqa: B007 - the count is reported
        if rs.sqrt() <= tol * bnorm:
            it -= 1
            break
        Ap = matvec(p)
        pAp = _dot(p, Ap)
        if not (torch.isfinite(pAp) and pAp > 0):
            raise ValueError(
                f"cg: the operator is not positive definite (pᵀAp = {float(pAp):.3g} at iteration "
                f"{it}); damp it (add a prior precision δ·v to the product) or check it for NaNs"
            )
        alpha = rs / pAp
        for k in x:
            x[k] = x[k] + alpha * p[k]
            r[k] = r[k] - alpha * Ap[k]
        rs_new = _dot(r, r)
        for k in p:
            p[k] = r[k] + (rs_new / rs) * p[k]
        rs = rs_new
    residual = float(rs.sqrt() / bnorm)
    if not residual <= tol:
        warnings.warn(
            f"cg: not converged after maxiter={maxiter} iterations (relative residual {residual:.3g} > "
            f"tol={tol:g}); the solution is inaccurate: raise maxiter or the damping",
            RuntimeWarning,
            stacklevel=outside_stacklevel(),
        )
    return x, {"iterations": it, "residual": residual}


@stateless
def sample_precision(
    model: nn.Module,
    x,
    y,
    prior_precision: float,
    likelihood="classification",
    sigma_noise: float = 1.0,
    generator: torch.Generator | None = None,
    tol: float = 1e-6,
    maxiter: int = 200,
    params=None,
) -> tuple[Vec, dict]:
    """A draw ``ε ~ N(0, (G + δI)⁻¹)`` with ``G`` the GGN of the summed NLL on ``(x, y)``.

    Add it to the mean (the model's weights) for a posterior sample of the full-precision Laplace
    approximation. Returns ``(ε, cg_info)``.
    """
    if not prior_precision > 0:
        raise ValueError(f"prior_precision must be > 0, got {prior_precision!r}")
    lik = likelihoods.get(likelihood, sigma_noise)
    _check_batch(x, y)
    theta, f = _model_fn(model, params)
    with torch.no_grad():
        out = f(theta, x)
    lik.check(out, y)
    out2 = likelihoods.as_2d(out)
    S = lik.hessian_factor(out2)  # (B, C, K)
    xi1 = _rng.randn((S.shape[0], S.shape[2]), generator, S)
    _, pullback = vjp(lambda th: f(th, x), theta)
    r = pullback(torch.einsum("bck,bk->bc", S, xi1).reshape(out.shape))[0]
    for k, t in r.items():
        xi2 = _rng.randn(t.shape, generator, t)
        r[k] = t + prior_precision**0.5 * xi2

    def matvec(v):
        g = gvp(model, x, y, v, lik)
        return {k: g[k] + prior_precision * v[k] for k in v}

    return cg(matvec, r, tol=tol, maxiter=maxiter)
