"""Laplace evidence (log marginal likelihood) of a diagonal posterior, and prior tuning by it.

With the log joint ``log p(D, θ) = −L(θ) + log N(θ; 0, δ⁻¹I)`` (L the summed negative
log-likelihood) and the Laplace approximation around μ with curvature ``H`` (diagonal, summed over
the data), the evidence is

    log p(D | δ) ≈ −L(μ) − ½ Σ_p δ_p μ_p² + ½ Σ_p log δ_p − ½ Σ_p log(H_p + δ_p)

(the ``2π`` terms cancel). δ may be one number or one per parameter tensor ("layer"). It is exact
for linear-Gaussian models with a diagonal ``H`` (e.g. an orthogonal design), which the tests use.
:func:`tune_prior_precision` maximises it over δ (no data pass: μ, H and L are fixed), as in MacKay
(1992) and Immer et al. (2021). In t = log δ the evidence of one δ shared by a group of weights is

    f(t) = ½ (P t − eᵗ ‖μ‖² − Σ_p log(H_p + eᵗ)) + const,   2 f'(t) = γ(eᵗ) − eᵗ ‖μ‖²,

with γ(δ) = Σ_p H_p / (H_p + δ) the effective number of parameters: strictly concave for H ≥ 0, so
the maximiser is the one root of f' (MacKay's δ = γ/‖μ‖²), found by bracketing and regula falsi
to float64 round-off. (Gradient ascent with Adam, used before, stalled when δ had to fall by orders
of magnitude: its second moment still held the first steps' large gradients, and after 500 steps
δ was 3× to 27× too large, the evidence 232 to 5,930 nats below its maximum.) One δ per tensor
separates into one such problem per tensor.

For Gaussian regression the noise σ enters both terms: with the residual sum of squares ``RSS``
over ``n`` outputs, ``L = RSS / (2σ²) + n log σ + (n/2) log 2π``, and the curvature computed at
σ = 1, ``H₁``, scales as ``H = H₁ / σ^a`` (``a = 2`` for the GGN, the Hessian and their
estimators; ``a = 4`` for the empirical Fisher, whose per-sample gradients carry 1/σ² each).
:func:`tune_prior_and_noise` maximises the evidence over δ and σ together: over s = log σ it
follows the profile g(s) = max_δ f(δ, s), whose slope is ∂f/∂s = RSS/σ² − n + (a/2) γ at the
best δ (the envelope theorem), positive for small σ and −n for large σ; its root, found as δ's,
is MacKay's σ² = RSS / (n − (a/2) γ).
"""

from __future__ import annotations

import math
import warnings

import torch

from .._stack import outside_stacklevel

__all__ = [
    "log_marginal_likelihood", "log_marginal_likelihood_gaussian", "tune_prior_precision",
    "tune_prior_and_noise",
]  # fmt: skip


# where δ and σ are searched for (a maximiser beyond them is taken at the bound, with a warning)
LOG_DELTA_RANGE = (math.log(1e-12), math.log(1e12))
LOG_SIGMA_RANGE = (math.log(1e-12), math.log(1e12))


def _root(fn, x0: float, lo: float, hi: float) -> tuple[float, int]:
    """A root of ``fn``, positive left of it and negative right of it, searched for in [lo, hi]
    from ``x0`` outward, then refined by regula falsi (Illinois) to float64 round-off. Returns
    (root, 0), or (lo, −1) / (hi, 1) where ``fn`` keeps its sign up to that bound."""
    x0 = min(max(x0, lo), hi)
    a, b, step = x0, x0, 1.0
    fa = fb = fn(x0)
    while fa <= 0:  # walk left until positive
        if fa == 0:
            return a, 0
        if a == lo:
            return lo, -1
        b, fb = a, fa
        a = max(lo, a - step)
        fa, step = fn(a), 2 * step
    step = 1.0
    while fb >= 0:  # walk right until negative
        if fb == 0:
            return b, 0
        if b == hi:
            return hi, 1
        a, fa = b, fb
        b = min(hi, b + step)
        fb, step = fn(b), 2 * step
    side = 0
    for _ in range(200):
        x = (a * fb - b * fa) / (fb - fa)
        if not a < x < b:  # (round-off at convergence)
            x = 0.5 * (a + b)
        fx = fn(x)
        if fx == 0 or b - a <= 4e-16 * max(1.0, abs(x)):
            return x, 0
        if fx > 0:
            a, fa = x, fx
            if side == 1:  # the same end moved twice: halve the other's weight (Illinois)
                fb *= 0.5
            side = 1
        else:
            b, fb = x, fx
            if side == -1:
                fa *= 0.5
            side = -1
    return 0.5 * (a + b), 0


def _gamma(curvature: torch.Tensor, delta: float) -> float:
    """The effective number of parameters Σ H/(H + δ)."""
    return float((curvature / (curvature + delta)).sum())


