"""Last-layer Laplace with a Kronecker-factored precision, and its closed-form GLM predictive.

For the last Linear layer ``f = W̄ φ̄`` (``φ̄ = [φ, 1]``, ``W̄ = [W, b]``) the GGN of the summed NLL
is approximated by ``G ⊗ A`` (KFAC; :func:`effortless.curvature.kfac`), so the posterior precision
over ``vec(W̄)`` (row-major) is ``Λ = G ⊗ A + δ I``. With the eigendecompositions
``G = Q_G diag(g) Q_Gᵀ``, ``A = Q_A diag(a) Q_Aᵀ``:

* ``Λ⁻¹ = (Q_G ⊗ Q_A) diag(1 / (g ⊗ a + δ)) (Q_G ⊗ Q_A)ᵀ`` and ``log det Λ = Σ log(g_i a_j + δ)``;
* the linearised predictive of an input with features φ̄ is exactly Gaussian with covariance
  ``Q_G diag(s) Q_Gᵀ``, ``s_i = Σ_j u_j² / (g_i a_j + δ)``, ``u = Q_Aᵀ φ̄`` (C × C per input,
  no Jacobians);
* the evidence ``−L(μ) − ½δ‖μ‖² + ½P log δ − ½ log det Λ`` tunes δ without another data pass.

Reference: Ritter et al. (2018), A scalable Laplace approximation for neural networks;
Daxberger et al. (2021), Laplace redux.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _rng, likelihoods
from .._weights import weights_changed
from ..curvature.functional import keep_buffers, run_eagerly
from .evidence import tune_prior_and_noise, tune_prior_precision

__all__ = ["KronLastLayer", "fit_last_layer"]


def last_linear(model: nn.Module, x: torch.Tensor | None = None) -> tuple[str, nn.Linear]:
    """The name and module of the model's output ``nn.Linear``.

    With an input batch ``x`` (what the fits pass): one forward pass finds it, as the Linear whose
    output is the model's output, or else the last Linear the forward calls if its output has as
    many numbers (a scale or reshape after the head); otherwise ValueError. Without ``x``: the last
    registered one. Registration order alone picked the wrong layer, silently, for a model that
    registers its output layer before others (or a Linear it never calls, whose posterior then
    stayed at the prior and gave no uncertainty at all)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("subset='last_layer' needs an nn.Linear output layer")
    if x is None:
        return found[-1]
    calls = []
    handles = [m.register_forward_hook(lambda m, i, o, n=n: calls.append((n, o))) for n, m in found]
    try:
        out = likelihoods.output(_forward(model, x))
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ValueError("subset='last_layer': the model's forward calls none of its nn.Linear layers")
    modules = dict(found)
    same = [n for n, o in calls if o.shape == out.shape and torch.equal(o, out)]
    if same:
        return same[-1], modules[same[-1]]
    name, last = calls[-1]
    if last.numel() != out.numel():  # not the head with a scale or reshape after it: a hidden layer
        raise ValueError(
            f"subset='last_layer': no nn.Linear produces the model's output {tuple(out.shape)} (the last "
            f"one called, {name!r}, gives {tuple(last.shape)}; an output computed with F.linear, e.g. "
            "on a weight tied to the embedding, has no layer of its own); pass params=[...] to choose "
            "the parameters"
        )
    return name, modules[name]


def param_names(name: str, layer: nn.Module) -> list[str]:
    """The model-level names of ``layer``'s parameters (``name`` is "" when the layer is the model)."""
    return [f"{name}.{a}" if name else a for a, _ in layer.named_parameters()]


