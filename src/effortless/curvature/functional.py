"""Diagonal curvature of the summed negative log-likelihood, for any module, via ``torch.func``.

All functions return a dict keyed like ``model.named_parameters()`` (trainable parameters only,
or the names in ``params``), with tensors in the parameters' shapes, holding the curvature of
``Σ_b nll(f(x_b; θ), y_b)``: a *sum* over the batch, no 1/B.

* :func:`diag_ggn` — ``diag Σ_b J_bᵀ ∇²_f nll J_b``; ``method="exact"`` contracts per-sample
  Jacobians with the symmetric factor of the output Hessian, ``method="mc"`` uses gradients at
  labels drawn from the model's predictive (unbiased).
* :func:`diag_efisher` — ``diag Σ_b g_b g_bᵀ`` with ``g_b`` the per-sample gradient.
* :func:`diag_hessian` — the exact Hessian diagonal (one Hessian-vector product per parameter,
  batched; for small models and as a reference).
* :func:`diag_hutchinson` — ``E[v ⊙ Hv]`` over Rademacher probes ``v`` (unbiased).

This is the generic path: correct for every architecture (per-sample functions are evaluated with
``vmap``; the batch is chunked so memory stays bounded). Modules whose behaviour couples samples
(BatchNorm in training mode) must be put in eval mode first.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> ggn = diag_ggn(model, x, y, likelihood="classification")
    >>> sorted(ggn), ggn["weight"].shape
    (['bias', 'weight'], torch.Size([2, 3]))
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import _rng, likelihoods
from .._checks import is_count
from .._stack import outside_stacklevel
from . import engine

__all__ = [
    "diag_ggn", "diag_efisher", "diag_hessian", "diag_hutchinson", "diag_kfac", "hvp", "kfac", "trainable",
]  # fmt: skip

_log = logging.getLogger("effortless.curvature")


def run_eagerly(model: nn.Module):
    """A context in which ``model``'s ``torch.compile``d parts run their original forward eagerly.

    The hook engine needs each layer's output as a node of the autograd graph, and the
    ``torch.func`` path transforms the forward; a compiled forward is one opaque graph (layer
    outputs are not separate autograd nodes, double backward is unsupported), which gave wrong
    curvature for every layer but the last, or errors. torch ≥ 2.6 has the stance; before it a
    compiled model is refused."""
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is not None:
        return stance("force_eager")
    if any(hasattr(m, "_orig_mod") for m in model.modules()):
        raise ValueError(
            "this torch has no torch.compiler.set_stance (torch >= 2.6) to run a torch.compile'd "
            "model eagerly, which the curvature needs: pass the uncompiled module"
        )
    return contextlib.nullcontext()


def eager_forward(fn):
    """Decorator: ``fn(model, ...)`` runs with the model's compiled parts executing eagerly, and
    with autograd usable under ``torch.inference_mode()`` (Lightning's validation, test and predict
    loops run in it): inference mode is left for the call and tensor arguments made in it are
    copied out of it (autograd cannot save inference tensors: the linearised predictive and the
    Laplace fits failed with "Inference tensors do not track version counter")."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                args = tuple(_out_of_inference(a) for a in args)
                kwargs = {k: _out_of_inference(v) for k, v in kwargs.items()}
                with run_eagerly(model):
                    return fn(model, *args, **kwargs)
        with run_eagerly(model):
            return fn(model, *args, **kwargs)

    return run


def _out_of_inference(value):
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def math_attention():
    """A context in which ``scaled_dot_product_attention`` uses its math kernel: its backward is
    differentiable and vmap batches it; the fused CPU/CUDA kernels' backward is not ("derivative
    for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented") and vmap
    has no batching rule for them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def second_order(fn):
    """Decorator for the functions that differentiate twice (Hessian diagonal, HVP, Hutchinson):
    attention runs through :func:`math_attention`."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with math_attention():
            return fn(*args, **kwargs)

    return run


