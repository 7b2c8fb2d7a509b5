"""The fast curvature engine: per-sample quantities from module inputs and output gradients.

One forward pass with hooks saves, for every *supported* module (Linear, Conv1d/2d, BatchNorm in
eval mode, LayerNorm, Embedding) its input ``a`` and output ``z``. Gradients of the network
output's loss with respect to the ``z`` are then taken with ``torch.autograd.grad`` — for K cotangents at once
(``is_grads_batched``), e.g. the K = C columns ``√p_c (e_c − p)`` of the softmax output-Hessian
factor for the exact GGN, one sampled label for the Monte-Carlo GGN, the true label for the
empirical Fisher. Layer rules (below, one per module type) turn ``(a, δ)`` into the quantity:

* ``sq``: ``Σ_k Σ_b (per-sample gradient)²`` — the diagonal of ``Σ_k Σ_b g_kb g_kbᵀ``, i.e. the
  diagonal GGN / empirical Fisher. For a Linear layer without extra dimensions this is
  ``(Σ_k δ_k²)ᵀ a²``: the classes are summed *before* the outer product, so memory is
  O(K·B·width), never O(B·C·P).
* ``kfac``: Kronecker factors ``A = mean_{b,l} ā āᵀ`` (input, or conv patch at position l, with a
  ones column for the bias) and ``G = Σ_k Σ_b Σ_l δ δᵀ``, so that ``G ⊗ A`` approximates the
  batch-summed GGN block of the layer (exact for one sample at one position).

Modules without trainable parameters (activations, pooling, dropout in eval, reshapes, parameter-
free normalisation) need no rule: autograd carries ``δ`` through them. Any trainable parameter
outside a supported module, a module that runs twice in one forward (weight sharing), or a
BatchNorm in training mode sends the computation to the generic ``torch.func`` path
(:mod:`effortless.curvature.functional`); :func:`plan` tells which path a model gets and why.

Layer math follows the derivations in BackPACK (Dangel et al., 2020) and KFAC (Martens & Grosse,
2015); the code is this project's own.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

__all__ = ["plan", "Plan", "capture", "RULES", "Unsupported"]


class Unsupported(RuntimeError):
    """Raised inside the engine when the model cannot use the hook path (caught by callers)."""


# -- layer rules --------------------------------------------------------------------------------


def _square_sum(delta: torch.Tensor) -> torch.Tensor:
    """``Σ_k δ_k²`` over the first dimension, accumulated in place: no K-times-larger temporary
    (at K = 10 classes that is a fresh megabyte-sized allocation per layer and step, whose page
    faults cost more than the arithmetic on CPU)."""
    out = delta[0].square()
    for k in range(1, delta.shape[0]):
        out.addcmul_(delta[k], delta[k])
    return out


# Products with fewer multiply-adds than this stay in their inputs' dtype when a lower product
# dtype is asked for: there the casts cost more than the faster product saves (784-w-w-10 MLP,
# w = 1…32: bf16 everywhere made efisher+grad 1.73–2.08× a fwd+bwd against 1.65–1.81×).
LOWP_MIN_MACS = 2**20


def _lowp(dtype, macs: int):
    return dtype if dtype is not None and macs >= LOWP_MIN_MACS else None


def _in(t: torch.Tensor, dtype) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def _mm(a: torch.Tensor, b: torch.Tensor, dtype=None) -> torch.Tensor:
    """``a @ b`` with both operands rounded to ``dtype`` (the product's precision; None, or a
    product smaller than ``LOWP_MIN_MACS``: as they are), returned in ``a``'s dtype. bf16 products
    run 3–4× faster than float32 on CPUs with AVX512-BF16/AMX and on GPUs; with non-negative
    operands (squares) every entry keeps a relative error below three bf16 roundings (≈ 1.2 %)."""
    dtype = _lowp(dtype, a.shape[0] * a.shape[1] * b.shape[-1])
    if dtype is None or dtype == a.dtype:
        return a @ b
    return (a.to(dtype) @ b.to(dtype)).to(a.dtype)


GRAM_BLOCK = 96  # columns per block row of the triangular Gram product (half that for tall operands)


def _gram(a: torch.Tensor, dtype=None) -> torch.Tensor:
    """``aᵀa`` for ``a`` (rows, n), with operands rounded to ``dtype`` as in :func:`_mm`.

    A Kronecker factor is symmetric, so on CPU a large one is computed block row by block row, the
    blocks on and above the diagonal only (about half the multiply-adds), and mirrored below.
    Measured on one thread (float32, ``benchmarks/kfac_gram.py`` has the end-to-end numbers):
    785 columns × 128 rows (the MNIST MLP's first layer) 1.43 → 1.09 ms, 577 × 6,272 (conv
    patches) 38.5 → 25.1 ms, 151 × 6,272 3.3 → 2.3 ms; at 257 × 128 the smaller GEMMs cost what
    they save, so products below the thresholds stay one GEMM, as do bf16 products with few rows
    (785 × 128: 0.41 ms as one, 0.52 ms blocked; 577 × 6,272: 12.2 → 7.3 ms blocked). (Not used on
    GPUs: unmeasured.)"""
    rows, n = a.shape
    dt = _lowp(dtype, rows * n * n)
    x = a if dt is None or dt == a.dtype else a.to(dt)
    tall = rows >= 8 * GRAM_BLOCK
    k = n // (GRAM_BLOCK // 2 if tall else GRAM_BLOCK)
    wide = n >= 4 * GRAM_BLOCK and x.dtype == a.dtype  # (short bf16 blocks: slower than one GEMM)
    if a.device.type != "cpu" or k < 2 or not (tall or wide):
        return (x.T @ x).to(a.dtype)
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    edges = [round(i * n / k) for i in range(k + 1)]
    for s, e in zip(edges[:-1], edges[1:]):
        torch.mm(x[:, s:e].T, x[:, s:], out=out[s:e, s:])  # (a row-major view: BLAS writes it in place)
    for s, e in zip(edges[1:-1], edges[2:]):
        out[s:e, :s].copy_(out[:s, s:e].T)
    return out.to(a.dtype)


def _linear_sq(m: nn.Linear, a, delta, dtype=None):
    # a: (B, *, in); delta: (K, B, *, out)
    if a.dim() == 2:  # (B, out): classes summed before the outer product
        d2 = _square_sum(delta)
        dt = _lowp(dtype, d2.numel() * a.shape[1])
        if dt is None or dt == a.dtype:
            w = d2.T @ a.square()
        else:  # the squares rounded once, straight into dt (no float32 temporary)
            w = (d2.to(dt).T @ torch.mul(a, a, out=a.new_empty(a.shape, dtype=dt))).to(a.dtype)
        out = {"weight": w}
        if m.bias is not None:
            out["bias"] = d2.sum(0)
        return out
    a3 = a.reshape(a.shape[0], -1, a.shape[-1])  # (B, T, in)
    d4 = delta.reshape(delta.shape[0], delta.shape[1], -1, delta.shape[-1])  # (K, B, T, out)
    dt = _lowp(dtype, d4.numel() * a3.shape[-1])
    g = torch.einsum("kbto,bti->kboi", _in(d4, dt), _in(a3, dt)).to(a.dtype)
    out = {"weight": g.pow(2).sum((0, 1))}
    if m.bias is not None:
        out["bias"] = d4.sum(2).pow(2).sum((0, 1))
    return out


def _unfold(m, a):
    """Conv input patches (B, I·k, L) for Conv1d/Conv2d: the input padded as the layer pads it
    (any ``padding_mode``, ``padding="same"``/``"valid"``), then unfolded without padding."""
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        pads = m._reversed_padding_repeated_twice  # (what the layer's own forward pads with)
        if any(pads):
            a = F.pad(a, pads, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        padding = (0,) * len(m.kernel_size)
    else:
        padding = m.padding
    if isinstance(m, nn.Conv1d):
        a = a.unsqueeze(2)
        ks, st, pad, dil = (1, *m.kernel_size), (1, *m.stride), (0, *padding), (1, *m.dilation)
    else:
        ks, st, pad, dil = m.kernel_size, m.stride, padding, m.dilation
    return F.unfold(a, ks, dilation=dil, padding=pad, stride=st)


def _conv_per_sample(m, a, delta, dtype=None):
    """Per-sample weight gradients (K, B, O, I/groups·k) and output gradients (K, B, O, L). With
    groups, output channel o only sees its group's input channels: one product per group."""
    patches = _unfold(m, a)  # (B, I·k, L)
    d = delta.reshape(delta.shape[0], delta.shape[1], delta.shape[2], -1)  # (K, B, O, L)
    dt = _lowp(dtype, d.numel() * patches.shape[1] // m.groups)
    if m.groups == 1:
        g = torch.einsum("kbol,bil->kboi", _in(d, dt), _in(patches, dt))
    else:
        G = m.groups
        pg = patches.view(patches.shape[0], G, -1, patches.shape[-1])  # (B, G, I/G·k, L)
        dg = d.view(d.shape[0], d.shape[1], G, -1, d.shape[-1])  # (K, B, G, O/G, L)
        g = torch.einsum("kbgol,bgil->kbgoi", _in(dg, dt), _in(pg, dt)).flatten(2, 3)
    return g.to(a.dtype), d


# Per-sample gradient elements the convolution rules hold at once (K × samples × the layer's
# weights): the sums of squares are accumulated over slices of the batch, so a pass over many
# inputs does not materialise K·B·P numbers at once.
SQ_SLICE_NUMEL = 2**24


def _sliced_sq(per_sample, m, a, delta, dtype=None):
    """Σ_k Σ_b g², the per-sample gradients g from ``per_sample`` over slices of the batch."""
    k, b = delta.shape[:2]
    step = max(1, SQ_SLICE_NUMEL // max(1, k * m.weight.numel()))
    out = {}
    for s in range(0, b, step):
        g, d = per_sample(m, a[s : s + step], delta[:, s : s + step], dtype)
        part = {"weight": g.pow(2).sum((0, 1)).view_as(m.weight)}
        if m.bias is not None:
            part["bias"] = d.sum(3).pow(2).sum((0, 1))
        out = part if not out else {n: out[n].add_(t) for n, t in part.items()}
    return out


def _conv_sq(m, a, delta, dtype=None):
    return _sliced_sq(_conv_per_sample, m, a, delta, dtype)


def _channel_norm_sq(m, xhat, delta):
    """Σ_k Σ_b of the squared per-sample gradients of a per-channel affine (weight, bias) applied
    to ``xhat`` (B, C, *): BatchNorm, GroupNorm and InstanceNorm."""
    dims = tuple(range(3, delta.dim()))
    gw = (delta * xhat).sum(dims) if dims else delta * xhat  # (K, B, C)
    gb = delta.sum(dims) if dims else delta
    out = {}
    if m.weight is not None:
        out["weight"] = gw.pow(2).sum((0, 1))
    if m.bias is not None:
        out["bias"] = gb.pow(2).sum((0, 1))
    return out


def _tconv_per_sample(m, a, delta, dtype=None):  # (float32 products: the rule is for occasional layers)
    """ConvTranspose1d/2d: per-sample weight gradients (K, B, I, O·k) and output gradients
    (K, B, O, L'). The transposed convolution is the adjoint of the convolution with the same
    stride, padding and dilation, so input position l of sample b meets the output gradients in
    the patch that convolution would read at l: unfolding δ (with those settings) gives, per
    position, exactly the entries ``a[b, :, l]`` multiplies (``output_padding`` only adds rows that
    no weight reaches)."""
    k, b = delta.shape[:2]
    d = delta.reshape(k * b, *delta.shape[2:])  # (K·B, O, *spatial_out)
    if isinstance(m, nn.ConvTranspose1d):
        d, a = d.unsqueeze(2), a.unsqueeze(2)
        ks, st, pad, dil = (1, *m.kernel_size), (1, *m.stride), (0, *m.padding), (1, *m.dilation)
    else:
        ks, st, pad, dil = m.kernel_size, m.stride, m.padding, m.dilation
    patches = F.unfold(d, ks, dilation=dil, padding=pad, stride=st)  # (K·B, O·k, L_in)
    patches = patches.view(k, b, patches.shape[1], -1)
    g = torch.einsum("kbjl,bil->kbij", patches, a.flatten(2))  # (K, B, I, O·k)
    return g, delta.reshape(k, b, delta.shape[2], -1)


def _tconv_sq(m, a, delta, dtype=None):
    return _sliced_sq(_tconv_per_sample, m, a, delta)


def _bn_xhat(m, a):
    shape = (1, -1) + (1,) * (a.dim() - 2)
    return (a - m.running_mean.view(shape)) / torch.sqrt(m.running_var.view(shape) + m.eps)


def _bn_sq(m, a, delta, dtype=None):  # elementwise products: dtype is not used
    return _channel_norm_sq(m, _bn_xhat(m, a), delta)


def _gn_xhat(m: nn.GroupNorm, a):
    """GroupNorm's normalised input: each sample's channel groups by their own statistics (no
    coupling between samples)."""
    g = a.reshape(a.shape[0], m.num_groups, -1)
    xhat = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + m.eps)
    return xhat.view_as(a)


def _gn_sq(m, a, delta, dtype=None):  # elementwise products: dtype is not used
    return _channel_norm_sq(m, _gn_xhat(m, a), delta)


def _in_xhat(m: nn.modules.instancenorm._InstanceNorm, a):
    """InstanceNorm's normalised input: each sample's channels by their own statistics, or by the
    running ones in eval mode when it tracks them (as its forward does)."""
    if a.dim() != (3 if isinstance(m, nn.InstanceNorm1d) else 4):  # unbatched: the rules need the batch
        raise Unsupported(f"{type(m).__name__} called on an unbatched input")
    if m.track_running_stats and not m.training and m.running_mean is not None:
        return _bn_xhat(m, a)
    dims = tuple(range(2, a.dim()))
    return (a - a.mean(dims, keepdim=True)) / torch.sqrt(a.var(dims, unbiased=False, keepdim=True) + m.eps)


def _in_sq(m, a, delta, dtype=None):  # elementwise products: dtype is not used
    return _channel_norm_sq(m, _in_xhat(m, a), delta)


def _ln_xhat(m: nn.LayerNorm, a):
    dims = tuple(range(a.dim() - len(m.normalized_shape), a.dim()))
    return (a - a.mean(dims, keepdim=True)) / torch.sqrt(a.var(dims, unbiased=False, keepdim=True) + m.eps)


def _rms_xhat(m: nn.RMSNorm, a):
    """RMSNorm's normalised input: x / √(mean x² over the normalised dims + eps), eps defaulting to
    the dtype's machine epsilon (as ``F.rms_norm`` does)."""
    dims = tuple(range(a.dim() - len(m.normalized_shape), a.dim()))
    eps = m.eps if m.eps is not None else torch.finfo(a.dtype).eps
    return a * torch.rsqrt(a.pow(2).mean(dims, keepdim=True) + eps)


def _shape_norm_lead(m, a):
    return tuple(range(2, 2 + a.dim() - 1 - len(m.normalized_shape)))  # positions between B and shape


def _shape_norm_sq(m, xhat, lead, delta):
    """Σ_k Σ_b of the squared per-sample gradients of an elementwise affine over the normalised
    shape (LayerNorm, RMSNorm), summed over the positions ``lead`` between the batch and it."""
    out = {}
    if m.weight is not None:
        gw = (delta * xhat).sum(lead) if lead else delta * xhat  # (K, B, *normalized_shape)
        out["weight"] = gw.pow(2).sum((0, 1))
    if getattr(m, "bias", None) is not None:
        gb = delta.sum(lead) if lead else delta
        out["bias"] = gb.pow(2).sum((0, 1))
    return out


def _layernorm_sq(m: nn.LayerNorm, a, delta, dtype=None):  # elementwise: dtype is not used
    return _shape_norm_sq(m, _ln_xhat(m, a), _shape_norm_lead(m, a), delta)


def _rmsnorm_sq(m: nn.RMSNorm, a, delta, dtype=None):  # elementwise: dtype is not used
    return _shape_norm_sq(m, _rms_xhat(m, a), _shape_norm_lead(m, a), delta)


def _embedding_sq(m: nn.Embedding, idx, delta, dtype=None):  # scatter-adds: dtype is not used
    # per-sample gradient rows: Σ over a sample's positions holding the same index, then squared
    k, b = delta.shape[:2]
    dim = delta.shape[-1]
    flat_idx = idx.reshape(b, -1)  # (B, T)
    t = flat_idx.shape[1]
    sample = torch.arange(k * b, device=idx.device).repeat_interleave(t)  # (K·B·T,)
    key = sample * m.num_embeddings + flat_idx.repeat(k, 1).reshape(-1)
    uniq, inverse = torch.unique(key, return_inverse=True)
    seg = delta.new_zeros(uniq.shape[0], dim).index_add_(0, inverse, delta.reshape(-1, dim))
    out = delta.new_zeros(m.num_embeddings, dim).index_add_(0, uniq % m.num_embeddings, seg.pow(2))
    if m.padding_idx is not None:  # the padding row gets no gradient (it had the other rows' curvature)
        out[m.padding_idx] = 0
    return {"weight": out}


# -- per-sample gradients (K, B, *param shape), for output covariances -------------------------


def _linear_psg(m: nn.Linear, a, delta):
    a3 = a.reshape(a.shape[0], -1, a.shape[-1])  # (B, T, in)
    d4 = delta.reshape(delta.shape[0], delta.shape[1], -1, delta.shape[-1])  # (K, B, T, out)
    out = {"weight": torch.einsum("kbto,bti->kboi", d4, a3)}
    if m.bias is not None:
        out["bias"] = d4.sum(2)
    return out


def _linear_cov(m: nn.Linear, a, delta, var):
    """Σ_p var_p g_kp g_lp per sample without per-sample gradients (2-D inputs), else via them."""
    if a.dim() != 2:
        return None
    s = a.new_zeros(a.shape[0], delta.shape[-1])  # (B, out); either parameter may be frozen
    if "weight" in var:
        s = s + a.pow(2) @ var["weight"].T
    if m.bias is not None and "bias" in var:
        s = s + var["bias"]
    return torch.einsum("kbo,lbo,bo->bkl", delta, delta, s)


def _weight_psg(per_sample):
    """The per-sample gradients rule of a (transposed) convolution from its ``per_sample``."""

    def psg(m, a, delta):
        g, d = per_sample(m, a, delta)
        out = {"weight": g.reshape(*g.shape[:2], *m.weight.shape)}
        if m.bias is not None:
            out["bias"] = d.sum(3)
        return out

    return psg


_conv_psg = _weight_psg(_conv_per_sample)
_tconv_psg = _weight_psg(_tconv_per_sample)


def _norm_psg(xhat, delta, m, lead):
    out = {}
    if m.weight is not None:
        out["weight"] = (delta * xhat).sum(lead) if lead else delta * xhat
    if getattr(m, "bias", None) is not None:
        out["bias"] = delta.sum(lead) if lead else delta
    return out


def _bn_psg(m, a, delta):
    return _norm_psg(_bn_xhat(m, a), delta, m, tuple(range(3, delta.dim())))


def _gn_psg(m, a, delta):
    return _norm_psg(_gn_xhat(m, a), delta, m, tuple(range(3, delta.dim())))


def _in_psg(m, a, delta):
    return _norm_psg(_in_xhat(m, a), delta, m, tuple(range(3, delta.dim())))


def _layernorm_psg(m, a, delta):
    return _norm_psg(_ln_xhat(m, a), delta, m, _shape_norm_lead(m, a))


def _rmsnorm_psg(m, a, delta):
    return _norm_psg(_rms_xhat(m, a), delta, m, _shape_norm_lead(m, a))


def _linear_kfac(m: nn.Linear, a, delta):
    """KFAC rows: the (bias-augmented) inputs ā (n, in[+1]) and output gradients δ (K·n, out), so
    that A = āᵀā / n and G = δᵀδ."""
    a2 = a.reshape(-1, a.shape[-1])
    if m.bias is not None:
        a2 = torch.cat([a2, a2.new_ones(a2.shape[0], 1)], 1)
    return a2, delta.reshape(-1, delta.shape[-1])


def _conv_kfac(m, a, delta):
    if m.groups != 1:  # (its curvature is block-diagonal over groups: a pair (A, G) per group)
        raise Unsupported(f"no Kronecker factors for a grouped {type(m).__name__} (groups={m.groups})")
    patches = _unfold(m, a).transpose(1, 2).reshape(-1, m.weight[0].numel())  # (B·L, I·k)
    if m.bias is not None:
        patches = torch.cat([patches, patches.new_ones(patches.shape[0], 1)], 1)
    d = delta.reshape(delta.shape[0], delta.shape[1], delta.shape[2], -1)  # (K, B, O, L)
    return patches, d.permute(0, 1, 3, 2).reshape(-1, d.shape[2])


@dataclass(frozen=True)
class Rule:
    sq: object  # Σ_k Σ_b (per-sample gradient)²
    kfac: object | None = None  # the rows (ā, δ) of the Kronecker factors A = āᵀā / n, G = δᵀδ
    psg: object | None = None  # per-sample gradients (K, B, *shape)
    cov: object | None = None  # Σ_p var_p g_kp g_lp without per-sample gradients, or None


RULES: dict[type, Rule] = {
    nn.Linear: Rule(_linear_sq, _linear_kfac, _linear_psg, _linear_cov),
    nn.Conv1d: Rule(_conv_sq, _conv_kfac, _conv_psg),
    nn.Conv2d: Rule(_conv_sq, _conv_kfac, _conv_psg),
    nn.ConvTranspose1d: Rule(_tconv_sq, None, _tconv_psg),
    nn.ConvTranspose2d: Rule(_tconv_sq, None, _tconv_psg),
    nn.BatchNorm1d: Rule(_bn_sq, None, _bn_psg),
    nn.BatchNorm2d: Rule(_bn_sq, None, _bn_psg),
    nn.LayerNorm: Rule(_layernorm_sq, None, _layernorm_psg),
    nn.RMSNorm: Rule(_rmsnorm_sq, None, _rmsnorm_psg),
    nn.GroupNorm: Rule(_gn_sq, None, _gn_psg),
    nn.InstanceNorm1d: Rule(_in_sq, None, _in_psg),
    nn.InstanceNorm2d: Rule(_in_sq, None, _in_psg),
    nn.Embedding: Rule(_embedding_sq),
}


def _module_ok(m: nn.Module) -> str | None:
    """Why a module with trainable parameters cannot use its rule, or None."""
    rule = RULES.get(type(m))
    if rule is None:
        return f"no rule for {type(m).__name__}"
    if isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d) and m.groups != 1:
        return f"{type(m).__name__} with groups={m.groups}"
    if _couples(m):
        return "BatchNorm in training mode (couples the samples of a batch)"
    if isinstance(m, nn.Embedding) and m.max_norm is not None:  # (sparse=True: see functional.keep_buffers)
        return "Embedding with max_norm (renormalises its rows in place in the forward)"
    return None


