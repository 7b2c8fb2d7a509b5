"""Dense brute-force references for every curvature quantity (small models only).

Each function builds the full P×P matrix from ``torch.func`` on the flattened parameter vector,
by a route independent of the estimators in :mod:`effortless.curvature.functional` and the
optimizer: the Hessian from ``torch.func.hessian``, the GGN from full Jacobians ``J`` (B, C, P)
and the output Hessian of the NLL taken by ``torch.func.hessian`` (not the likelihood's factor),
the empirical Fisher from the per-sample gradient matrix. Tests compare every estimator with these
in float64.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1).double()
    >>> x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    >>> G = ggn(model, x, y, "regression")
    >>> X = torch.cat([x, torch.ones(4, 1, dtype=torch.float64)], 1)
    >>> torch.allclose(G, X.T @ X)   # weight then bias, σ = 1
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from .. import likelihoods
from .functional import second_order, stateless

__all__ = ["flatten", "unflatten_diag", "hessian_matrix", "ggn", "efisher", "diag"]


def flatten(model: nn.Module) -> tuple[torch.Tensor, list[str], list[torch.Size]]:
    """The trainable parameters as one vector, with their names and shapes (model order)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    vec = torch.cat([p.detach().reshape(-1) for _, p in named])
    return vec, [n for n, _ in named], [p.shape for _, p in named]


def _unflatten(vec, names, shapes):
    out, i = {}, 0
    for n, s in zip(names, shapes):
        k = s.numel()
        out[n] = vec[i : i + k].view(s)
        i += k
    return out


def unflatten_diag(model: nn.Module, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
    """The diagonal of a P×P matrix as a dict keyed like the model's trainable parameters."""
    _, names, shapes = flatten(model)
    return _unflatten(torch.diagonal(matrix).clone(), names, shapes)


def _outputs(model):
    vec, names, shapes = flatten(model)
    rest = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    rest.update(dict(model.named_buffers()))

    def f(theta, x):
        return functional_call(model, {**rest, **_unflatten(theta, names, shapes)}, (x,))

    return vec, f


@stateless
@second_order
def hessian_matrix(model, x, y, likelihood="classification", sigma_noise=1.0) -> torch.Tensor:
    """Full Hessian of the summed NLL with respect to the flattened parameters.

    Eager reverse-over-reverse autograd, one row at a time (``torch.func.hessian`` gets cross terms
    through ``F.layer_norm`` wrong in torch 2.13; see ``functional._gradient_graph``).
    """
    lik = likelihoods.get(likelihood, sigma_noise)
    vec, f = _outputs(model)
    return torch.autograd.functional.hessian(lambda th: lik.nll(f(th, x), y).sum(), vec)


@stateless
def ggn(model, x, y, likelihood="classification", sigma_noise=1.0) -> torch.Tensor:
    """Full GGN ``Σ_b J_bᵀ (∇²_f nll_b) J_b`` with the output Hessian from autodiff."""
    lik = likelihoods.get(likelihood, sigma_noise)
    vec, f = _outputs(model)
    out = f(vec, x).detach()
    out = likelihoods.as_2d(out)
    J = jacrev(lambda th: f(th, x).reshape(out.shape))(vec)  # (B, C, P)
    G = torch.zeros(vec.numel(), vec.numel(), dtype=vec.dtype, device=vec.device)
    for b in range(out.shape[0]):
        H_out = hessian(lambda fb, b=b: lik.nll(fb[None], y[b : b + 1]).sum())(out[b])  # (C, C)
        G += J[b].T @ H_out @ J[b]
    return G


@stateless
def efisher(model, x, y, likelihood="classification", sigma_noise=1.0) -> torch.Tensor:
    """Full empirical Fisher ``Σ_b g_b g_bᵀ`` from the per-sample gradient matrix."""
    lik = likelihoods.get(likelihood, sigma_noise)
    vec, f = _outputs(model)
    G = jacrev(lambda th: lik.nll(f(th, x), y))(vec)  # (B, P)
    return G.T @ G


@stateless
def diag(model, x, y, kind: str, likelihood="classification", sigma_noise=1.0):
    """Dense reference diagonal as a dict: ``kind`` in {"hessian", "ggn", "efisher"}."""
    table = {"hessian": hessian_matrix, "ggn": ggn, "efisher": efisher}
    if kind not in table:
        raise ValueError(f"kind must be one of {sorted(table)}, got {kind!r}")
    return unflatten_diag(model, table[kind](model, x, y, likelihood, sigma_noise))