def best_log_delta(sq_norm: float, curvature: torch.Tensor, t0: float = 0.0) -> tuple[float, int]:
    """log δ maximising one group's evidence: the root of γ(δ) − δ‖μ‖² (see the module docstring),
    and −1/0/1 as :func:`_root`. Curvature below zero (a stochastic estimate) bounds δ from
    below, so that every H + δ stays positive."""
    lo, hi = LOG_DELTA_RANGE
    neg = float(curvature.min()) if curvature.numel() else 0.0
    raised = neg < 0 and math.log(-neg) + 1e-9 > lo
    if raised:
        lo = math.log(-neg) + 1e-9
    t, side = _root(lambda t: _gamma(curvature, math.exp(t)) - math.exp(t) * sq_norm, t0, lo, hi)
    return t, -2 if raised and side == -1 else side  # (−2: the bound is the negative curvature's)


def _bound_warning(what: str, side: int, names: list[str]) -> None:
    if side == 0 or not names:
        return
    where = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if side == -2:
        warnings.warn(f"the evidence's best prior precision for {where} lies below the size of the "
                      "curvature's negative entries, where the evidence is undefined (an indefinite or "
                      "noisy curvature estimate); it is set just above them: use a positive semi-definite "
                      "hessian (ggn) or a fixed prior precision", RuntimeWarning,
                      stacklevel=outside_stacklevel())  # fmt: skip
        return
    bound = "1e-12" if side < 0 else "1e12"
    why = {("delta", 1): "the mean is (near) zero there, so a tighter prior always explains it better",
           ("delta", -1): "the curvature is (near) zero there: the data say nothing about it",
           ("sigma", -1): "the residuals are (near) zero", ("sigma", 1): "the residuals are huge"}[what, side]
    name = "prior precision" if what == "delta" else "noise sigma"
    warnings.warn(f"the evidence's best {name} for {where} lies beyond {bound} ({why}); it is set to "
                  f"{bound}: pass a fixed value instead", RuntimeWarning,
                  stacklevel=outside_stacklevel())  # fmt: skip


def _as_dict(delta, keys, like):
    if isinstance(delta, dict):
        return {k: torch.as_tensor(delta[k], dtype=like[k].dtype, device=like[k].device) for k in keys}
    return {k: torch.as_tensor(delta, dtype=like[k].dtype, device=like[k].device) for k in keys}


def log_marginal_likelihood(nll_sum, mean: dict, curvature: dict, prior_precision) -> torch.Tensor:
    """The Laplace log evidence for summed NLL ``nll_sum`` at ``mean``, diagonal ``curvature``
    (summed over the data, keyed like ``mean``) and a scalar or per-tensor ``prior_precision``."""
    delta = _as_dict(prior_precision, mean.keys(), mean)
    out = -torch.as_tensor(nll_sum, dtype=next(iter(mean.values())).dtype)
    for k, m in mean.items():
        d = delta[k]
        if d.numel() == 1:  # one δ for the tensor: the prior terms need no elementwise log
            out = out - 0.5 * d * m.pow(2).sum() + 0.5 * m.numel() * torch.log(d)
        else:
            d = d.expand_as(m)
            out = out - 0.5 * (d * m.pow(2)).sum() + 0.5 * torch.log(d).sum()
        out = out - 0.5 * torch.log(curvature[k] + d).sum()
    return out


TUNED = ("marglik", "marglik-layer")


def prior_choice(prior_precision):
    """A post-hoc fit's ``prior_precision`` checked: a finite float > 0, or ``"marglik"`` /
    ``"marglik-layer"`` (tuned by the evidence; ``"auto"``, BayesAdam's name, means ``"marglik"``).
    Returns the float or the string. ``True`` is not 1.0, and an infinite δ (zero variance
    everywhere) is refused with the rest."""
    if isinstance(prior_precision, str):
        choice = "marglik" if prior_precision == "auto" else prior_precision
        if choice in TUNED:
            return choice
    elif (isinstance(prior_precision, (int, float)) and not isinstance(prior_precision, bool)
          and math.isfinite(prior_precision) and prior_precision > 0):  # fmt: skip
        return float(prior_precision)
    raise ValueError(
        "prior_precision must be a finite float > 0, 'marglik' (or 'auto') or 'marglik-layer', "
        f"got {prior_precision!r}"
    )


def _groups(mean: dict, curvature: dict, per_tensor: bool) -> dict:
    """name → (‖μ‖², flat float64 curvature) per δ: each tensor, or one for all."""
    if per_tensor:
        return {k: (float(m.detach().double().pow(2).sum()), curvature[k].detach().double().reshape(-1))
                for k, m in mean.items()}  # fmt: skip
    sq = sum(float(m.detach().double().pow(2).sum()) for m in mean.values())
    return {"_all": (sq, torch.cat([curvature[k].detach().double().reshape(-1) for k in mean]))}