def coupled_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose output for one sample depends on the other samples of the
    batch: BatchNorm normalising with batch statistics (training mode, or no running statistics).
    Per-sample curvature (GGN, MC-GGN, empirical Fisher, KFAC) is not defined through them."""
    return [n or type(m).__name__ for n, m in model.named_modules() if _couples(m)]


def freq_scaled_modules(model: nn.Module) -> list[str]:
    """Names of the embeddings whose backward scales each row's gradient by the inverse count of its
    index in the mini-batch (``scale_grad_by_freq=True``): a sample's gradient then depends on
    the rest of the batch, so per-sample gradients (and the GGN, empirical Fisher, KFAC built
    from them) are not defined."""
    kinds = (nn.Embedding, nn.EmbeddingBag)
    return [
        n or type(m).__name__
        for n, m in model.named_modules()
        if isinstance(m, kinds) and m.scale_grad_by_freq
    ]


def _couples(m: nn.Module) -> bool:
    """BatchNorm normalising with the batch's statistics."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)


# -- planning -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """Which path computes curvature for a model, and why."""

    backend: str  # "hooks" or "func"
    modules: dict[str, nn.Module] = field(default_factory=dict)  # module name -> module (hooks)
    params: dict[str, tuple[str, str]] = field(default_factory=dict)  # param name -> (module, attr)
    reasons: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        why = "; ".join(self.reasons) if self.reasons else "every trainable parameter has a layer rule"
        return f"{self.backend} ({why})"


