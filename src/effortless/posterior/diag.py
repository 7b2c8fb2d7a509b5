"""Diagonal Gaussian posterior over the weights.

``q(θ) = N(μ, diag(1/λ))`` with ``λ`` the posterior precision per weight (for a Laplace or
BayesAdam posterior ``λ = N·h + δ``: data-set size times per-sample curvature plus the prior
precision). Mean and precision are dicts keyed like ``model.named_parameters()`` (or by position
as strings ``"0"``, ``"1"``, …), in parameter order.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> q = DiagGaussian.from_model(model, precision=100.0)
    >>> before = model.weight.detach().clone()
    >>> with q.sampled(model, generator=torch.Generator().manual_seed(0)):
    ...     changed = not torch.equal(model.weight, before)
    >>> changed, torch.equal(model.weight, before)
    (True, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .. import _rng
from .._weights import weights_changed

__all__ = ["DiagGaussian"]


_WRAPPERS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")  # and a leading "module"


def _canonical(name: str) -> str:
    """A parameter name without the segments that wrappers insert (DDP, torch.compile, FSDP,
    activation checkpointing)."""
    parts = name.split(".")
    return ".".join(p for i, p in enumerate(parts) if p not in _WRAPPERS and not (i == 0 and p == "module"))


class DiagGaussian:
    """``N(mean, diag(1/precision))`` over named parameter tensors."""

    def __init__(self, mean: Mapping[str, torch.Tensor], precision: Mapping[str, torch.Tensor]):
        if list(mean) != list(precision):
            raise ValueError(
                f"mean and precision must have the same keys in the same order, got "
                f"{list(mean)} and {list(precision)}"
            )
        for k in mean:
            if mean[k].shape != precision[k].shape:
                raise ValueError(
                    f"precision[{k!r}] has shape {tuple(precision[k].shape)}, mean has {tuple(mean[k].shape)}"
                )
            if not bool((precision[k] > 0).all()):
                raise ValueError(f"precision[{k!r}] must be positive everywhere")
        self.mean = {k: v.detach() for k, v in mean.items()}
        self.precision = {k: v.detach() for k, v in precision.items()}

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, precision: float | Mapping[str, torch.Tensor]):
        """Centred at the model's current trainable weights, with a scalar precision, or a dict keyed
        like ``named_parameters()`` of per-weight tensors or per-tensor numbers."""
        mean = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        if isinstance(precision, Mapping):
            missing = [n for n in mean if n not in precision]
            named = dict(model.named_parameters())  # (entries for frozen ones are left out, as before)
            unknown = [n for n in precision if n not in named]
            if missing or unknown:  # (a misspelt name was ignored, or failed as a bare KeyError)
                said = [*([f"no entry for {missing}"] if missing else []),
                        *([f"{unknown} are not the model's parameters"] if unknown else [])]
                raise ValueError(f"precision: {'; '.join(said)} (its trainable parameters: {list(mean)[:6]}"
                                 f"{' ...' if len(mean) > 6 else ''})")  # fmt: skip
            prec = {n: torch.as_tensor(precision[n]).to(mean[n]) for n in mean}
            # a number per tensor (per-layer prior precisions, say) covers the tensor
            prec = {n: v.expand_as(mean[n]).clone() if v.dim() == 0 else v for n, v in prec.items()}
        else:
            prec = {n: torch.full_like(m, float(precision)) for n, m in mean.items()}
        return cls(mean, prec)

    # -- moments -------------------------------------------------------------------------------
    @property
    def variance(self) -> dict[str, torch.Tensor]:
        return {k: 1.0 / v for k, v in self.precision.items()}

    @property
    def std(self) -> dict[str, torch.Tensor]:
        return {k: v.rsqrt() for k, v in self.precision.items()}

    def numel(self) -> int:
        return sum(v.numel() for v in self.mean.values())

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One draw ``μ + ε / √λ`` with ``ε ~ N(0, I)`` from ``generator``."""
        out = {}
        for k, m in self.mean.items():
            out[k] = m + _rng.randn(m.shape, generator, m) * self.precision[k].rsqrt()
        return out

    @contextlib.contextmanager
    def sampled(
        self, model: nn.Module, generator: torch.Generator | None = None, sample=None
    ) -> Iterator[nn.Module]:
        """Load a posterior sample (or the given ``sample`` dict) into ``model``; always restore."""
        params = self._match(model)
        draw = self.sample(generator) if sample is None else sample
        if sample is not None:  # (a given one: copy_ would broadcast a wrong shape, silently)
            missing = [k for k in params if k not in draw]
            if missing:
                raise ValueError(f"sample has no tensor for {missing[:3]} (keys: {list(draw)[:5]})")
            for k, p in params.items():
                if draw[k].shape != p.shape:
                    raise ValueError(f"sample[{k!r}] has shape {tuple(draw[k].shape)}, the parameter "
                                     f"{tuple(p.shape)}")  # fmt: skip
        saved = {k: p.detach().clone() for k, p in params.items()}
        try:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(draw[k])
            weights_changed()
            yield model
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])
            weights_changed()

    @contextlib.contextmanager
    def mean_loaded(self, model: nn.Module) -> Iterator[nn.Module]:
        """Load the posterior mean into ``model``; always restore the previous weights."""
        with self.sampled(model, sample=self.mean):
            yield model

    def _match(self, model: nn.Module) -> dict[str, torch.Tensor]:
        named = dict(model.named_parameters())
        ids = {id(p) for p in named.values()}
        sources = getattr(self, "sources", None)  # set by BayesAdam.posterior(): the parameters themselves
        canon = {_canonical(n): p for n, p in named.items()}
        if all(k in named for k in self.mean):
            params = {k: named[k] for k in self.mean}
        elif sources is None and len(canon) == len(named) and all(_canonical(k) in canon for k in self.mean):
            # the same names under a wrapper's prefix: a posterior saved from DistributedDataParallel
            # ("module.") or torch.compile ("_orig_mod.") loaded for the bare model, or the reverse
            params = {k: canon[_canonical(k)] for k in self.mean}
        elif sources is not None and all(id(sources.get(k)) in ids for k in self.mean):
            # keyed by the optimizer's position, which need not be the model's order (param
            # groups in another order, or a subset): match the parameter objects themselves
            params = {k: sources[k] for k in self.mean}
        else:  # keyed by position
            plist = [p for p in model.parameters() if p.requires_grad]
            if list(self.mean) != [str(i) for i in range(len(plist))]:
                raise ValueError(
                    f"posterior keys {list(self.mean)[:5]}... do not match the model's parameter "
                    f"names {list(named)[:5]}..."
                )
            params = dict(zip(self.mean, plist))
        for k, p in params.items():
            if p.shape != self.mean[k].shape:
                raise ValueError(
                    f"parameter {k!r} has shape {tuple(p.shape)}, the posterior {tuple(self.mean[k].shape)}"
                )
        return params

    # -- persistence ---------------------------------------------------------------------------
    # what a fit records beside the moments (ef.laplace: the δ and σ it chose), kept by state_dict
    # and to(): a posterior saved without its tuned σ predicted with the default σ = 1.
    # ``from_training``: the curvature came from training passes (BayesAdam, Adam's moments), where
    # BatchNorm normalised with each batch's statistics (ef.predict's BatchNorm warning reads it)
    _EXTRAS = ("prior_precision", "sigma_noise", "likelihood", "from_training")

    def state_dict(self) -> dict:
        out = {"mean": dict(self.mean), "precision": dict(self.precision)}
        for k in self._EXTRAS:
            if hasattr(self, k):
                v = getattr(self, k)
                out[k] = dict(v) if isinstance(v, Mapping) else v
        return out

    def load_state_dict(self, state: Mapping) -> None:
        new = DiagGaussian(state["mean"], state["precision"])
        self.mean, self.precision = new.mean, new.precision
        self.__dict__.pop("sources", None)  # the loaded keys are not those parameters' any more
        for k in self._EXTRAS:
            if k in state:
                setattr(self, k, state[k])
            else:
                self.__dict__.pop(k, None)

    def to(self, *args, **kwargs) -> DiagGaussian:
        """The same posterior with its tensors moved/cast (``Tensor.to`` arguments); it keeps the
        recorded δ and σ and the parameters a positional posterior matches by."""
        new = DiagGaussian(
            {k: v.to(*args, **kwargs) for k, v in self.mean.items()},
            {k: v.to(*args, **kwargs) for k, v in self.precision.items()},
        )
        for k in (*self._EXTRAS, "sources"):
            if hasattr(self, k):
                v = getattr(self, k)
                if k == "prior_precision" and isinstance(v, Mapping):
                    v = {n: t.to(*args, **kwargs) if torch.is_tensor(t) else t for n, t in v.items()}
                setattr(new, k, v)
        return new

    def __repr__(self) -> str:
        return f"DiagGaussian({len(self.mean)} tensors, {self.numel()} weights)"

