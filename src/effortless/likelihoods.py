"""Likelihoods: per-sample negative log-likelihood and the output-space Hessian.

A likelihood turns network outputs ``f`` (B, C) into a per-sample negative log-likelihood
``nll(f, y)`` (B,) and gives what the generalised Gauss-Newton (GGN) needs: a symmetric factor
``S`` (B, C, K) of the Hessian of the NLL with respect to ``f``, ``∇²_f nll = S Sᵀ``, and a way to
draw labels from the model's own predictive (for the Monte-Carlo GGN).

* ``classification``: categorical over logits. ``∇²_f nll = diag(p) − p pᵀ``, factored as the
  columns ``√p_c (e_c − p)`` (K = C).
* ``regression``: Gaussian with noise standard deviation ``sigma_noise``,
  ``nll = ½‖y − f‖²/σ² + ½·D·log(2πσ²)``; ``∇²_f nll = I/σ²``, factored as ``I/σ`` (K = D).

Users pick a likelihood by its name (``likelihood="classification"``); :func:`get` validates the
name once and returns the object.

Example:
    >>> import torch
    >>> lik = get("classification")
    >>> f = torch.tensor([[2.0, 0.0, -1.0]])
    >>> S = lik.hessian_factor(f)
    >>> p = f.softmax(-1)
    >>> torch.allclose(S @ S.transpose(1, 2), torch.diag_embed(p) - p[..., None] * p[:, None])
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _rng
from ._checks import is_number

__all__ = ["Likelihood", "Classification", "Regression", "get", "LIKELIHOODS"]


class Likelihood:
    """Interface every likelihood implements (all methods act on a batch)."""

    name: str = ""

    def nll(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample negative log-likelihood, shape (B,)."""
        raise NotImplementedError

    def hessian_factor(self, f: torch.Tensor) -> torch.Tensor:
        """Factor ``S`` (B, C, K) with ``S Sᵀ`` the Hessian of ``nll`` with respect to ``f``."""
        raise NotImplementedError

    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Labels drawn from the predictive ``p(y | f)``, shaped like real labels."""
        raise NotImplementedError

    def nll_grad(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample gradient of ``nll`` with respect to ``f`` (shaped like ``f``; by autograd
        unless a likelihood has it in closed form)."""
        fd = f.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.nll(fd, y).sum(), fd)
        return g

    def check(self, f: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate and align shapes of outputs and targets."""
        return f, y


def output(f) -> torch.Tensor:
    """The model's output, checked to be one tensor: a model returning a dict or a tuple (as
    Hugging Face models do) failed deep inside with "'dict' object has no attribute 'dim'"."""
    if not isinstance(f, torch.Tensor):
        what = f"a dict with keys {list(f)[:4]}" if isinstance(f, dict) else f"a {type(f).__name__}"
        raise TypeError(
            f"the model returned {what}; it must return the output tensor (B, C) or (B,). Wrap it, e.g. "
            "nn.Module whose forward returns model(x)['logits']"
        )
    return f


def as_2d(f) -> torch.Tensor:
    """The checked output as (B, D): a (B,) output becomes (B, 1)."""
    f = output(f)
    return f if f.dim() == 2 else f[:, None]


_LOW = (torch.float16, torch.bfloat16)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is in 16 bits (the outputs of a model under ``torch.autocast``), as
    autocast runs PyTorch's own losses: in bf16 a regression residual y − f of 0.05 on targets
    near 10 kept about one significant bit (the training gradient was 33 % off), and a softmax's
    cumulative sum dropped classes below 1/256 from the labels drawn for the Monte-Carlo GGN."""
    return t.float() if t.dtype in _LOW else t


def _is_integer(t: torch.Tensor) -> bool:
    """An integer dtype of any width, signed or not (labels: not float, bool or complex)."""
    return not (t.dtype.is_floating_point or t.is_complex() or t.dtype == torch.bool)


def _check_logits(f: torch.Tensor) -> None:
    output(f)
    if f.dim() != 2:
        raise ValueError(f"classification expects logits of shape (B, C), got {tuple(f.shape)}")
    if f.shape[1] < 2:  # a softmax over one logit is 1 whatever the input: a silent non-answer
        raise ValueError(
            f"classification needs at least 2 outputs (one logit per class), got {f.shape[1]}; "
            "for a real-valued output use likelihood='regression'"
        )


def _check_label_range(y: torch.Tensor, n_classes: int) -> None:
    """Labels in [0, C). The GGN and KFAC estimators never read y, so a model with fewer outputs
    than the data has classes got a posterior without complaint. On CPU a ``ValueError``; on an
    accelerator an asynchronous device-side assert (a ``.item()`` here would wait for the device
    every step)."""
    if y.numel() == 0 or torch._C._functorch.is_functorch_wrapped_tensor(y):
        return  # (inside vmap/grad a data-dependent check cannot run; the batch is checked outside)
    if y.device.type != "cpu":
        torch._assert_async(((y >= 0) & (y < n_classes)).all(), "classification labels must be in [0, C)")
        return
    lo, hi = (int(v) for v in torch.aminmax(y))  # (Python ints: half the cost of tensor compares)
    if lo < 0 or hi >= n_classes:
        raise ValueError(
            f"classification labels must be in [0, {n_classes}) for a model with {n_classes} outputs, "
            f"got labels from {lo} to {hi}"
        )