def plan(model: nn.Module, params=None) -> Plan:
    """Decide the path: ``hooks`` if every selected trainable parameter sits in a supported
    module (and no parameter is shared), else ``func``. ``params``: parameter names to restrict to.
    """
    from .functional import trainable

    selected = trainable(model, params)
    owners: dict[int, str] = {}
    modules, pmap, reasons = {}, {}, []
    seen_ids: dict[int, str] = {}
    for mname, m in model.named_modules():
        for attr, p in m.named_parameters(recurse=False):
            full = f"{mname}.{attr}" if mname else attr
            if id(p) in seen_ids:
                reasons.append(f"parameter {seen_ids[id(p)]} is shared with {full}")
            seen_ids[id(p)] = full
            if full not in selected:
                continue
            why = _module_ok(m)
            if why:
                reasons.append(f"{full}: {why}")
                continue
            modules[mname] = m
            pmap[full] = (mname, attr)
            owners[id(p)] = mname
    backend = "func" if reasons else "hooks"
    return Plan(backend, modules if backend == "hooks" else {}, pmap if backend == "hooks" else {}, reasons)


# -- capture ------------------------------------------------------------------------------------


# Modules whose saved input or output the rest of the forward changes in place (ReLU(inplace=True)
# after a BatchNorm, `out += identity` in a residual block): module -> (copy the input, copy the
# output) at capture. Found by version counters on a first forward, kept for the module's lifetime.
_COPY: weakref.WeakKeyDictionary[nn.Module, tuple[bool, bool]] = weakref.WeakKeyDictionary()