def keep_buffers(fn):
    """Decorator: ``fn(model, ...)`` leaves the model's buffers as they were — a forward in
    training mode updates BatchNorm's running statistics (once per extra forward: twice in a
    one-probe Hutchinson ``train_step``, once per sample in an MC predictive) and spectral norm's
    power-iteration vectors, and a curvature or prediction call must not move the model (nor leave
    it moved when it fails half-way). Training-mode BatchNorm still normalises with the batch's
    statistics, as in the training loss, without updating the running ones (an in-place update
    inside a ``torch.func`` transform also fails).

    Embeddings with ``sparse=True`` give dense gradients for the call: the flag only picks the
    gradient's layout, and sparse tensors do not go through ``torch.func`` or the products here."""

    @functools.wraps(fn)
    def run(model, *args, **kwargs):
        buffers = [(b, b.clone()) for b in model.buffers()]
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        quiet = [m for m in bns if m.training and m.track_running_stats]
        sparse = [m for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse]
        for m in quiet:
            m.track_running_stats = False
        for m in sparse:
            m.sparse = False
        try:
            return fn(model, *args, **kwargs)
        finally:
            for m in quiet:
                m.track_running_stats = True
            for m in sparse:
                m.sparse = True
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)

    return run


def stateless(fn):
    """Decorator for the public curvature functions: :func:`eager_forward` and
    :func:`keep_buffers`."""
    return keep_buffers(eager_forward(fn))


def refuse_coupled(model: nn.Module, what: str) -> None:
    """Per-sample curvature needs each sample's output to depend on that sample alone."""
    coupled = engine.coupled_modules(model)
    if coupled:
        raise ValueError(
            f"{what} needs per-sample quantities, which are not defined through BatchNorm "
            f"{coupled[0]!r}{f' (and {len(coupled) - 1} more)' if len(coupled) > 1 else ''} normalising "
            "with batch statistics (training mode, or no running statistics): it couples the samples "
            "of a batch. Call model.eval() first (with running statistics), or use a batch-level "
            "estimator (diag_hessian, diag_hutchinson; BayesAdam's 'reparam' or 'gradsq')"
        )
    scaled = engine.freq_scaled_modules(model)
    if scaled:  # the hook rule gave the unscaled Jacobian's curvature, torch.func the batch-scaled one
        raise ValueError(
            f"{what} needs per-sample gradients, which are not defined through {scaled[0]!r} with "
            "scale_grad_by_freq=True: its backward divides each row's gradient by how often the index "
            "occurs in the whole mini-batch. Turn it off for the curvature, or use a batch-level "
            "estimator (diag_hessian, diag_hutchinson; BayesAdam's 'reparam' or 'gradsq')"
        )


# The generic path holds per-sample gradients for a chunk of samples at once: at most
# max(2·P, _MIN_CHUNK_ELEMENTS) numbers, so its memory stays within a small multiple of a training
# step (parameters, gradients, activations) however large the batch.
_MIN_CHUNK_ELEMENTS = 2**16


