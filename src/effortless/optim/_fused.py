"""Fused (``torch.compile``d) kernels for the hot paths of BayesAdam: drawing θ, the
reparameterisation step and the step with a model-side curvature estimate (``train_step`` with
``ggn``, ``ggn-mc``, ``efisher``, ``kfac``). Each is one pass over memory instead of ~4, ~18 and
~12 eager passes.

The math is the same as the eager kernel in :mod:`effortless.optim.bayesadam` (tested equal to
float64 round-off); hyperparameters travel as a tensor so that changing the learning rate or the
bias corrections does not recompile. Tensors are flattened to 1-D and compiled with dynamic
shapes. The kernels take lists of tensors and loop over them inside one compiled graph, which
costs one call per step but a compilation that grows with the list (ResNet-18, 62 tensors: 46 s
cold, 7.7 s with a warm inductor cache). Lists longer than ``CHUNK_ABOVE`` are therefore cut into
chunks of ``CHUNK`` tensors, passed as storage aliases rather than views and traced without duck
shaping, so that the chunks look alike to torch.compile's guards: one compilation serves every
full chunk and one more the remainder, whatever the model's depth (ResNet-18: 17 s cold, 4.1 s
warm; ``benchmarks/compile_time.py``). If compilation fails (no C++ compiler, unsupported
platform) the optimizer warns once and stays eager.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

import torch

from .._stack import outside_stacklevel

_CACHE: dict[str, object] = {}
_BROKEN: set[str] = set()  # kernels whose compilation failed after a first chunk had run

# Lists of more than CHUNK_ABOVE tensors run in chunks of CHUNK. Each extra call costs guard checks
# (~0.2 ms a kernel for 20 tensors in 3 chunks, a 20-tensor MLP's step +0.6–1.0 ms on 8 ms), so
# models below the threshold keep one call and one graph (≤ ~20 s cold compilation); above it the
# one graph's compilation gets long (ResNet-18: 46 s) and the step is large anyway.
CHUNK = 8
CHUNK_ABOVE = 32


def _sample_math(mu, h, e, hp):
    # hp = [sign, N/T, δ/T]
    return mu + hp[0] * e / torch.sqrt(h * hp[1] + hp[2])


def _adam_mean_math(mu, g, m, v, hp):
    # Adam on the per-sample negative log joint (the prior's pull wd · μ added to the gradient)
    # hp = [wd, 1−β₁, β₂, 1−β₂, √bc₂, eps, −lr/bc₁]
    g_tot = g + hp[0] * mu
    m_new = m + hp[1] * (g_tot - m)
    v_new = hp[2] * v + hp[3] * (g_tot * g_tot)
    mu.copy_(mu + hp[6] * m_new / (torch.sqrt(v_new) / hp[4] + hp[5]))
    m.copy_(m_new)
    v.copy_(v_new)


def _reparam_step_math(mu, g, m, v, h, e, hp):
    # hp = [sign, N/T, δ/T, 1−β, riemann, wd, 1−β₁, β₂, 1−β₂, √bc₂, eps, −lr/bc₁]
    inv_sigma = torch.sqrt(h * hp[1] + hp[2])
    d = h - hp[0] * (g * e * inv_sigma)
    q = d / inv_sigma
    h_new = h - hp[3] * d + hp[4] * (q * q)
    _adam_mean_math(mu, g, m, v, hp[5:])
    h.copy_(h_new)


def _reparam_step_theta_math(mu, g, m, v, h, th, hp):
    # the sample θ sits in the noise buffer: sign · ε = (θ − μ)/σ from the old μ and h, used (with
    # hp[0] = 1) and left in the buffer for an antithetic mirror
    e = (th - mu) * torch.sqrt(h * hp[1] + hp[2])
    _reparam_step_math(mu, g, m, v, h, e, hp)
    th.copy_(e)


def _given_step_math(mu, g, m, v, h, hhat, hp):
    # a model-side estimate ĥ (non-negative keys): h ← lerp(h, ĥ, 1−β), then Adam on μ
    # hp = [N/T, δ/T, 1−β, wd, 1−β₁, β₂, 1−β₂, √bc₂, eps, −lr/bc₁]
    h_new = torch.lerp(h, hhat, hp[2])
    _adam_mean_math(mu, g, m, v, hp[3:])
    h.copy_(h_new)


def _given_step_theta_math(mu, g, m, v, h, hhat, th, hp):
    # the sample θ sits in the noise buffer: it becomes sign · ε = (θ − μ)/σ (old μ and h), kept
    # for an antithetic mirror, in the same pass as the update
    th.copy_((th - mu) * torch.sqrt(h * hp[0] + hp[1]))
    _given_step_math(mu, g, m, v, h, hhat, hp)


def _flip_sum(A, B):
    # Σ_q a_q b_qᵀ for A (R, rows, 1) and B (R, 1, cols), the sum over ranks unrolled
    s = A[0] * B[0]
    for q in range(1, A.shape[0]):
        s = s + A[q] * B[q]
    return s


def _flipout_sample_many(mus, hs, zs, As, Bs, owns, hp, rank):
    # 2-D views (rows, cols) of each tensor; A (R, rows, 1) and B (R, 1, cols) hold the ranks'
    # sign factors: rank r's sample μ + sign · σ ⊙ ζ ⊙ a_r b_rᵀ goes into ``own``
    for mu, h, z, A, B, own in zip(mus, hs, zs, As, Bs, owns):
        own.copy_(mu + hp[0] * (z * A[rank] * B[rank]) / torch.sqrt(h * hp[1] + hp[2]))


def _reparam_step_flipout_many(mus, gs, ms, vs, hs, zs, As, Bs, hp):
    # the reparam step on 2-D views with the noise Σ_q ε_q = ζ ⊙ Σ_q a_q b_qᵀ formed on the fly
    for mu, g, m, v, h, z, A, B in zip(mus, gs, ms, vs, hs, zs, As, Bs):
        _reparam_step_math(mu, g, m, v, h, z * _flip_sum(A, B), hp)


def _sample_many(mus, hs, es, hp):
    return [_sample_math(mu, h, e, hp) for mu, h, e in zip(mus, hs, es)]


def _sample_inplace_many(mus, hs, es, hp):
    for mu, h, e in zip(mus, hs, es):  # θ written over the unit noise (one buffer for both)
        e.copy_(_sample_math(mu, h, e, hp))


def _reparam_step_many(mus, gs, ms, vs, hs, es, hp):
    for args in zip(mus, gs, ms, vs, hs, es):
        _reparam_step_math(*args, hp)


def _reparam_step_theta_many(mus, gs, ms, vs, hs, ths, hp):
    for args in zip(mus, gs, ms, vs, hs, ths):
        _reparam_step_theta_math(*args, hp)


def _given_step_many(mus, gs, ms, vs, hs, hhats, hp):
    for args in zip(mus, gs, ms, vs, hs, hhats):
        _given_step_math(*args, hp)


def _given_step_theta_many(mus, gs, ms, vs, hs, hhats, ths, hp):
    for args in zip(mus, gs, ms, vs, hs, hhats, ths):
        _given_step_theta_math(*args, hp)


_MATH = {
    "sample": _sample_many,
    "sample_inplace": _sample_inplace_many,
    "flipout_sample": _flipout_sample_many,
    "reparam_step": _reparam_step_many,
    "reparam_step_theta": _reparam_step_theta_many,
    "reparam_step_flipout": _reparam_step_flipout_many,
    "given_step": _given_step_many,
    "given_step_theta": _given_step_theta_many,
}


def kernel(name: str):
    """The compiled kernel ``name`` (a key of ``_MATH``) over lists of 1-D tensors (2-D for the
    flipout ones), compiled on first use: one call for up to ``CHUNK_ABOVE`` tensors, else one per
    chunk of ``CHUNK``. Its list arguments are parallel (one entry per parameter), the others are
    passed to every call."""
    if name in _BROKEN:
        raise RuntimeError(f"compilation of the fused kernel {name!r} failed earlier")
    if name not in _CACHE:
        compiled = torch.compile(_MATH[name], dynamic=True, fullgraph=True)

        def call(*args, compiled=compiled):
            if name in _COMPILED:
                return _chunked(name, compiled, args)
            with _in_process_compile():  # the first call compiles
                out = _chunked(name, compiled, args)
            _COMPILED.add(name)
            return out

        _CACHE[name] = call
    return _CACHE[name]


_COMPILED: set[str] = set()  # kernels called (so compiled) once already


def _config_patch(module: str, **values):
    """``module.patch(**values)`` for one of torch's private config modules, or a null context when
    this torch lacks the module or a setting (another version: then things run as usual)."""
    try:
        config = importlib.import_module(module)
    except ImportError:  # pragma: no cover (a torch without it)
        return contextlib.nullcontext()
    if not hasattr(config, "patch") or not all(hasattr(config, k) for k in values):
        return contextlib.nullcontext()
    return config.patch(**values)


def _in_process_compile():
    """Compile in this process, without inductor's pool of compile workers: starting the pool
    costs ~0.9 s of the first step on a 2-core machine even when every kernel comes from the
    inductor cache, and the two small kernels gain nothing from it with an empty cache (first step
    of the 784-512-256-10 MLP, 2 threads: 3.8 against 4.7 s warm, 14.6 against 15.3 s cold). Only
    around the first call: the user's own torch.compile keeps the global setting."""
    return _config_patch("torch._inductor.config", compile_threads=1)