class Saved(dict):
    """Module name -> (input, output) of one forward, with the tensors' version counters at capture
    time: :meth:`modified` names those changed in place since (their values are not the module's
    any more, and the gradient with respect to an output changed in place is the gradient at the
    later value — a ReLU(inplace=True) after BatchNorm dropped the ReLU's mask from it)."""

    def __init__(self):
        super().__init__()
        self.versions: dict[str, tuple] = {}

    def modified(self) -> dict[str, tuple[bool, bool]]:
        out = {}
        for name, (t_in, v_in, t_out, v_out) in self.versions.items():
            changed = (t_in is not None and t_in._version != v_in,
                       t_out is not None and t_out._version != v_out)  # fmt: skip
            if any(changed):
                out[name] = changed
        return out


def saved_numel(saved) -> int:
    """Numbers in the saved layer inputs and outputs (each output's gradient has as many per
    cotangent)."""
    return sum(t.numel() for io in saved.values() for t in io if torch.is_tensor(t))


def psg_numel(p: Plan) -> int:
    """Weights of the planned modules whose covariance rule builds per-sample gradients."""
    return sum(q.numel() for m in p.modules.values() if RULES[type(m)].cov is None
               for q in m.parameters(recurse=False))  # fmt: skip


@contextlib.contextmanager
def capture(p: Plan):
    """Forward hooks saving each planned module's input and output; raises Unsupported on reuse.
    Modules known to have their input or output changed in place later in the forward get copies
    (the output's copy goes on through the network, so gradients with respect to the saved output
    are the module's)."""
    saved = Saved()
    handles = []

    def hook(name):
        def fn(module, inputs, kwargs, output):
            if name in saved:
                raise Unsupported(f"module {name} ran twice in one forward (weight sharing)")
            if not inputs:  # called as fc(input=h): the input came as a keyword (IndexError before)
                if len(kwargs) != 1:
                    raise Unsupported(f"module {name} called with keyword arguments {sorted(kwargs)}")
                inputs = tuple(kwargs.values())
            copy_in, copy_out = _COPY.get(module, (False, False))
            a = inputs[0].detach()
            a = a.clone() if copy_in else a
            saved[name] = (a, output)
            if not isinstance(output, torch.Tensor):
                return None
            saved.versions[name] = (None if copy_in else inputs[0], inputs[0]._version,
                                    None if copy_out else output, output._version)  # fmt: skip
            return output.clone() if copy_out else None

        return fn

    try:
        for name, m in p.modules.items():
            # first in line: a user's forward hook that changes the output (o * 2) runs after it,
            # so the saved output is the layer's own and gradients flow through the user's change
            handles.append(m.register_forward_hook(hook(name), with_kwargs=True, prepend=True))
        yield saved
    finally:
        for h in handles:
            h.remove()