def trainable(model: nn.Module, params: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The parameters curvature is taken for: trainable ones, or the names given, in model order."""
    named = dict(model.named_parameters())
    if params is None:
        out = {n: p for n, p in named.items() if p.requires_grad}
        if not out:  # (torch's "`inputs` argument to `grad()` cannot be empty" said it deep inside)
            raise ValueError(
                "no parameter to take the curvature of: every parameter of the model has "
                "requires_grad=False (unfreeze some, or name them with params=)"
            )
        return out
    if isinstance(params, str):  # (iterated letter by letter: "unknown parameter names ['2', '.', 'w', …]")
        raise ValueError(f"params must be a list of parameter names, got the string {params!r} "
                         f"(use [{params!r}])")  # fmt: skip
    names = list(params)
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"params: unknown parameter names {missing}; the model has {list(named)}")
    if not names:
        raise ValueError("params: no parameter names given (None takes every trainable parameter)")
    return {n: named[n] for n in named if n in set(names)}


def _frozen(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    rest.update(dict(model.named_buffers()))
    return rest


def _single(model, frozen):
    """f(θ, x_b) for one sample: the model on a batch of one, batch dimension removed."""

    def f(theta, xb):
        return functional_call(model, {**frozen, **theta}, (xb.unsqueeze(0),)).squeeze(0)

    return f


def per_sample(fn, in_dims):
    """``vmap(fn, in_dims)``, or, for a model vmap cannot batch (recurrent layers, whose hidden
    state is created and updated in place inside the forward), the same function applied sample by
    sample and stacked: slower, same result. (It failed with "output with shape [1, 5] doesn't
    match the broadcast shape [8, 1, 5]".)"""
    batched = vmap(fn, in_dims=in_dims)
    failed = False  # once vmap failed, later chunks of the same call loop at once

    def run(*args):
        nonlocal failed
        if not failed:
            try:
                with math_attention():
                    return batched(*args)
            except RuntimeError as err:
                if "setup_context" in str(err):  # no torch.func transform runs it: the loop fails too
                    raise RuntimeError(
                        "the generic curvature path (torch.func) cannot differentiate an autograd.Function "
                        "in this model's forward; torch.utils.checkpoint(..., use_reentrant=True) is one "
                        "(use_reentrant=False works, with the hook path where the layers allow it)"
                    ) from err
                failed = True
                _warn_per_sample_loop(str(err).splitlines()[0][:200])
        n = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
        outs = [fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims))) for i in range(n)]
        leaves, spec = tree_flatten(outs[0])
        columns = zip(*(tree_flatten(o)[0] for o in outs))
        return tree_unflatten([torch.stack(c) for c in columns], spec) if leaves else outs[0]

    return run


@functools.cache
def _warn_once(message: str) -> None:
    """A fallback's RuntimeWarning, once per distinct message and process."""
    warnings.warn(message, RuntimeWarning, stacklevel=outside_stacklevel())


def _warn_per_sample_loop(reason: str) -> None:
    _warn_once(f"torch.func.vmap cannot batch this model ({reason}); per-sample quantities are computed "
               "one sample at a time (same result, slower)")  # fmt: skip


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _chunk_size(params: dict, chunk_size: int | None) -> int:
    """Samples per chunk of per-sample gradients (each P numbers)."""
    if chunk_size is not None:
        return int(chunk_size)
    n_params = sum(p.numel() for p in params.values())
    return max(1, max(2 * n_params, _MIN_CHUNK_ELEMENTS) // max(1, n_params))


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """One label (row of targets) per input, and at least one of each: the estimators that do not
    read the labels (exact and MC GGN, KFAC) would otherwise take a misaligned batch silently."""
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):  # a NumPy array or a list failed on a missing .dim()
            raise TypeError(
                f"{name} must be a tensor, got {type(t).__name__} (convert it with torch.as_tensor)"
            )
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension (a batch of inputs), got a 0-d tensor")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (0 samples): its curvature sum is zero; skip it")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one label or target row per input: x has {x.shape[0]} samples, "
                         f"y has shape {tuple(y.shape)}")  # fmt: skip


def _zeros_like(params):
    return {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in params.items()}