def tune_prior_precision(nll_sum, mean: dict, curvature: dict, init=1.0, per_tensor: bool = False):
    """The prior precision maximising :func:`log_marginal_likelihood` (scalar, or per tensor): the
    exact maximiser (to float64 round-off), searched for from ``init``. ``nll_sum`` does not move
    it (kept for the signature's symmetry with the evidence)."""
    out, edge = {}, {-2: [], -1: [], 1: []}
    for k, (sq, c) in _groups(mean, curvature, per_tensor).items():
        t, side = best_log_delta(sq, c, math.log(init))
        out[k] = math.exp(t)
        if side:
            edge[side].append(k if per_tensor else "all weights")
    for side, names in edge.items():
        _bound_warning("delta", side, names)
    if not per_tensor:
        return out["_all"]
    like = next(iter(mean.values()))
    return {k: torch.tensor(v, dtype=like.dtype, device=like.device) for k, v in out.items()}


def _gaussian_nll(rss, n_outputs, sigma):
    return rss / (2 * sigma**2) + n_outputs * (torch.log(sigma) + 0.5 * math.log(2 * math.pi))


def log_marginal_likelihood_gaussian(
    rss, n_outputs: int, mean: dict, curvature_unit: dict, prior_precision, sigma_noise, power: int = 2
) -> torch.Tensor:
    """The Laplace log evidence of Gaussian regression as a function of δ and σ (see the module
    docstring): ``curvature_unit`` is the diagonal curvature computed with σ = 1, ``power`` its
    order in 1/σ (2, or 4 for the empirical Fisher)."""
    like = next(iter(mean.values()))
    sigma = torch.as_tensor(sigma_noise, dtype=like.dtype)
    curvature = {k: c / sigma**power for k, c in curvature_unit.items()}
    rss = torch.as_tensor(rss, dtype=like.dtype)
    return log_marginal_likelihood(_gaussian_nll(rss, n_outputs, sigma), mean, curvature, prior_precision)


def tune_prior_and_noise(
    rss, n_outputs: int, mean: dict, curvature_unit: dict, prior_precision="marglik", power: int = 2,
    per_tensor: bool = False, init_sigma: float | None = None,
):  # fmt: skip
    """(δ, σ) maximising :func:`log_marginal_likelihood_gaussian`. ``prior_precision`` is
    ``"marglik"`` to tune δ with σ (scalar, or per tensor with ``per_tensor``), or a fixed δ (a
    float, or a dict per tensor). σ is searched for from the residuals' root mean square unless
    ``init_sigma`` is given; both to float64 round-off (see the module docstring)."""
    like = next(iter(mean.values()))
    if not (n_outputs >= 1 and float(rss) >= 0):
        raise ValueError(f"need n_outputs >= 1 and rss >= 0, got {n_outputs}, {rss}")
    rss = float(rss)
    s0 = init_sigma if init_sigma is not None else max(math.sqrt(rss / n_outputs), 1e-6)
    tune = prior_precision in ("marglik", "marglik-layer")
    if tune:
        groups = _groups(mean, curvature_unit, per_tensor)
    else:  # each tensor with its fixed δ
        fixed = prior_precision if isinstance(prior_precision, dict) else dict.fromkeys(mean, prior_precision)
        groups = {k: (0.0, curvature_unit[k].detach().double().reshape(-1)) for k in mean}
    log_d = dict.fromkeys(groups, 0.0)  # warm starts of the inner solves
    sides = {}

    def deltas(s):  # the best δ of every group at σ = eˢ
        scale = math.exp(-power * s)
        out = {}
        for k, (sq, c) in groups.items():
            if tune:
                log_d[k], sides[k] = best_log_delta(sq, c * scale, log_d[k])
                out[k] = math.exp(log_d[k])
            else:
                out[k] = float(fixed[k])
        return out

    def slope(s):  # ∂/∂s of the evidence at the best δ (the profile's slope)
        d, scale = deltas(s), math.exp(-power * s)
        gamma = sum(_gamma(c * scale, d[k]) for k, (_, c) in groups.items())
        return rss * math.exp(-2 * s) - n_outputs + 0.5 * power * gamma

    s, side = _root(slope, math.log(s0), *LOG_SIGMA_RANGE)
    _bound_warning("sigma", side, ["the model's outputs"])
    sigma = math.exp(s)
    d = deltas(s)
    for bound in (-2, -1, 1):
        names = [k if per_tensor else "all weights" for k in groups if sides.get(k) == bound]
        _bound_warning("delta", bound, names)
    if not tune:
        return prior_precision, sigma
    if per_tensor:
        return {k: torch.tensor(v, dtype=like.dtype, device=like.device) for k, v in d.items()}, sigma
    return d["_all"], sigma