# model -> names of planned parameters its forward uses outside their module's own forward
# (F.linear(h, self.fc.weight), an output projection tied to an embedding's weight): found once per
# model on its first hooked forward.
_OUTSIDE: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()


class _Uses(TorchFunctionMode):
    """Records planned parameters passed to a torch function while their module is not running."""

    def __init__(self, owner: dict[int, tuple[str, nn.Module]], running: set[int]):
        super().__init__()
        self.owner, self.running, self.outside = owner, running, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            hit = self.owner.get(id(t)) if isinstance(t, torch.Tensor) else None
            if hit is not None and id(hit[1]) not in self.running:
                self.outside.add(hit[0])
        return func(*args, **kwargs)


def _watched(model: nn.Module, run):
    """``run()`` while watching where the planned parameters are used: ``(f, names used outside
    their module's forward)``."""
    # every parameter of every module with a rule, whichever subset this plan selected: the verdict
    # is kept for the model, and a later call may select others
    ruled = {mname: m for mname, m in model.named_modules() if type(m) in RULES}
    owner = {id(q): (f"{mname}.{attr}" if mname else attr, m)
             for mname, m in ruled.items() for attr, q in m.named_parameters(recurse=False)}  # fmt: skip
    running: set[int] = set()
    handles = []
    for m in ruled.values():
        handles.append(m.register_forward_pre_hook(lambda m, i: running.add(id(m))))
        handles.append(m.register_forward_hook(lambda m, i, o: running.discard(id(m))))
    try:
        with _Uses(owner, running) as mode:
            out = run()
    finally:
        for h in handles:
            h.remove()
    return out, frozenset(mode.outside)