def layer_io(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's output, the input of its Linear ``layer`` as the layer sees it) from one forward
    pass; ValueError unless the layer runs once and the model's output is its output (a reshape
    aside): the closed forms map the layer's weights to the output through that input alone."""
    module = dict(model.named_modules())[layer]
    saved = []

    def hook(m, i, kw, o):  # copies: an in-place op later in the forward (z.div_(T)) changed both
        phi = i[0] if i else next(iter(kw.values()))  # (fc(input=h) passes it as a keyword)
        saved.append((phi.detach().clone(), o.detach().clone()))

    handle = module.register_forward_hook(hook, with_kwargs=True, prepend=True)  # the layer's own output
    try:
        f = likelihoods.output(_forward(model, x))
    finally:
        handle.remove()
    if len(saved) != 1:
        raise ValueError(f"the last-layer closed form needs its layer {layer!r} to run once in the forward, "
                         f"it ran {len(saved)} times")  # fmt: skip
    phi, out = saved[0]
    same = f.numel() == out.numel() and torch.allclose(  # (a NaN input's NaN is the same)
        f.reshape(-1), out.reshape(-1), rtol=0, atol=0, equal_nan=True)
    if not same:
        # the closed form maps the weights' covariance through φ alone: anything after the
        # layer (a scale, a temperature, a softmax) made it wrong by that map, silently
        raise ValueError(
            f"the closed-form last-layer predictive needs the model's output to be the output of "
            f"its last Linear layer {layer!r}, and this model changes it afterwards; use "
            "method='mc' (weight samples), or hessian='ggn' with subset='last_layer' (the generic "
            "linearised predictive)"
        )
    return f, phi


def last_layer_draws(model: nn.Module, layer: str, x: torch.Tensor, n_samples: int, draw):
    """The model's outputs at ``n_samples`` draws of its last Linear ``layer``'s weight and bias
    (``draw() -> (weight, bias)``, either None for the layer's own), (S, *output shape): only that
    layer varies, so its input is computed once and each draw is one ``F.linear``, the numbers
    loading each draw into the layer and running the whole network gives (the network runs once
    instead of S times). None where :func:`layer_io`'s condition fails or active dropout would draw
    a mask per sample: there the caller runs the network per draw (``torch.Tensor | None``)."""
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if any(m.training and m.p > 0 for m in dropouts):
        return None
    try:
        f, phi = layer_io(model, layer, x)
    except ValueError:
        return None
    module = dict(model.named_modules())[layer]
    outs = []
    for _ in range(n_samples):
        w, b = draw()
        w = module.weight if w is None else w.to(module.weight)
        b = module.bias if b is None or module.bias is None else b.to(module.bias)
        outs.append(F.linear(phi, w, b).reshape(f.shape))
    return torch.stack(outs)


@keep_buffers
def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), run_eagerly(model):
        return model(x)