def _sizes_apart():
    """Trace without duck shaping: tensors that happen to have equal sizes in one chunk get
    separate size symbols, so the next chunk (other equalities, e.g. a ResNet's 64- and 128-wide
    BatchNorm vectors) reuses the graph instead of recompiling it. A private switch of
    torch.fx; without it (another torch version) tracing is as usual."""
    return _config_patch("torch.fx.experimental._config", use_duck_shape=False)


def _alias(t: torch.Tensor) -> torch.Tensor:
    """``t`` (same storage, sizes, strides, offset and version counter) as a tensor that is not a
    view: ``detach`` drops the view's base. The kernels get flattened views of parameters and
    state; a view makes torch.compile guard on its base's shape (the 4-D convolution weight behind
    a 1-D view, a 1×1 kernel's unit dimensions), and a chunk of other bases recompiles. Aliases
    look alike to the guards: one graph for all chunks."""
    return t.detach()


def _chunked(name: str, compiled, args):
    lengths = {len(a) for a in args if isinstance(a, (list, tuple))}
    if len(lengths) > 1:  # chunks of unequal lists would pair the wrong tensors
        raise ValueError(f"the list arguments of {name!r} differ in length: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    if n <= CHUNK_ABOVE:  # one call, one graph
        return compiled(*args)
    args = [[_alias(t) for t in a] if isinstance(a, (list, tuple)) else a for a in args]
    out, fn = [], compiled
    for start in range(0, n, CHUNK):
        part = [a[start : start + CHUNK] if isinstance(a, (list, tuple)) else a for a in args]
        try:
            with _sizes_apart():
                res = fn(*part)
        except Exception as err:
            if start == 0:  # nothing has been written yet: the caller falls back to its eager path
                raise
            # earlier chunks are updated in place already: finish this step with the same math
            # eagerly (never run a chunk twice), and fail fast from now on so the caller goes eager
            warnings.warn(f"BayesAdam: torch.compile failed on a later chunk of {name!r} "
                          f"({type(err).__name__}: {str(err)[:200]}); finishing eagerly",
                          RuntimeWarning, stacklevel=outside_stacklevel())  # fmt: skip
            _BROKEN.add(name)
            fn = _MATH[name]
            res = fn(*part)
        if res is not None:
            out.extend(res)
    return out or None


def user_dispatch_mode() -> bool:
    """Whether a Python dispatch mode other than torch's own is active (torch.compile does not run
    under one; the optimizer then runs the uncompiled math for that call)."""
    try:
        from torch.utils._python_dispatch import is_in_torch_dispatch_mode
    except ImportError:  # pragma: no cover (a torch without it)
        return False
    return is_in_torch_dispatch_mode(include_infra_modes=False)


def eager(name: str):
    """The same math without compilation (the reference the fused path is tested against)."""
    return _MATH[name]