def _refuse_outside(p: Plan, outside: frozenset[str]) -> None:
    bad = sorted(set(outside) & set(p.params))
    if bad:
        raise Unsupported(
            f"parameter {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} is used outside "
            "its module's forward (a functional call on it, or a tied weight)"
        )


def _refuse_graphless(p: Plan, saved: Saved) -> None:
    """A planned layer whose output has no autograd graph ran under ``torch.no_grad()`` — a frozen
    stage, or the first pass of reentrant activation checkpointing, whose parameters do reach the
    output (through the recomputation in backward). The hooks cannot tell which: Unsupported (the
    generic path handles the first and refuses the second), where zero curvature was silently wrong
    for the second."""
    trainable_modules = {mname for mname, _ in p.params.values()}
    for name, (_, z) in saved.items():
        if name in trainable_modules and isinstance(z, torch.Tensor) and not z.requires_grad:
            raise Unsupported(
                f"layer {name!r} ran without autograd graph (torch.no_grad, or reentrant checkpointing)"
            )


def forward(p: Plan, run, model: nn.Module | None = None):
    """``f = run()`` (the model's forward) under :func:`capture`: ``(f, saved)``. Where the forward
    changed a saved input or output in place, the modules are marked and the forward runs again
    with copies of them. With ``model``, its first forward here also records whether a planned
    parameter is used outside its own module (then :class:`Unsupported`: the hooks see only that
    module's use — a weight passed to ``F.linear`` elsewhere got zero curvature, an output layer
    tied to the embedding's weight only the embedding's part)."""
    watch = model is not None and model not in _OUTSIDE
    if model is not None and not watch:
        _refuse_outside(p, _OUTSIDE[model])
    for _ in range(2):
        with capture(p) as saved:
            if watch:
                f, _OUTSIDE[model] = _watched(model, run)
                watch = False
                _refuse_outside(p, _OUTSIDE[model])
            else:
                f = run()
        _refuse_graphless(p, saved)
        changed = saved.modified()
        if not changed:
            return f, saved
        for name, (cin, cout) in changed.items():
            m = p.modules[name]
            old = _COPY.get(m, (False, False))
            _COPY[m] = (old[0] or cin, old[1] or cout)
    raise Unsupported(f"the saved inputs/outputs of {sorted(changed)} change in place during the forward")