@dataclass
class KronLastLayer:
    """Posterior ``N(W̄, (G ⊗ A + δI)⁻¹)`` over the last Linear layer; the rest stays at its value.

    ``predict`` samples it by loading ``W̄`` draws into the layer (:meth:`sampled`).
    """

    layer: str  # module name of the last layer
    mean: torch.Tensor  # W̄ (C, in [+ 1]), bias last when the layer has one
    G: torch.Tensor  # (C, C)
    A: torch.Tensor  # (in [+ 1], in [+ 1])
    prior_precision: float
    has_bias: bool = True

    def __post_init__(self):
        self._eig()

    def _eig(self):
        self.g, self.QG = torch.linalg.eigh(self.G)
        self.a, self.QA = torch.linalg.eigh(self.A)
        self.g = self.g.clamp_min(0)
        self.a = self.a.clamp_min(0)

    def eigenvalues(self, prior_precision: float | None = None) -> torch.Tensor:
        d = self.prior_precision if prior_precision is None else prior_precision
        return torch.outer(self.g, self.a) + d  # (C, in + 1)

    def log_det_precision(self, prior_precision: float | None = None) -> torch.Tensor:
        return self.eigenvalues(prior_precision).log().sum()

    def features(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x) at the mean, φ̄ (B, in + 1)) from one forward pass (a ``torch.compile``d model
        runs eagerly here: a compiled forward does not call a hook registered after it was
        compiled, and φ̄ was missing)."""
        f, phi = layer_io(model, self.layer, x)
        phi = phi.reshape(-1, phi.shape[-1])
        if self.has_bias:
            phi = torch.cat([phi, phi.new_ones(phi.shape[0], 1)], 1)
        return f.reshape(phi.shape[0], -1), phi

    def draws(self, model: nn.Module, x: torch.Tensor, n_samples: int, generator=None) -> torch.Tensor | None:
        """The model's outputs at ``n_samples`` draws of W̄, (S, *output shape), from one forward
        pass (:func:`last_layer_draws`); None where that does not apply."""
        k = dict(model.named_modules())[self.layer].weight.shape[1]

        def draw():
            w = self.sample(generator)
            return w[:, :k], (w[:, k] if self.has_bias else None)

        return last_layer_draws(model, self.layer, x, n_samples, draw)

    def predictive_moments(self, model: nn.Module, x: torch.Tensor):
        """Mean (B, C) and covariance (B, C, C) of the linearised predictive, in closed form."""
        f, phi = self.features(model, x)
        u2 = (phi.to(self.QA.dtype) @ self.QA).pow(2)  # (B, in + 1)
        s = u2 @ (1.0 / self.eigenvalues()).T  # (B, C): s_i = Σ_j u_j² / (g_i a_j + δ)
        cov = torch.einsum("ci,bi,di->bcd", self.QG, s, self.QG)
        return f, cov.to(f.dtype)

    def sampled(self, model: nn.Module, generator: torch.Generator | None = None):
        """Context manager: load a draw of W̄ into the last layer, restore on exit."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            layer = dict(model.named_modules())[self.layer]
            bias = None if layer.bias is None else layer.bias.detach().clone()
            saved = (layer.weight.detach().clone(), bias)
            w = self.sample(generator)
            try:
                with torch.no_grad():
                    layer.weight.copy_(w[:, : layer.weight.shape[1]])
                    if layer.bias is not None:
                        layer.bias.copy_(w[:, -1])
                weights_changed()
                yield model
            finally:
                with torch.no_grad():
                    layer.weight.copy_(saved[0])
                    if layer.bias is not None:
                        layer.bias.copy_(saved[1])
                weights_changed()

        return ctx()

    # -- persistence (torch.load(weights_only=True) reads it) -------------------------------------
    def state_dict(self) -> dict:
        out = {"layer": self.layer, "mean": self.mean, "G": self.G, "A": self.A,
               "prior_precision": float(self.prior_precision), "has_bias": self.has_bias}  # fmt: skip
        if hasattr(self, "sigma_noise"):
            out["sigma_noise"] = float(self.sigma_noise)
        if hasattr(self, "likelihood"):
            out["likelihood"] = str(self.likelihood)
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> KronLastLayer:
        post = cls(state["layer"], state["mean"], state["G"], state["A"], float(state["prior_precision"]),
                   bool(state["has_bias"]))  # fmt: skip
        if "sigma_noise" in state:
            post.sigma_noise = float(state["sigma_noise"])
        if "likelihood" in state:
            post.likelihood = str(state["likelihood"])
        return post

    def to(self, *args, **kwargs) -> KronLastLayer:
        """The same posterior with its tensors moved/cast (``Tensor.to`` arguments)."""
        state = self.state_dict()
        state.update({k: state[k].to(*args, **kwargs) for k in ("mean", "G", "A")})
        return KronLastLayer.from_state_dict(state)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of W̄ (C, in + 1)."""
        z = _rng.randn(self.mean.shape, generator, self.mean)
        z = z / self.eigenvalues().sqrt()
        return self.mean + self.QG @ z @ self.QA.T


def fit_last_layer(model, loader, lik, prior_precision, n_samples=1, generator=None, method="exact",
                   distributed=None, tune_noise=False):  # fmt: skip
    """Accumulate last-layer KFAC factors over ``loader``; δ fixed or tuned by the evidence. With
    ``distributed`` (default: when a process group of size > 1 is up) the loader is this rank's
    shard and the factor sums and data count are all-reduced in one collective.

    ``tune_noise`` (Gaussian regression): σ is chosen by the evidence too, with δ if that is tuned.
    The output-space Hessian is I/σ², so the factor G is computed at σ = 1 and scaled by 1/σ²
    inside the evidence (:func:`effortless.posterior.evidence.tune_prior_and_noise`, with the
    Kronecker eigenvalues for the curvature); the residual sum of squares takes one more forward
    pass per batch. The posterior records the σ (``sigma_noise``)."""
    from ..curvature.data import all_reduce_sums, pair, shared_layout, sum_dtype
    from ..curvature.functional import kfac

    if tune_noise:
        if lik.name != "regression":
            raise ValueError("choosing sigma_noise by the evidence needs likelihood='regression'")
        lik = likelihoods.get("regression", 1.0)
    name = layer = names = None
    device = last_linear(model)[1].weight.device
    A = G = None
    count, rss, n_out = 0, 0.0, 0
    for batch in loader:
        x, y = (t.to(device) for t in pair(batch))
        if name is None:  # the output layer, found by a forward pass on the first batch
            name, layer = last_linear(model, x)
            names = param_names(name, layer)
        ((Ab, Gb),) = kfac(model, x, y, lik, method, n_samples, generator, params=names).values()
        Ab, Gb = Ab.to(sum_dtype(Ab.dtype)), Gb.to(sum_dtype(Gb.dtype))  # (bf16 sums stall; no bf16 eigh)
        A = Ab * x.shape[0] if A is None else A + Ab * x.shape[0]
        G = Gb if G is None else G + Gb
        count += x.shape[0]
        if tune_noise:
            f = likelihoods.output(_forward(model, x)).double()
            rss += float((f - y.reshape(f.shape).double()).pow(2).sum())
            n_out += f.numel()
    mine = {name: [(tuple(A.shape), A.dtype), (tuple(G.shape), G.dtype)]} if A is not None else {}
    layout = shared_layout(mine, distributed)
    if not layout:  # (every rank's shard empty: all raise)
        raise ValueError("fit_last_layer: the loader yielded no batches")
    if A is None:  # this rank's shard was empty: join the sums with zeros, at the others' layer
        ((name, [(a_shape, a_dtype), (g_shape, g_dtype)]),) = layout.items()
        layer = model.get_submodule(name)
        A = torch.zeros(a_shape, dtype=a_dtype, device=device)
        G = torch.zeros(g_shape, dtype=g_dtype, device=device)
    count, rss, n_out = all_reduce_sums([A, G], [float(count), rss, float(n_out)], distributed)
    bad = [n for n, t in (("A", A), ("G", G)) if not bool(torch.isfinite(t).all())]
    if bad or not math.isfinite(rss):  # (eigh said "ill-conditioned or has too many repeated eigenvalues")
        what = (f"the last layer's Kronecker factor{'s' if len(bad) > 1 else ''} {' and '.join(bad)} summed "
                "over the loader") if bad else "the residual sum of squares over the loader"  # fmt: skip
        raise FloatingPointError(
            f"laplace: {what} {'are' if len(bad) > 1 else 'is'} not finite: NaN or inf in the model's "
            f"weights, the inputs{'' if bad else ', the targets'} or the outputs"
        )
    A = A / count
    W = layer.weight.detach()
    mean = torch.cat([W, layer.bias.detach()[:, None]], 1) if layer.bias is not None else W.clone()
    post = KronLastLayer(name, mean, G.detach(), A.detach(), 1.0, layer.bias is not None)
    tune = prior_precision in ("marglik", "marglik-layer")
    if tune_noise:
        delta, sigma = tune_prior_and_noise(rss, int(round(n_out)), {"W": post.mean},
                                            {"W": torch.outer(post.g, post.a)},
                                            "marglik" if tune else float(prior_precision))  # fmt: skip
        post.G = post.G / sigma**2
        post._eig()
        post.prior_precision = float(delta)
        post.sigma_noise = sigma
    elif tune:
        post.prior_precision = _tune(post, 0.0)  # the NLL at the mode is a constant of δ
    else:
        post.prior_precision = float(prior_precision)
    return post


def _tune(post: KronLastLayer, nll_sum: float) -> float:
    """The δ maximising :func:`log_marginal_likelihood`: the diagonal evidence's problem with the
    Kronecker eigenvalues g_i a_j for the curvature (the NLL does not move it)."""
    return tune_prior_precision(nll_sum, {"W": post.mean}, {"W": torch.outer(post.g, post.a)})


def log_marginal_likelihood(post: KronLastLayer, nll_sum: float, prior_precision: float | None = None):
    """The Laplace evidence for prior precision δ (a float, or a tensor to differentiate)."""
    d = torch.as_tensor(
        post.prior_precision if prior_precision is None else prior_precision, dtype=post.mean.dtype
    )
    p = post.mean.numel()
    return -nll_sum - 0.5 * d * post.mean.pow(2).sum() + 0.5 * p * d.log() - 0.5 * post.log_det_precision(d)