@stateless
def diag_ggn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    likelihood: str | likelihoods.Likelihood = "classification",
    method: str = "exact",
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    sigma_noise: float = 1.0,
    params: Iterable[str] | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    product_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal of the generalised Gauss-Newton matrix of the summed NLL.

    Args:
        model: any module mapping a batch ``x`` to outputs (B, C).
        x, y: inputs and targets.
        likelihood: ``"classification"`` or ``"regression"``.
        method: ``"exact"`` (contract per-sample Jacobians with the output-Hessian factor) or
            ``"mc"`` (average of squared gradients at ``n_samples`` labels drawn from the model).
        n_samples: Monte-Carlo labels per input for ``method="mc"``.
        generator: random generator for ``method="mc"``.
        sigma_noise: noise standard deviation for regression.
        params: restrict to these parameter names (e.g. the last layer).
        chunk_size: samples per chunk (default: the generic path holds per-sample gradients of at
            most max(2·P, 2¹⁶) numbers at once; the hook engine runs ``HOOK_CHUNK`` = 4,096
            samples at a time).
        backend: ``"auto"`` (the hook engine when :func:`plan` allows, else ``torch.func``),
            ``"hooks"`` (error if not possible) or ``"func"``.
        product_dtype: precision of the hook engine's products for Linear/Conv layers, e.g.
            ``torch.bfloat16``: 3–4× faster on hardware with bf16 units. For Linear layers on
            (batch, features) inputs the product sums non-negative squares, so every entry stays
            within about 1.2 % (three bf16 roundings) of the exact value; for convolutions and
            sequence inputs the per-sample gradients are formed in bf16, so an entry whose
            per-sample gradients cancel can be off by more (tested within 1.5 % on small CNNs).
            ``None`` (default): the model's dtype, exact to round-off. Not used by the
            ``torch.func`` path.
    """
    _check_product_dtype(product_dtype, x.device)
    if method not in ("exact", "mc"):
        raise ValueError(f"method must be 'exact' or 'mc', got {method!r}")
    _check_count("n_samples", n_samples, method == "mc")
    lik = likelihoods.get(likelihood, sigma_noise)
    _check_batch(x, y)
    refuse_coupled(model, "diag_ggn")
    kind = "ggn" if method == "exact" else "ggn-mc"
    out = _via_hooks(model, x, y, lik, params, backend, kind, n_samples, generator, chunk_size, product_dtype)
    if out is not None:
        return out
    if method == "mc":
        with torch.no_grad():
            f = model(x)
        lik.check(f, y)  # (y is not read: a wrong kind of target, or labels beyond C, is a caller's bug)
        out = None
        for _ in range(int(n_samples)):
            y_hat = lik.sample(f, generator)
            est = diag_efisher(model, x, y_hat, lik, params=params, chunk_size=chunk_size, backend="func")
            out = est if out is None else {n: out[n] + est[n] for n in out}
        return {n: v / n_samples for n, v in out.items()}

    theta = {n: p.detach() for n, p in trainable(model, params).items()}
    f_single = _single(model, _frozen(model, theta))
    with torch.no_grad():
        f = model(x)
    lik.check(f, y)  # (y is not read: a wrong kind of target, or labels beyond C, is a caller's bug)
    f2 = likelihoods.as_2d(f)
    S = lik.hessian_factor(f2).to(f2.dtype)  # (B, C, K)

    def row(th, xb, sb):  # (S_bᵀ J_b)_k for one sample: one vector-Jacobian product
        _, pull = vjp(lambda t: f_single(t, xb).reshape(-1), th)
        return pull(sb)[0]

    rows = per_sample(row, (None, 0, 0))
    out = _zeros_like(theta)
    for k in range(S.shape[2]):  # one output-Hessian column at a time: memory b·P, not b·C·P
        for sl in _chunks(x.shape[0], _chunk_size(theta, chunk_size)):
            for n, r in rows(theta, x[sl], S[sl, :, k]).items():
                out[n] += r.pow(2).sum(0)
    return out


@stateless
def diag_efisher(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    likelihood: str | likelihoods.Likelihood = "classification",
    sigma_noise: float = 1.0,
    params: Iterable[str] | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    product_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``Σ_b g_b ⊙ g_b`` from per-sample gradients of the NLL.

    ``backend`` and ``product_dtype`` as in :func:`diag_ggn`.
    """
    _check_product_dtype(product_dtype, x.device)
    lik = likelihoods.get(likelihood, sigma_noise)
    _check_batch(x, y)
    refuse_coupled(model, "diag_efisher")
    out = _via_hooks(model, x, y, lik, params, backend, "efisher", 1, None, chunk_size, product_dtype)
    if out is not None:
        return out
    theta = {n: p.detach() for n, p in trainable(model, params).items()}
    f_single = _single(model, _frozen(model, theta))

    def loss(th, xb, yb):
        return lik.nll(f_single(th, xb).reshape(1, -1), yb.reshape(1, *yb.shape)).sum()

    grads = per_sample(grad(loss), (None, 0, 0))
    out = _zeros_like(theta)
    for sl in _chunks(x.shape[0], _chunk_size(theta, chunk_size)):
        for n, g in grads(theta, x[sl], y[sl]).items():
            out[n] += g.pow(2).sum(0)
    return out


_BACKENDS = ("auto", "hooks", "func")


