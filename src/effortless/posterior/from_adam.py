"""A diagonal Laplace posterior from a trained ``torch.optim.Adam``/``AdamW`` state, at no cost.

Adam keeps ``v``, an EMA of the squared *minibatch-mean* gradient ``ū = (1/B) Σ_b u_b``, and ``m``,
an EMA of ``ū``. For per-sample gradients ``u_b`` with mean ``E u_b = m`` and second moment
``E u_b² = F`` (the per-sample diagonal empirical Fisher when ``u_b`` is the NLL gradient),

    E ū² = m² + (F − m²)/B     ⇒     F = B·E ū² − (B − 1)·m²,

so with the bias-corrected ``v̂ ≈ E ū²`` and ``m̂ ≈ m``: ``F̂ = B v̂ − (B − 1) m̂²`` (clamped at 0). It is
*not* ``v̂`` itself: ``v̂`` underestimates the per-sample curvature by about the batch size once
the mean gradient is small. With ``Adam(weight_decay=λ)`` the L2 gradient ``c = λθ`` is part of
every ``u_b = g_b + c``; the NLL part is ``E g_b² = F̂ − 2c m̂ + c²``. ``AdamW`` keeps it out of the
moments. The posterior is ``N(θ, diag(1/(N F̂ + δ)))`` (``N`` = ``n_data``, losses as minibatch
means), and ``prior_precision="marglik"`` picks δ by the Laplace evidence, which needs no data
(the NLL at the mode does not depend on δ).

The EMAs average over the trajectory, so ``F̂`` is the recent curvature, with the EMA's error.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .._checks import is_count
from ..likelihoods import _wide
from .diag import DiagGaussian
from .evidence import TUNED, prior_choice, tune_prior_precision

__all__ = ["posterior_from_adam"]


def posterior_from_adam(
    model: nn.Module,
    adam: torch.optim.Optimizer,
    n_data: int,
    batch_size: int,
    prior_precision: float | str = 1.0,
) -> DiagGaussian:
    """``N(θ, diag(1/(N·F̂ + δ)))`` with ``F̂`` the per-sample empirical Fisher implied by Adam.

    Args:
        model: the trained model (its weights are the mean).
        adam: its ``torch.optim.Adam`` or ``AdamW`` (after at least one step).
        n_data: training-set size N.
        batch_size: the minibatch size B Adam was trained with (losses as minibatch means).
        prior_precision: δ, or ``"marglik"`` (scalar; ``"auto"`` too) / ``"marglik-layer"`` (per
            tensor).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> model = torch.nn.Linear(3, 2)
        >>> adam = torch.optim.Adam(model.parameters())
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> F.cross_entropy(model(x), y).backward(); adam.step()
        >>> q = posterior_from_adam(model, adam, n_data=8, batch_size=8)
        >>> sorted(q.precision)
        ['bias', 'weight']
    """
    prior_precision = prior_choice(prior_precision)  # (before the work: a bad δ fails at once)
    if not isinstance(adam, torch.optim.Adam | torch.optim.AdamW):
        raise ValueError(
            f"adam must be a torch.optim.Adam or AdamW (it holds the second moments), got "
            f"{type(adam).__name__}"
        )
    if not is_count(batch_size):
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not is_count(n_data):
        raise ValueError(f"n_data must be a positive int, got {n_data!r}")
    decoupled = isinstance(adam, torch.optim.AdamW)
    group_of = {id(p): g for g in adam.param_groups for p in g["params"]}
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trained if "exp_avg_sq" not in adam.state.get(p, {})]
    if len(missing) == len(trained) or any(id(p) not in group_of for _, p in trained):
        for name, p in trained:  # (the first such parameter, by name)
            if id(p) not in group_of:
                raise ValueError(f"parameter {name!r} is not in the optimizer")
        if trained:
            raise ValueError(
                f"the optimizer has no second-moment state for {missing[0]!r}: take at least one step first"
            )
    if missing:  # Adam makes state at a parameter's first gradient: these never had one
        warnings.warn(
            f"posterior_from_adam: {missing[:3]}{' and more' if len(missing) > 3 else ''} never received a "
            "gradient during training (unused in the forward?): their curvature is taken as 0, so their "
            "posterior is the prior",
            RuntimeWarning,
            stacklevel=2,
        )
    mean, fisher = {}, {}
    for name, p in trained:
        if name in missing:
            mean[name], fisher[name] = p.detach().clone(), torch.zeros_like(p.detach())
            continue
        st = adam.state[p]
        group = group_of[id(p)]
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("amsgrad / maximize change Adam's moments; not supported")
        beta1, beta2 = group["betas"]
        t = float(st["step"])
        # (in float32 for 16-bit weights: B·v̂ − (B − 1)·m̂² cancels, in bf16 it lost up to 15 %)
        v = _wide(st["exp_avg_sq"].detach()) / (1 - beta2**t)
        m = _wide(st["exp_avg"].detach()) / (1 - beta1**t)
        f = batch_size * v - (batch_size - 1) * m.pow(2)
        wd = group.get("weight_decay", 0.0)
        if wd and not (decoupled or group.get("decoupled_weight_decay", False)):
            c = wd * _wide(p.detach())
            f = f - 2 * c * m + c.pow(2)
        mean[name] = p.detach().clone()
        fisher[name] = f.clamp_min(0).mul(n_data)
    if prior_precision in TUNED:
        delta = tune_prior_precision(0.0, mean, fisher, per_tensor=prior_precision == "marglik-layer")
    else:
        delta = prior_precision
    prec = {n: h + (delta[n] if isinstance(delta, dict) else delta) for n, h in fisher.items()}
    prec = {n: h.to(mean[n].dtype) for n, h in prec.items()}  # (computed in float32 for 16-bit weights)
    post = DiagGaussian(mean, prec)
    post.prior_precision = delta
    post.from_training = True  # (Adam's moments come from training passes: see ef.predict's bn_data)
    return post
