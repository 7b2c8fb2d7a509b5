"""Laplace evidence (log marginal likelihood) of a diagonal posterior, and prior tuning by it.

With the log joint ``log p(D, θ) = −L(θ) + log N(θ; 0, δ⁻¹I)`` (L the summed negative
log-likelihood) and the Laplace approximation around μ with curvature ``H`` (diagonal, summed over
the data), the evidence is

    log p(D | δ) ≈ −L(μ) − ½ Σ_p δ_p μ_p² + ½ Σ_p log δ_p − ½ Σ_p log(H_p + δ_p)

(the ``2π`` terms cancel). δ may be one number or one per parameter tensor ("layer"). It is exact
for linear-Gaussian models with a diagonal ``H`` (e.g. an orthogonal design), which the tests use.
:func:`tune_prior_precision` maximises it over log δ with Adam steps (no data pass: μ, H and L are
fixed), as in MacKay (1992) and Immer et al. (2021).
"""

from __future__ import annotations

import torch

__all__ = ["log_marginal_likelihood", "tune_prior_precision", "maximise"]


def maximise(params: list[torch.Tensor], objective, steps: int, lr: float = 0.1) -> None:
    """Gradient ascent with Adam on ``objective()`` over ``params`` (leaf tensors), in place."""
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (-objective()).backward()
        opt.step()


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
        d = delta[k].expand_as(m)
        out = out - 0.5 * (d * m.pow(2)).sum() + 0.5 * torch.log(d).sum()
        out = out - 0.5 * torch.log(curvature[k] + d).sum()
    return out


def tune_prior_precision(
    nll_sum, mean: dict, curvature: dict, init=1.0, per_tensor: bool = False, steps: int = 500, lr=0.1
):
    """The prior precision maximising :func:`log_marginal_likelihood` (scalar, or per tensor)."""
    dtype = next(iter(mean.values())).dtype
    keys = list(mean) if per_tensor else ["_all"]
    log_d = {k: torch.tensor(float(init), dtype=dtype).log().requires_grad_(True) for k in keys}
    mean = {k: v.detach() for k, v in mean.items()}
    curvature = {k: v.detach() for k, v in curvature.items()}

    def delta():
        return {k: log_d[k if per_tensor else "_all"].exp() for k in mean}

    maximise(
        list(log_d.values()), lambda: log_marginal_likelihood(nll_sum, mean, curvature, delta()), steps, lr
    )
    with torch.no_grad():
        out = {k: v.detach() for k, v in delta().items()}
    return out if per_tensor else float(next(iter(out.values())))