def _check_product_dtype(dtype, device=None) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"product_dtype must be None or a floating torch.dtype, got {dtype!r}")
    if dtype == torch.bfloat16 and device is not None and torch.device(device).type == "cpu":
        _warn_without_bf16_units()


@functools.cache
def _warn_without_bf16_units() -> None:
    """Once per process: bf16 products on a CPU without bf16 units are emulated (can be slower)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    if probe is not None and not (probe() or amx()):
        warnings.warn(
            "product_dtype=torch.bfloat16 on a CPU without AVX512-BF16 or AMX: the products are "
            "emulated and may be slower than float32 (effortless hessian-profile measures it)",
            RuntimeWarning,
            stacklevel=outside_stacklevel(),
        )


def _cotangents(kind, f, y, lik, n_samples, generator):
    """(K, *f.shape) output-space vectors whose per-sample gradients square-sum to the quantity."""
    f2 = likelihoods.as_2d(f)
    lik.check(f, y)  # the GGN keys do not read y, but a wrong kind of target is a caller's bug
    if kind == "ggn":
        S = lik.hessian_factor(f2.detach()).to(f2.dtype)  # (B, C, K)
        return S.permute(2, 0, 1).reshape(S.shape[2], *f.shape)
    # efisher: the true labels; ggn-mc: labels drawn from the model's own predictive
    samples = range(int(n_samples))
    labels = [y] if kind == "efisher" else [lik.sample(f.detach(), generator) for _ in samples]
    return torch.stack([lik.nll_grad(f.detach(), lab) for lab in labels])


# Samples per pass of the hook engine when no chunk_size is given. Its output gradients take K
# numbers (K = C for the exact GGN) per sample and per element of every saved layer input and
# output: 1.9 GB for 60,000 inputs of 784-512-256-10 in one piece, but 2 GB for just 1,024 inputs
# of a two-layer 28×28 CNN. The first pass takes up to HOOK_FIRST samples (a training-sized batch
# is one pass); the next ones as many as keep K × that footprint under HOOK_BUDGET numbers, and
# at most HOOK_CHUNK.
HOOK_CHUNK = 4096
HOOK_FIRST = 256
HOOK_BUDGET = 2**26


class _Passes:
    """Sample slices for the hook engine: ``size`` samples each when the caller fixed it, else a
    first pass of ``first`` and then passes sized by :meth:`measured` (the numbers a pass holds
    per sample, from the first one) to stay under ``budget``, and at most ``most``."""

    def __init__(self, count: int, size=None, first=None, most=None, budget=None):
        self.count, self.fixed = count, bool(size)
        self.most, self.budget = most or HOOK_CHUNK, budget or HOOK_BUDGET
        self.size = int(size) if size else min(count, first or HOOK_FIRST, self.most)
        self._sized = False

    def __iter__(self):
        start = 0
        while start < self.count:
            sl = slice(start, min(self.count, start + self.size))
            yield sl
            start = sl.stop

    def measured(self, per_sample: float) -> None:
        if not (self.fixed or self._sized):
            self.size = int(min(self.most, max(1, self.budget // max(per_sample, 1.0))))
            self._sized = True


def _via_hooks(model, x, y, lik, params, backend, kind, n_samples, generator, chunk_size, product_dtype=None):
    """The quantity from the hook engine, or None when the generic path must run."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "func":
        return None
    p = engine.plan(model, params)
    if p.backend != "hooks":
        if backend == "hooks":
            raise ValueError(f"backend='hooks' is not possible for this model: {p}")
        _log.debug("curvature %s: torch.func path (%s)", kind, p)
        return None
    names = list(trainable(model, params))
    total = None
    passes = _Passes(x.shape[0], chunk_size)
    try:
        for sl in passes:
            with torch.enable_grad():
                f, saved = engine.forward(p, lambda sl=sl: model(x[sl]), model)
            V = _cotangents(kind, f, y[sl], lik, n_samples, generator)
            deltas = engine.output_grads(f, saved, V)
            part = engine.sq_sums(p, saved, deltas, product_dtype)
            total = part if total is None else {n: total[n] + part[n] for n in total}
            passes.measured(V.shape[0] * engine.saved_numel(saved) / (sl.stop - sl.start))
    except engine.Unsupported as err:
        if backend == "hooks":
            raise ValueError(f"backend='hooks' is not possible for this model: {err}") from None
        _log.debug("curvature %s: torch.func path (%s)", kind, err)
        return None
    _log.debug("curvature %s: hook engine", kind)
    scale = 1.0 / n_samples if kind == "ggn-mc" else 1.0
    return {n: total[n].detach() * scale if scale != 1.0 else total[n].detach() for n in names}