def output_grads(f, saved, cotangents) -> dict[str, torch.Tensor]:
    """δ (K, *z.shape) for every saved module output z, for K cotangents (K, *f.shape) at once."""
    names = list(saved)
    return dict(zip(names, batched_grad(f, [saved[n][1] for n in names], cotangents)))


def batched_grad(outputs, inputs, cotangents, on_loop=None) -> list[torch.Tensor]:
    """Gradients of ``outputs`` (a tensor or a list) with respect to ``inputs`` for K cotangents
    at once (a tensor, or one per output, each with a leading dimension K): (K, *input.shape) per
    input, zeros where an input is unused. Batched with ``is_grads_batched``; where the backward
    has an operation without a batching rule, one cotangent at a time (``on_loop(reason)`` is
    called then)."""
    outs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    cots = list(cotangents) if isinstance(cotangents, (list, tuple)) else [cotangents]
    k = cots[0].shape[0]
    try:
        if k == 1:  # (one cotangent: no batching machinery)
            grads = [None if g is None else g.unsqueeze(0) for g in torch.autograd.grad(
                outs, inputs, [c[0] for c in cots], retain_graph=True, allow_unused=True)]  # fmt: skip
        else:
            grads = list(torch.autograd.grad(outs, inputs, cots, is_grads_batched=True, retain_graph=True,
                                             allow_unused=True))  # fmt: skip
    except RuntimeError as err:
        per_k = [torch.autograd.grad(outs, inputs, [c[i] for c in cots], retain_graph=True, allow_unused=True)
                 for i in range(k)]  # fmt: skip (a real error surfaces here)
        if on_loop is not None:
            on_loop(str(err).split("\n")[0][:160])
        grads = [torch.stack([g[j] if g[j] is not None else torch.zeros_like(inputs[j]) for g in per_k])
                 for j in range(len(inputs))]  # fmt: skip
    return [g if g is not None else inputs[j].new_zeros((k, *inputs[j].shape)) for j, g in enumerate(grads)]


def _param_dtype(m: nn.Module) -> torch.dtype | None:
    return next((q.dtype for q in m.parameters(recurse=False) if q.is_floating_point()), None)


def _as_params(m: nn.Module, *tensors):
    """The saved inputs and output gradients in the module's parameter dtype: under
    ``torch.autocast`` they are bfloat16/float16, and the rules' products and batch sums then ran
    (and returned) in half precision — a bfloat16 curvature, which BayesAdam's float32 state
    refused."""
    dtype = _param_dtype(m)
    return [t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t
            for t in tensors]  # fmt: skip


