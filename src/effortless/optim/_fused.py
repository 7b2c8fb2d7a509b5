"""Fused (``torch.compile``d) kernels for the hot paths of BayesAdam: drawing θ, the
reparameterisation step and the step with a model-side curvature estimate (``train_step`` with
``ggn``, ``ggn-mc``, ``efisher``, ``kfac``), the steps also updating the averaged mean. Each is one
pass over memory instead of ~4, ~18 and ~12 eager passes.

The math is the same as the eager kernel in :mod:`effortless.optim.bayesadam` (tested equal to
float64 round-off); hyperparameters travel as a tensor so that changing the learning rate or the
bias corrections does not recompile, unbound into scalars at the top of each kernel (calls traced by
dynamo for the sampling and step kernels: 343 against 378 with slices). Tensors (contiguous:
BayesAdam fuses only those) are passed as they are, or flattened to 1-D for chunked calls, and
compiled with dynamic shapes. The kernels take lists of tensors and loop over them inside one
compiled graph, which costs one call per step but a compilation that grows with the list (ResNet-18,
62 tensors: 46 s cold, 7.7 s with a warm inductor cache). Lists longer than ``CHUNK_ABOVE`` are
therefore cut into chunks of ``CHUNK`` tensors, passed as storage aliases rather than views and
traced without duck shaping, so that the chunks look alike to torch.compile's guards: one
compilation serves every full chunk and one more the remainder, whatever the model's depth
(ResNet-18: 17 s cold, 4.1 s warm; ``benchmarks/compile_time.py``). If compilation fails (no C++
compiler, unsupported platform) the optimizer warns once and stays eager.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
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
    return mu + hp[0] * e / torch.sqrt(h.to(mu.dtype) * hp[1] + hp[2])


def round_stochastic(x, u, old):
    """``x`` (float32) dithered by ``(u − ½)`` of the bf16 spacing at ``old`` (the bf16 value it
    replaces, in float32), for a store into a bf16 tensor (which rounds to nearest): over ``u``
    uniform in [0, 1) the stored value is ``x`` in expectation wherever ``x`` and ``old`` share a
    binade (a running average moves by ~0.1 % a step, so nearly everywhere). A running average kept
    in bf16 and updated by round-to-nearest stalls: with weight 0.001 on the new term a step moves
    it by less than half a bf16 spacing (2⁻⁹ of its value) whenever the new term is within about
    twice its value, so it can never decrease. The spacing is one round trip through bf16 (kept by
    torch.compile under ``emulate_precision_casts``, which the kernels compile with). A value equal
    to ``old`` is stored as it is (a dither of −½ spacing would be a tie, rounded to even)."""
    spacing = bf16_spacing(old)
    return torch.where(x == old, x, x + (u - 0.5) * spacing)  # (a value left alone stays put)


def bf16_spacing(old):
    """The bf16 spacing just above |``old``| (float32, positive): one round trip through bf16."""
    return (old * (1.0 + 0.75 * 2.0**-7)).to(torch.bfloat16).to(old.dtype) - old


def _store(dst, value, u=None, old=None, floor=None):
    # dst ← value, in dst's dtype: round to nearest, or stochastically (u given) into bf16 state,
    # old = dst's value before, in value's dtype; floor: a lower bound for the rounded value
    if u is not None and dst.dtype != value.dtype:
        value = round_stochastic(value, u, old)
        if floor is not None:
            value = torch.clamp(value, min=floor)
    dst.copy_(value)


# The signed curvature of the reparam update may be negative as long as N·h + δ > 0 (IVON's update
# keeps that exactly); rounding h into bf16 near h = −δ/N could break it (σ NaN): bf16 state is kept
# at h ≥ −FLOOR · δ/N. (Written as a literal in the kernel: torch.compile traces a module-level float
# as a symbolic input, then specialises it and restarts the trace, ~3 s at every process start.)
FLOOR = 0.97


def _adam_mean_math(mu, g, m, v, hp, u_v=None):
    # Adam on the per-sample negative log joint (the prior's pull wd · μ added to the gradient)
    # hp = [wd, 1−β₁, β₂, 1−β₂, √bc₂, eps, −lr/bc₁]; m and v may be bf16 (computed in μ's dtype)
    m32, v32 = m.to(mu.dtype), v.to(mu.dtype)
    g_tot = g + hp[0] * mu
    m_new = m32 + hp[1] * (g_tot - m32)
    v_new = hp[2] * v32 + hp[3] * (g_tot * g_tot)
    mu.copy_(mu + hp[6] * m_new / (torch.sqrt(v_new) / hp[4] + hp[5]))
    _store(m, m_new)  # (β₁ = 0.9 moves m by 10 % of the gap: round to nearest keeps it moving)
    _store(v, v_new, u_v, v32)


# Every step kernel's hp ends with (u_v, u_h): the dither of the stochastic rounding of v and h
# into bf16 state (unused with float32 state).


def _reparam_step_math(mu, g, m, v, h, e, hp):
    # hp = [sign, N/T, δ/T, 1−β, riemann, wd, 1−β₁, β₂, 1−β₂, √bc₂, eps, −lr/bc₁, u_v, u_h]
    h32 = h.to(mu.dtype)
    inv_sigma = torch.sqrt(h32 * hp[1] + hp[2])
    d = h32 - hp[0] * (g * e * inv_sigma)
    q = d / inv_sigma
    h_new = h32 - hp[3] * d + hp[4] * (q * q)
    _adam_mean_math(mu, g, m, v, hp[5:12], hp[12])
    _store(h, h_new, hp[13], h32, hp[2] / hp[1] * -0.97)  # (FLOOR: a literal, see below)


def _reparam_step_theta_math(mu, g, m, v, h, th, hp):
    # the sample θ sits in the noise buffer: sign · ε = (θ − μ)/σ from the old μ and h, used (with
    # hp[0] = 1) and left in the buffer for an antithetic mirror
    e = (th - mu) * torch.sqrt(h.to(mu.dtype) * hp[1] + hp[2])
    _reparam_step_math(mu, g, m, v, h, e, hp)
    th.copy_(e)


def _given_step_math(mu, g, m, v, h, hhat, hp):
    # a model-side estimate ĥ (non-negative keys): h ← lerp(h, ĥ, 1−β), then Adam on μ
    # hp = [N/T, δ/T, 1−β, wd, 1−β₁, β₂, 1−β₂, √bc₂, eps, −lr/bc₁, u_v, u_h]
    h32 = h.to(mu.dtype)
    h_new = torch.lerp(h32, hhat, hp[2])
    _adam_mean_math(mu, g, m, v, hp[3:10], hp[10])
    _store(h, h_new, hp[11], h32)


def _given_step_theta_math(mu, g, m, v, h, hhat, th, hp):
    # the sample θ sits in the noise buffer: it becomes sign · ε = (θ − μ)/σ (old μ and h), kept
    # for an antithetic mirror, in the same pass as the update
    th.copy_((th - mu) * torch.sqrt(h.to(mu.dtype) * hp[0] + hp[1]))
    _given_step_math(mu, g, m, v, h, hhat, hp)


def _flip_sum(A, B):
    # Σ_q a_q b_qᵀ for A (R, rows, 1) and B (R, 1, cols), the sum over ranks unrolled
    s = A[0] * B[0]
    for q in range(1, A.shape[0]):
        s = s + A[q] * B[q]
    return s


def _flipout_sample_many(mus, hs, zs, As, Bs, owns, hp, rank):
    hp = hp.unbind(0)
    # 2-D views (rows, cols) of each tensor; A (R, rows, 1) and B (R, 1, cols) hold the ranks'
    # sign factors: rank r's sample μ + sign · σ ⊙ ζ ⊙ a_r b_rᵀ goes into ``own``
    for mu, h, z, A, B, own in zip(mus, hs, zs, As, Bs, owns):
        own.copy_(mu + hp[0] * (z * A[rank] * B[rank]) / torch.sqrt(h.to(mu.dtype) * hp[1] + hp[2]))


def _reparam_step_flipout_many(mus, gs, ms, vs, hs, zs, As, Bs, hp):
    hp = hp.unbind(0)
    # the reparam step on 2-D views with the noise Σ_q ε_q = ζ ⊙ Σ_q a_q b_qᵀ formed on the fly
    for mu, g, m, v, h, z, A, B in zip(mus, gs, ms, vs, hs, zs, As, Bs):
        _reparam_step_math(mu, g, m, v, h, z * _flip_sum(A, B), hp)


def _sample_many(mus, hs, es, hp):
    hp = hp.unbind(0)
    return [_sample_math(mu, h, e, hp) for mu, h, e in zip(mus, hs, es)]


def _sample_inplace_many(mus, hs, es, hp):
    hp = hp.unbind(0)
    for mu, h, e in zip(mus, hs, es):  # θ written over the unit noise (one buffer for both)
        e.copy_(_sample_math(mu, h, e, hp))


def _lerp_average(mu, avg, aw):
    # the averaged mean after μ's update: μ̄ ← lerp(μ̄, μ, w), aw = (w,) (as torch.lerp_: exact at w = 1)
    avg.copy_(torch.lerp(avg, mu, aw[0]))


def _reparam_step_avg_many(mus, gs, ms, vs, hs, es, avgs, hp, aw):
    hp, aw = hp.unbind(0), aw.unbind(0)
    for mu, g, m, v, h, e, avg in zip(mus, gs, ms, vs, hs, es, avgs):
        _reparam_step_math(mu, g, m, v, h, e, hp)
        _lerp_average(mu, avg, aw)


def _reparam_step_theta_avg_many(mus, gs, ms, vs, hs, ths, avgs, hp, aw):
    hp, aw = hp.unbind(0), aw.unbind(0)
    for mu, g, m, v, h, th, avg in zip(mus, gs, ms, vs, hs, ths, avgs):
        _reparam_step_theta_math(mu, g, m, v, h, th, hp)
        _lerp_average(mu, avg, aw)


def _given_step_avg_many(mus, gs, ms, vs, hs, hhats, avgs, hp, aw):
    hp, aw = hp.unbind(0), aw.unbind(0)
    for mu, g, m, v, h, hhat, avg in zip(mus, gs, ms, vs, hs, hhats, avgs):
        _given_step_math(mu, g, m, v, h, hhat, hp)
        _lerp_average(mu, avg, aw)


def _given_step_theta_avg_many(mus, gs, ms, vs, hs, hhats, ths, avgs, hp, aw):
    hp, aw = hp.unbind(0), aw.unbind(0)
    for mu, g, m, v, h, hhat, th, avg in zip(mus, gs, ms, vs, hs, hhats, ths, avgs):
        _given_step_theta_math(mu, g, m, v, h, hhat, th, hp)
        _lerp_average(mu, avg, aw)


def _reparam_step_many(mus, gs, ms, vs, hs, es, hp):
    hp = hp.unbind(0)
    for args in zip(mus, gs, ms, vs, hs, es):
        _reparam_step_math(*args, hp)


def _reparam_step_theta_many(mus, gs, ms, vs, hs, ths, hp):
    hp = hp.unbind(0)
    for args in zip(mus, gs, ms, vs, hs, ths):
        _reparam_step_theta_math(*args, hp)


def _given_step_many(mus, gs, ms, vs, hs, hhats, hp):
    hp = hp.unbind(0)
    for args in zip(mus, gs, ms, vs, hs, hhats):
        _given_step_math(*args, hp)


def _given_step_theta_many(mus, gs, ms, vs, hs, hhats, ths, hp):
    hp = hp.unbind(0)
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
    # the same, and the averaged mean (``averaging``) updated in the same pass
    "reparam_step_avg": _reparam_step_avg_many,
    "reparam_step_theta_avg": _reparam_step_theta_avg_many,
    "given_step_avg": _given_step_avg_many,
    "given_step_theta_avg": _given_step_theta_avg_many,
}


def kernel(name: str):
    """The compiled kernel ``name`` (a key of ``_MATH``) over lists of 1-D tensors (2-D for the
    flipout ones), compiled on first use: one call for up to ``CHUNK_ABOVE`` tensors, else one per
    chunk of ``CHUNK``. Its list arguments are parallel (one entry per parameter), the others are
    passed to every call.

    Each variant (state dtypes, number of tensors) is compiled from a copy of the kernel's code:
    torch._dynamo counts recompilations per code object and, past its ``recompile_limit`` (8),
    fails a ``fullgraph`` compilation, so one shared code object made the optimizer of the ninth
    model depth in a process (a sweep, a notebook) give up its fused kernels."""
    if name in _BROKEN:
        raise RuntimeError(f"compilation of the fused kernel {name!r} failed earlier")
    if name not in _CACHE:

        def call(*args):
            key = (name, _dtypes(args), _length(args))
            compiled = _VARIANTS.get(key)
            if compiled is not None:
                return _chunked(name, compiled, args)
            lowp = any(d in _LOWP for d in key[1])
            # (bf16 state: the setting its rounding needs travels with the compiled function, so a
            # recompilation — after torch._dynamo.reset(), a change of thread count — keeps it)
            compiled = torch.compile(_code_copy(_MATH[name]), dynamic=True, fullgraph=True,
                                     options=dict(LOWP_OPTIONS) if lowp else None)  # fmt: skip
            for a in args:  # hp (and the averaging's weight): fixed sizes, which the kernels unbind
                if isinstance(a, torch.Tensor):
                    torch._dynamo.mark_static(a)
            with _compile_settings(lowp=lowp):
                out = _chunked(name, compiled, args)
            _VARIANTS[key] = compiled
            return out

        _CACHE[name] = call
    return _CACHE[name]


# (kernel, dtypes, length) -> its compiled copy, called (so compiled) once already
_VARIANTS: dict[tuple, object] = {}


def _length(args) -> int | tuple:
    """The variant's number of tensors: the list length for one call; lists cut into chunks share
    a variant per remainder (one graph for the full chunks, one for the last)."""
    n = max((len(a) for a in args if type(a) is list), default=0)
    return n if n <= CHUNK_ABOVE else ("chunks", n % CHUNK)


def _code_copy(fn):
    """``fn`` with a code object of its own (torch.compile keeps its compilations, and counts
    them against the recompile limit, per code object)."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