@eager_forward
def training_pass(model, x, y, lik, plan, kind: str, generator=None, proceed=None, loss_scale: float = 1.0,
                  kfac_diagonal: bool = False, product_dtype: torch.dtype | None = None):
    """One forward (with hooks) and the training backward of the mean loss (times ``loss_scale``,
    for gradient accumulation), sharing them with a curvature quantity from the hook engine.

    ``kind``: ``"efisher"`` (from the training backward itself), ``"ggn"``, ``"ggn-mc"`` (one
    batched backward of cotangents to the layer outputs first), ``"kfac"``, ``"kfac-mc"``. Returns
    ``(loss, result)``: per-parameter batch sums of squared per-sample gradients, or the KFAC
    factors per module for the ``kfac`` kinds. ``proceed(loss)`` may stop before the backward
    (returns ``(loss, None)``), e.g. for a non-finite loss. ``kfac_diagonal``: only the factors'
    diagonals (all the diagonal of ``G ⊗ A`` needs). ``product_dtype``: as in :func:`diag_ggn`
    (the curvature's products only; the gradient is exact).
    """
    f, saved = engine.forward(plan, lambda: model(x), model)
    loss = lik.nll(f, y).mean()
    if proceed is not None and not proceed(loss):
        return loss, None
    if kind == "efisher":  # per-sample gradients of the loss from the training backward itself
        grads: dict[str, torch.Tensor] = {}
        for n, (_, z) in saved.items():
            z.register_hook(lambda g, n=n: grads.__setitem__(n, g))
        (loss * loss_scale).backward()
        deltas = {n: g.mul(x.shape[0] / loss_scale).unsqueeze(0) for n, g in grads.items()}
    else:
        cot = "ggn" if kind in ("ggn", "kfac") else "ggn-mc"
        deltas = engine.output_grads(f, saved, _cotangents(cot, f, y, lik, 1, generator))
        (loss * loss_scale).backward()
    with torch.no_grad():
        if kind.startswith("kfac"):
            return loss, engine.kfac_factors(plan, saved, deltas, diagonal=kfac_diagonal, dtype=product_dtype)
        return loss, engine.sq_sums(plan, saved, deltas, product_dtype)