@contextlib.contextmanager
def full_precision(p: Plan):
    """Autocast off for the rules (their products run in the parameters' dtype, or in the
    ``dtype`` asked for explicitly): the forward and backward keep the caller's autocast."""
    devices = p.__dict__.get("_devices")
    if devices is None:
        devices = p.__dict__["_devices"] = {q.device.type for m in p.modules.values()
                                             for q in m.parameters(recurse=False)}  # fmt: skip
    active = [dev for dev in devices if torch.is_autocast_enabled(dev)]
    if not active:  # (the common case: nothing to switch off)
        yield
        return
    with contextlib.ExitStack() as stack:
        for dev in active:
            stack.enter_context(torch.autocast(device_type=dev, enabled=False))
        yield


def sq_sums(p: Plan, saved, deltas, dtype=None) -> dict[str, torch.Tensor]:
    """Per-parameter ``Σ_k Σ_b g²`` from saved inputs and output gradients, keyed like the model.
    ``dtype``: the precision of the Linear/Conv products (e.g. ``torch.bfloat16``; None: exact)."""
    with full_precision(p):
        per_module = {n: RULES[type(m)].sq(m, *_as_params(m, saved[n][0], deltas[n]), dtype)
                      for n, m in p.modules.items() if n in saved}  # fmt: skip
    return {full: per_module[mname][attr] if mname in per_module else _unused(p, mname, attr)
            for full, (mname, attr) in p.params.items()}  # fmt: skip


def _unused(p: Plan, mname: str, attr: str) -> torch.Tensor:
    """Zero curvature for a parameter whose module did not run in this forward (conditional
    computation): the outputs do not depend on it."""
    return torch.zeros_like(getattr(p.modules[mname], attr)).detach()


def output_covariance(p: Plan, saved, deltas, variance: dict[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_p var_p J_kp J_lp`` per sample, (B, K, K), from output gradients of K unit cotangents.

    ``variance`` is keyed like the model's parameters (a diagonal posterior's variances); with the
    K = C cotangents ``e_k`` this is the linearised predictive covariance ``J_b Σ J_bᵀ``.
    """
    with full_precision(p):
        return _output_covariance(p, saved, deltas, variance)


def _output_covariance(p: Plan, saved, deltas, variance) -> torch.Tensor:
    total = None
    for n, m in p.modules.items():
        if n not in saved:  # (a module this forward did not run: the outputs do not depend on it)
            continue
        rule = RULES[type(m)]
        var = {attr: variance[full] for full, (mn, attr) in p.params.items() if mn == n}
        a, delta = _as_params(m, saved[n][0], deltas[n])
        part = rule.cov(m, a, delta, var) if rule.cov is not None else None
        if part is None:
            if rule.psg is None:
                raise Unsupported(f"no per-sample gradients for {type(m).__name__} ({n})")
            part = 0
            for attr, g in rule.psg(m, a, delta).items():
                if attr in var:
                    g = g.reshape(g.shape[0], g.shape[1], -1)  # (K, B, P)
                    part = part + torch.einsum("kbp,lbp,p->bkl", g, g, var[attr].reshape(-1))
        total = part if total is None else total + part
    return total


def kfac_diagonal(p: Plan, factors) -> dict[str, torch.Tensor]:
    """The diagonal of ``G ⊗ A`` per parameter, keyed like the model's parameters, from the factors
    (A, G) or from their diagonals alone (1-D, see ``kfac_factors(..., diagonal=True)``)."""
    out = {}
    for full, (mname, attr) in p.params.items():
        if mname not in factors:  # the module did not run in this forward
            out[full] = _unused(p, mname, attr)
            continue
        A, G = factors[mname]
        dA = A if A.dim() == 1 else torch.diagonal(A)
        dG = G if G.dim() == 1 else torch.diagonal(G)
        w = p.modules[mname].weight
        if attr == "weight":
            out[full] = torch.outer(dG, dA[: w[0].numel()]).view_as(w)
        else:
            out[full] = dG * dA[-1]
    return out


def kfac_factors(
    p: Plan, saved, deltas, diagonal: bool = False, dtype=None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A, G) for every planned Linear/Conv module; with ``diagonal`` only their
    diagonals (1-D), which is all the diagonal of ``G ⊗ A`` needs — O(n·in) instead of O(n·in²).
    ``dtype``: the precision of the products āᵀā and δᵀδ (None: exact; bf16 keeps each factor
    within about 1 % of its Frobenius norm)."""
    with full_precision(p):
        return _kfac_factors(p, saved, deltas, diagonal, dtype)


def _kfac_factors(p: Plan, saved, deltas, diagonal, dtype):
    out = {}
    for n, m in p.modules.items():
        rule = RULES[type(m)]
        if rule.kfac is None:
            raise Unsupported(f"no Kronecker factors for {type(m).__name__} ({n})")
        if n not in saved:  # did not run in this forward: no factors (its curvature is zero)
            continue
        a, d = rule.kfac(m, *_as_params(m, saved[n][0], deltas[n]))
        if diagonal:
            out[n] = (a.square().sum(0) / a.shape[0], d.square().sum(0))
        else:
            out[n] = (_gram(a, dtype).div_(a.shape[0]), _gram(d, dtype))  # in place: no second n×n
    return out