_LOWP = (torch.bfloat16, torch.float16)
# inductor settings compiled into every bf16-state kernel (see :func:`_compile_settings`); passed as
# torch.compile's ``options``, not only patched around the first call: dynamo recompiles a kernel
# when a guard fails (another thread count) or after torch._dynamo.reset(), outside that patch, and
# without the setting the stochastic rounding's dither came off the bf16 grid
LOWP_OPTIONS = {"emulate_precision_casts": True}


def _dtypes(args) -> tuple:
    # (the lists hold one dtype each: the optimizer keeps its state in one dtype)
    return tuple(a[0].dtype for a in args if type(a) is list and a)


@contextlib.contextmanager
def _compile_settings(lowp: bool):
    """The settings the kernels compile under (see :func:`_in_process_compile`); with bf16 state,
    also inductor's ``emulate_precision_casts`` (keeps the explicit round trips through bf16 that
    the stochastic rounding's spacing is made of: without it inductor drops them and the dither
    no longer matches the grid) and :func:`_lowp_lanes`."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_in_process_compile())
        if lowp:
            stack.enter_context(_config_patch("torch._inductor.config", emulate_precision_casts=True))
            stack.enter_context(_lowp_lanes())
        yield


@functools.cache
def lowp_state_supported(device_type: str = "cpu") -> bool:
    """Whether this torch's compiled code on ``device_type`` keeps the explicit round trips through
    bf16 that the stochastic rounding's spacing is made of (:func:`bf16_spacing`), under the
    settings :func:`_compile_settings` gives bf16 kernels; else bf16 state runs eagerly. Checked by
    compiling the spacing once per process and device type and comparing it with eager code:
    having inductor's ``emulate_precision_casts`` is not enough (torch 2.6 has it and still drops
    the round trip; every compiled spacing differed, so the rounding's dither was off the grid)."""
    try:
        import torch._inductor.config as config
    except ImportError:  # pragma: no cover
        return False
    if not hasattr(config, "emulate_precision_casts"):
        return False
    grid = torch.tensor([1e-8, 3e-7, 1.7e-3, 0.1, 0.3, 1.0, 1.01, 1.9, 7.5, 1e3, 3.3e5],
                        device=device_type)  # fmt: skip

    # a copy of the code: torch.compile keeps what it compiled per code object, whatever the settings
    spacing = _code_copy(bf16_spacing)
    try:
        with _compile_settings(lowp=True):
            got = torch.compile(spacing, dynamic=False, fullgraph=True, options=dict(LOWP_OPTIONS))(grid)
    except Exception:  # a torch that cannot compile here: the eager path
        return False
    return torch.equal(got, bf16_spacing(grid))