@stateless
def kfac(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    likelihood: str | likelihoods.Likelihood = "classification",
    method: str = "exact",
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    sigma_noise: float = 1.0,
    params: Iterable[str] | None = None,
    product_dtype: torch.dtype | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Kronecker factors ``(A, G)`` of the GGN of the summed NLL per Linear/Conv module.

    ``A = mean ā āᵀ`` over samples (and positions) of the module input with a ones column when the
    module has a bias; ``G = Σ δ δᵀ`` of the output gradients for the exact output-Hessian factor
    (``method="exact"``) or ``n_samples`` sampled labels (``"mc"``, averaged). The GGN block of the
    layer, summed over the batch, is approximated by ``G ⊗ A`` (rows: outputs; columns: flattened
    inputs, bias last); exact for one sample at one position. ``product_dtype``: precision of the
    products ``āᵀā`` and ``δᵀδ`` (e.g. ``torch.bfloat16``, see :func:`diag_ggn`; each factor then
    within about 1 % of its Frobenius norm).
    """
    _check_product_dtype(product_dtype, x.device)
    lik = likelihoods.get(likelihood, sigma_noise)
    _check_batch(x, y)
    refuse_coupled(model, "kfac")
    p = _kfac_plan(model, params, method, n_samples)
    return _kfac(model, x, y, lik, p, method, n_samples, generator, False, product_dtype)


def _check_count(name, value, used=True):
    """A count of samples or probes: a positive int (NumPy's too). 2.5 drew 2 and divided by 2.5,
    an estimate 20 % low, silently."""
    if used and not is_count(value):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _kfac_plan(model, params, method, n_samples=1):
    if method not in ("exact", "mc"):
        raise ValueError(f"method must be 'exact' or 'mc', got {method!r}")
    _check_count("n_samples", n_samples, method == "mc")
    p = engine.plan(model, params)
    grouped = {n for n, m in p.modules.items() if getattr(m, "groups", 1) != 1}  # (a pair per group)
    no_rule = [f"{n} ({type(m).__name__}{', grouped' if n in grouped else ''})"
               for n, m in p.modules.items() if not engine.RULES[type(m)].kfac or n in grouped]
    if p.backend != "hooks" or no_rule:
        why = f"no Kronecker factors for {', '.join(no_rule)}" if no_rule else str(p)
        raise ValueError(f"kfac needs every selected parameter in a Linear/Conv layer: {why}")
    return p


def _kfac(model, x, y, lik, p, method, n_samples, generator, diagonal, product_dtype=None):
    """The factors over passes of samples (:class:`_Passes`): A, a mean over samples (and
    positions, as many for every sample), is weighted by each pass's share; G is a sum."""
    total, n = None, x.shape[0]
    passes = _Passes(n)
    for sl in passes:
        try:
            with torch.enable_grad():
                f, saved = engine.forward(p, lambda sl=sl: model(x[sl]), model)
        except engine.Unsupported as e:  # (the engine's own exception, with no way out, reached users)
            raise ValueError(
                f"kfac needs every Linear/Conv layer to run once per forward, with autograd on: {e}. Such "
                "a layer has no Kronecker factors here; use a diagonal estimator ('ggn', 'ggn-mc', "
                "'efisher'), which handle it"
            ) from None
        V = _cotangents("ggn" if method == "exact" else "ggn-mc", f, y[sl], lik, n_samples, generator)
        deltas = engine.output_grads(f, saved, V)
        out = engine.kfac_factors(p, saved, deltas, diagonal=diagonal, dtype=product_dtype)
        share = (sl.stop - sl.start) / n
        if share != 1:
            out = {k: (A.mul_(share), G) for k, (A, G) in out.items()}
        if method == "mc":
            out = {k: (A, G / n_samples) for k, (A, G) in out.items()}
        out = {k: (A.detach(), G.detach()) for k, (A, G) in out.items()}
        total = out if total is None else {k: (total[k][0] + A, total[k][1] + G) for k, (A, G) in out.items()}
        passes.measured(V.shape[0] * engine.saved_numel(saved) / (sl.stop - sl.start))
    return total


@stateless
def diag_kfac(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    likelihood: str | likelihoods.Likelihood = "classification",
    method: str = "exact",
    generator: torch.Generator | None = None,
    sigma_noise: float = 1.0,
    params: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The diagonal of the Kronecker-factored GGN ``G ⊗ A`` per parameter (see :func:`kfac`),
    from the factors' diagonals alone (no in × in products)."""
    lik = likelihoods.get(likelihood, sigma_noise)
    _check_batch(x, y)
    refuse_coupled(model, "diag_kfac")
    p = _kfac_plan(model, params, method)
    return engine.kfac_diagonal(p, _kfac(model, x, y, lik, p, method, 1, generator, diagonal=True))


def _gradient_graph(model, x, y, lik, names):
    """Leaf copies of the parameters and the gradient of the summed NLL, with its graph kept.

    Second derivatives use eager double backward rather than ``torch.func`` transforms: in torch
    2.13 ``torch.func.hessian``/``jacrev(jacrev)`` return wrong cross terms through ``F.layer_norm``
    (found by tests/curvature against an explicit LayerNorm), while eager autograd is right.
    """
    theta = trainable(model, names)
    leaves = {n: p.detach().requires_grad_(True) for n, p in theta.items()}
    with torch.enable_grad():
        loss = lik.nll(functional_call(model, {**_frozen(model, theta), **leaves}, (x,)), y).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    return leaves, grads


def _second_grad(grads, leaves: dict, cotangents, batched=False, on_loop=None, retain_graph=False):
    """∂/∂θ of Σ_i ⟨grads_i, cotangents_i⟩ per leaf (with a leading K when ``batched``): gradients
    that are None (a parameter the loss does not use) or constant in θ (no graph) add nothing,
    and leaves they do not reach get zeros."""
    inputs = list(leaves.values())
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not live:  # (a loss that is linear in every parameter)
        return [torch.zeros_like(c) for c in (cotangents if batched else inputs)]
    outs, cots = [grads[i] for i in live], [cotangents[i] for i in live]
    if batched:
        return engine.batched_grad(outs, inputs, cots, on_loop=on_loop)
    hv = torch.autograd.grad(outs, inputs, cots, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(t) if h is None else h for h, t in zip(hv, inputs)]


@stateless
@second_order
def hvp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    v: dict[str, torch.Tensor],
    likelihood: str | likelihoods.Likelihood = "classification",
    sigma_noise: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Hessian-vector product of the summed NLL with ``v`` (dict keyed like the parameters)."""
    lik = likelihoods.get(likelihood, sigma_noise)
    _check_batch(x, y)
    leaves, grads = _gradient_graph(model, x, y, lik, v.keys())
    hv = _second_grad(grads, leaves, [v[n] for n in leaves])
    return dict(zip(leaves, hv))


def _warn_vjp_loop(reason: str) -> None:
    _warn_once(f"batched Hessian-vector products failed on this model ({reason}); they run one at a time "
               "(same result, slower)")  # fmt: skip


@stateless
@second_order
def diag_hessian(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    likelihood: str | likelihoods.Likelihood = "classification",
    sigma_noise: float = 1.0,
    params: Iterable[str] | None = None,
    chunk_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Exact diagonal of the Hessian of the summed NLL (P Hessian-vector products, batched).

    Costs one HVP per parameter: meant for small models, tests and the last layer.
    """
    lik = likelihoods.get(likelihood, sigma_noise)
    _check_batch(x, y)
    leaves, grads = _gradient_graph(model, x, y, lik, params)
    names = list(leaves)
    sizes = [leaves[n].numel() for n in names]
    total = sum(sizes)
    ref = next(iter(leaves.values()))
    diag = torch.empty(total, dtype=ref.dtype, device=ref.device)
    for sl in _chunks(total, chunk_size):
        rows = torch.arange(sl.stop - sl.start, device=ref.device)
        basis = torch.zeros(len(rows), total, dtype=ref.dtype, device=ref.device)
        basis[rows, rows + sl.start] = 1
        cot = [t.view(len(rows), *leaves[n].shape) for n, t in zip(names, basis.split(sizes, dim=1))]
        # (GroupNorm's double backward has no batching rule: one product at a time there)
        hv = _second_grad(grads, leaves, cot, batched=True, on_loop=_warn_vjp_loop)
        flat = torch.cat([h.reshape(len(rows), -1) for h in hv], 1)  # (chunk, P)
        diag[sl] = flat[rows, rows + sl.start]
    return {n: t.view_as(leaves[n]).clone() for n, t in zip(names, diag.split(sizes))}


@stateless
@second_order
def diag_hutchinson(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    likelihood: str | likelihoods.Likelihood = "classification",
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    sigma_noise: float = 1.0,
    params: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Hutchinson estimate ``mean_k v_k ⊙ H v_k`` of the Hessian diagonal, Rademacher ``v_k``."""
    _check_count("n_probes", n_probes)
    lik = likelihoods.get(likelihood, sigma_noise)
    _check_batch(x, y)
    leaves, grads = _gradient_graph(model, x, y, lik, params)
    out = _zeros_like(leaves)
    for _ in range(int(n_probes)):
        v = [_rng.signs(p.shape, generator, p) for p in leaves.values()]
        hv = _second_grad(grads, leaves, v, retain_graph=True)
        for n, vi, hi in zip(leaves, v, hv):
            out[n] += vi * hi
    return {n: t / n_probes for n, t in out.items()}
