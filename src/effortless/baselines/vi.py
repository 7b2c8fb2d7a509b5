"""``vi``: mean-field variational inference (Bayes by backprop, Blundell et al. 2015) with the local
reparameterisation trick (Kingma et al. 2015), for networks whose weights live in ``nn.Linear``
layers (the benchmark's MLPs).

Every Linear layer's weight and bias get a factorised Gaussian q = N(μ, softplus(ρ)²) under the
prior N(0, 1/δ). A forward pass samples the layer's *pre-activations* from their Gaussian,
``N(x μᵀ + b_μ, x² σ²ᵀ + b_σ²)``, which has the variance of a weight sample per example at the cost
of two matrix products. The loss is the minibatch-mean NLL plus KL(q ‖ p) / N (the negative ELBO
per example); μ starts at the network's initialisation, σ at ``sigma_init``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._common import Fitted, train_loop


class BayesLinear(nn.Module):
    def __init__(self, layer: nn.Linear, sigma_init: float = 1e-3, prior_precision: float = 1.0):
        super().__init__()
        rho = math.log(math.expm1(sigma_init))  # softplus⁻¹
        self.w_mu = nn.Parameter(layer.weight.detach().clone())
        self.w_rho = nn.Parameter(torch.full_like(layer.weight, rho))
        self.has_bias = layer.bias is not None
        if self.has_bias:
            self.b_mu = nn.Parameter(layer.bias.detach().clone())
            self.b_rho = nn.Parameter(torch.full_like(layer.bias, rho))
        self.prior_precision = prior_precision

    def forward(self, x):
        mean = F.linear(x, self.w_mu, self.b_mu if self.has_bias else None)
        var = F.linear(x.pow(2), F.softplus(self.w_rho).pow(2))
        if self.has_bias:
            var = var + F.softplus(self.b_rho).pow(2)
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)

    def kl(self) -> torch.Tensor:
        """KL(N(μ, σ²) ‖ N(0, 1/δ)) summed over the layer's weights, in closed form."""
        d = self.prior_precision
        pairs = [(self.w_mu, self.w_rho)] + ([(self.b_mu, self.b_rho)] if self.has_bias else [])
        out = 0.0
        for mu, rho in pairs:
            var = F.softplus(rho).pow(2)
            out = out + 0.5 * (d * (var + mu.pow(2)) - 1.0 - torch.log(d * var)).sum()
        return out


def bayesianize(model: nn.Module, **kw) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`BayesLinear`."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, BayesLinear(child, **kw))
        else:
            bayesianize(child, **kw)
    return model


def kl(model: nn.Module) -> torch.Tensor:
    return sum(m.kl() for m in model.modules() if isinstance(m, BayesLinear))


def fit(task, split, seed, epochs, progress, samples=30, lr=1e-3) -> Fitted:
    torch.manual_seed(seed)
    model = bayesianize(task.model(0.0)).to(split.x_train.device)
    if not any(isinstance(m, BayesLinear) for m in model.modules()):
        raise ValueError("vi: the network has no nn.Linear layers to make Bayesian")
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    if others:
        raise ValueError(f"vi: only Linear layers are supported; the network has {others}")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(split.x_train)

    def one_step(x, y):
        opt.zero_grad()
        nll = F.cross_entropy(model(x), y)
        (nll + kl(model) / n).backward()
        opt.step()
        return nll

    model.train()
    seconds, step_ms, peak, history = train_loop(one_step, model, opt, split, task.batch_size, seed, epochs)

    def predict(x):
        torch.manual_seed(seed)
        with torch.no_grad():
            return torch.stack([
                torch.cat([model(x[i : i + 2000]).softmax(-1) for i in range(0, len(x), 2000)])
                for _ in range(samples)
            ]).mean(0)  # fmt: skip

    return Fitted(predict, seconds, step_ms, peak, history)