class Classification(Likelihood):
    name = "classification"

    def check(self, f, y):
        _check_logits(f)
        if y.shape != f.shape[:1] or not _is_integer(y):  # (int16 and int8 labels were refused)
            raise ValueError(
                f"classification expects integer labels of shape ({f.shape[0]},), got "
                f"{tuple(y.shape)} {y.dtype}"
            )
        y = y.long()  # (before the range check: torch has no aminmax for uint16/32/64)
        _check_label_range(y, f.shape[1])
        return f, y

    def nll(self, f, y):
        f, y = self.check(f, y)
        return F.cross_entropy(_wide(f), y, reduction="none")

    def hessian_factor(self, f):
        p = _wide(f).softmax(-1)  # (B, C)
        eye = torch.eye(f.shape[-1], dtype=p.dtype, device=f.device)
        # column c: sqrt(p_c) (e_c - p)  -> S[b, :, c]
        return ((eye[None] - p[:, :, None]) * p.sqrt()[:, None, :]).to(f.dtype)  # (B, C, C)

    def sample(self, f, generator=None):
        # inverse CDF: one uniform per row (several times faster than torch.multinomial here)
        c = _wide(f.detach()).softmax(-1).cumsum(-1)
        u = _rng.rand((f.shape[0], 1), generator, c)
        return (c < u * c[:, -1:]).sum(-1).clamp_max(f.shape[-1] - 1)

    def nll_grad(self, f, y):
        f, y = self.check(f, y)
        g = _wide(f.detach()).softmax(-1)
        g[torch.arange(len(y), device=g.device), y] -= 1.0  # softmax(f) − onehot(y)
        return g.to(f.dtype)


@dataclass
class Regression(Likelihood):
    sigma_noise: float = 1.0
    name = "regression"

    def __post_init__(self):
        s = self.sigma_noise  # (inf gave a zero Hessian, a bool passed as 1: both silently)
        if isinstance(s, torch.Tensor):
            if s.numel() != 1:  # (float() of it failed with "only one element tensors can be converted")
                raise ValueError(f"sigma_noise must be one number, the same noise for every output; got a "
                                 f"tensor of shape {tuple(s.shape)}")  # fmt: skip
            s = s.item()
        if not (is_number(s) and 0 < s < math.inf):
            raise ValueError(f"sigma_noise must be a positive, finite float, got {s!r}")
        self.sigma_noise = float(s)

    def check(self, f, y):
        output(f)
        if f.dim() > 2:  # (the NLL summed dim 1 only: a (B, T, D) output's loss was (B, D), its mean
            # divided the likelihood by D, and the curvature engine failed in a reshape)
            raise ValueError(
                f"regression expects outputs of shape (B, D) or (B,), got {tuple(f.shape)}; flatten each "
                "example's outputs (e.g. end the model with nn.Flatten() and reshape the targets to (B, -1))"
            )
        if f.dim() == 1:
            f = f[:, None]
        if y.dim() == 1:
            y = y[:, None]
        if f.shape != y.shape:
            raise ValueError(
                f"regression expects outputs and targets of the same shape (B, D), got "
                f"{tuple(f.shape)} and {tuple(y.shape)}"
            )
        return f, y.to(_wide(f).dtype)  # (targets are not rounded to a 16-bit output's dtype)

    def nll(self, f, y):
        f, y = self.check(f, y)
        s2 = self.sigma_noise**2
        return 0.5 * (y - _wide(f)).pow(2).sum(1) / s2 + self._constant(f.shape[1])

    def _constant(self, outputs: int) -> float:
        return 0.5 * outputs * math.log(2 * math.pi * self.sigma_noise**2)

    def residual_mean_square(self, mean_nll: float, outputs: int) -> float:
        """The residuals' mean square behind a mean :meth:`nll` over examples of ``outputs``
        outputs each (its inverse: ½ Σ r²/σ² + ½ D log 2πσ² per example)."""
        return 2 * self.sigma_noise**2 * (mean_nll - self._constant(outputs)) / outputs

    def hessian_factor(self, f):
        f = f if f.dim() == 2 else f[:, None]
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device) / self.sigma_noise
        return eye.expand(f.shape[0], -1, -1)

    def sample(self, f, generator=None):
        noise = _rng.randn(f.shape, generator, _wide(f))
        return _wide(f) + self.sigma_noise * noise

    def nll_grad(self, f, y):
        f2, y2 = self.check(f, y)
        return ((_wide(f2.detach()) - y2) / self.sigma_noise**2).to(f.dtype).view_as(f)


LIKELIHOODS = {"classification": Classification, "regression": Regression}


def get(likelihood: str | Likelihood, sigma_noise: float = 1.0) -> Likelihood:
    """Return the likelihood object for a name (``"classification"`` or ``"regression"``)."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if likelihood == "classification":
        return Classification()
    if likelihood == "regression":
        return Regression(sigma_noise=sigma_noise)  # (float() first let True through as 1.0)
    raise ValueError(f"likelihood must be one of {sorted(LIKELIHOODS)}, got {likelihood!r}")