@contextlib.contextmanager
def _lowp_lanes():
    """Vectorise a kernel that mixes bf16 and float32 tensors at bf16's width (16 lanes with AVX2)
    instead of float32's. Inductor's C++ backend picks the low-precision width only when every
    node of a fused kernel touches a bf16 value, and a step kernel always has nodes that touch only
    float32 ones (the copies back into μ and the sample); at 8 lanes each bf16 load and store goes
    through a partial-vector copy, and the MLP's step kernel took 0.84 against 0.49 ms for float32
    state, at 16 lanes 0.56 ms (``benchmarks/bf16_state_probe.py --kernels``). Changes only the
    tiling choice, never the arithmetic; a torch without these private hooks compiles as usual."""
    try:
        from torch._inductor.codegen import cpp
    except ImportError:  # pragma: no cover
        yield
        return
    select = getattr(getattr(cpp, "TilingSelect", None), "select_tiling", None)
    if select is None or not hasattr(cpp, "get_loop_body_lowp_fp") or not hasattr(cpp, "_get_loop_body"):
        yield
        return
    real = cpp.get_loop_body_lowp_fp

    def select_tiling(self, fn_list, var_sizes_list):
        try:
            kinds = {real(b)[0] for b in cpp._get_loop_body(fn_list)} - {None}
        except Exception:  # pragma: no cover (another torch's internals)
            kinds = set()
        if len(kinds) != 1:
            return select(self, fn_list, var_sizes_list)
        lowp = kinds.pop()
        cpp.get_loop_body_lowp_fp = lambda body: (lowp, True) if real(body)[0] is None else real(body)
        try:
            return select(self, fn_list, var_sizes_list)
        finally:
            cpp.get_loop_body_lowp_fp = real

    cpp.TilingSelect.select_tiling = select_tiling
    try:
        yield
    finally:
        cpp.TilingSelect.select_tiling = select


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
    try:
        return is_in_torch_dispatch_mode(include_infra_modes=False)
    except TypeError:  # torch 2.4 has no such argument: every active mode counts as the user's
        return is_in_torch_dispatch_mode()


def eager(name: str):
    """The same math without compilation (the reference the fused path is tested against)."""
    return _MATH[name]
