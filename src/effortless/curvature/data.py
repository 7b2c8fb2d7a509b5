"""Curvature summed over a data loader, on one process or across the ranks of a process group.

:func:`accumulate` runs one of the per-batch estimators over every batch of a loader and sums the
results (for Kronecker factors: ``A`` averaged over all data points, ``G`` summed). With
``distributed`` the loader is this rank's shard (e.g. a ``DistributedSampler``) and the sums are
all-reduced in one flat collective, so every rank holds the curvature of the whole data set.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .. import likelihoods
from . import estimators
from . import functional as cf

__all__ = [
    "accumulate", "DIAGONAL", "all_reduce_sums", "diagonal_estimator", "pair", "shared_layout", "sum_dtype"
]


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a sum over a data set is kept in: float32 for 16-bit parameters. In bf16 a running
    sum stops growing once each batch's term is under half its spacing (2⁻⁹ of the sum): a bf16
    MLP's diagonal GGN summed over 512 batches came out 9-49 % low; float16 also overflows at
    65,504."""
    return torch.float32 if dtype in likelihoods._LOW else dtype


def pair(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader's batch as ``(inputs, targets)``; anything else is refused by name (a dict batch
    unpacked into its two keys, and a third element, failed with messages about strings or
    unpacking)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        for name, t in zip(("inputs", "targets"), batch):
            if not isinstance(t, torch.Tensor):  # failed with "'numpy.ndarray' has no attribute 'to'"
                raise TypeError(
                    f"each batch must be an (inputs, targets) pair of tensors; its {name} are a "
                    f"{type(t).__name__} (convert with torch.as_tensor, or use a DataLoader)"
                )
        return batch[0], batch[1]
    if isinstance(batch, dict):
        got = f"a dict with keys {list(batch)}"
    elif isinstance(batch, (tuple, list)):
        got = f"a {type(batch).__name__} of {len(batch)}"
    else:
        got = f"a {type(batch).__name__}"
    raise ValueError(
        f"each batch must be an (inputs, targets) pair, got {got}; return that pair from the "
        "dataset or the DataLoader's collate_fn"
    )

# hessian key -> fn(model, x, y, likelihood, generator, param names) -> {name: batch sum}
DIAGONAL = {k: e.fn for k, e in estimators.ESTIMATORS.items() if e.needs_model}
DIAGONAL["hessian"] = lambda model, x, y, lik, gen, params: cf.diag_hessian(model, x, y, lik, params=params)
KRONECKER = {"kfac": "exact", "kfac-mc": "mc"}


def diagonal_estimator(hessian: str, product_dtype: torch.dtype | None = None):
    """The per-batch estimator of :data:`DIAGONAL` for ``hessian``, with ``product_dtype`` bound
    (the hook engine's low-precision products; only the keys of
    :data:`~effortless.curvature.estimators.LOW_PRECISION` have them)."""
    if hessian not in DIAGONAL:
        raise ValueError(f"hessian must be one of {sorted(DIAGONAL)}, got {hessian!r}")
    fn = DIAGONAL[hessian]
    if product_dtype is None:
        return fn
    if hessian not in estimators.LOW_PRECISION:
        raise ValueError(
            f"product_dtype is for hessian in {sorted(estimators.LOW_PRECISION)}; "
            f"{hessian!r} has no low-precision products"
        )
    cf._check_product_dtype(product_dtype)

    def bound(model, x, y, lik, gen, params):
        return fn(model, x, y, lik, gen, params, product_dtype=product_dtype)

    return bound


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _reducing(distributed) -> bool:
    """Whether sums are reduced over ranks: ``distributed`` True, or None and a group of size > 1 is up."""
    import torch.distributed as dist

    if distributed is None:
        return _group_size() > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return bool(distributed)


def shared_layout(layout: dict, distributed) -> dict:
    """The layout of the sums every rank reduces: ``layout`` is this rank's ``{name: [(shape,
    dtype), ...]}`` of the factors it summed, ``{}`` when its shard was empty. Without reduction,
    ``layout`` itself; under a process group, the first non-empty rank's (``{}`` when every shard
    was empty), so that a rank with no data joins the collective with zeros of the others' shapes
    (Kronecker factors' shapes are only known from a forward pass: such a rank raised before the
    collective and left the others waiting in it). Every rank sees every layout, so all reach the
    same verdict: a mismatch raises everywhere. One small collective (``all_gather_object``; under
    NCCL it runs on the current CUDA device, which each rank must have set, as DDP needs anyway)."""
    if not _reducing(distributed):
        return layout
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, layout)
    held = [(rank, lay) for rank, lay in enumerate(everyone) if lay]
    if not held:
        return {}
    (r0, first), *rest = held
    for rank, lay in rest:
        if lay != first:
            name = next(n for n in [*first, *lay] if first.get(n) != lay.get(n))
            raise ValueError(
                f"the ranks' curvature sums differ in layout (at {name!r}, rank {r0}: {first.get(name)}; "
                f"rank {rank}: {lay.get(name)}): every rank must run the same model"
            )
    return first


def all_reduce_sums(tensors: list[torch.Tensor], scalars: list[float], distributed) -> list[float]:
    """Sum ``tensors`` (in place) and ``scalars`` over the ranks of an initialised process group, in
    one flat collective, when ``distributed`` is True, or None and a group of size > 1 is up.
    Returns the (summed) scalars."""
    import torch.distributed as dist

    if not _reducing(distributed):
        return scalars
    if not tensors:
        raise ValueError("nothing to reduce")
    dev = tensors[0].device if dist.get_backend() != "gloo" else torch.device("cpu")
    dtype = sum_dtype(tensors[0].dtype)  # (the counts ride along: 60,000 in bf16 is 59,904)
    extra = torch.tensor(scalars, dtype=dtype, device=dev)
    flat = torch.cat([*(t.reshape(-1).to(dev, dtype) for t in tensors), extra])
    dist.all_reduce(flat)
    i = 0
    for t in tensors:
        t.copy_(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return [float(v) for v in flat[i:]]


def _progress(iterable, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the core does not depend on tqdm
        return iterable
    return tqdm(iterable, **kwargs)


def accumulate(
    model: nn.Module,
    loader: Iterable,
    hessian: str = "ggn",
    likelihood: str | likelihoods.Likelihood = "classification",
    sigma_noise: float = 1.0,
    generator: torch.Generator | None = None,
    params: Iterable[str] | None = None,
    distributed: bool | None = None,
    progress: bool = False,
    product_dtype: torch.dtype | None = None,
) -> dict:
    """The curvature of the summed negative log-likelihood over all of ``loader``'s data.

    Args:
        hessian: a diagonal estimator (``"ggn"``, ``"ggn-mc"``, ``"efisher"``, ``"hutchinson"``,
            ``"hessian"``, ...: keys of :data:`DIAGONAL`) — returns ``{parameter name: sum}``; or
            ``"kfac"`` / ``"kfac-mc"`` — returns ``{module name: (A, G)}`` with ``A`` the mean of
            the (bias-augmented) inputs' outer products over all data points and ``G`` the sum
            of the output-gradient outer products, so that ``G ⊗ A`` approximates the GGN block
            of the summed loss (as :func:`~effortless.curvature.kfac` for one batch).
        params: restrict to these parameter names.
        distributed: the loader yields this rank's shard: all-reduce the sums (one collective)
            so every rank returns the curvature of the whole data. ``None`` (default): when a
            process group of size > 1 is initialised.
        product_dtype: precision of the hook engine's products (e.g. ``torch.bfloat16``; see
            :func:`~effortless.curvature.diag_ggn`), for ``"ggn"``, ``"ggn-mc"``, ``"efisher"``,
            ``"kfac"`` and ``"kfac-mc"``; None (default) keeps them exact.

    The sums are in the parameters' dtype, and in float32 for 16-bit parameters (:func:`sum_dtype`).
    """
    lik = likelihoods.get(likelihood, sigma_noise)
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    if hessian in KRONECKER:
        cf._check_product_dtype(product_dtype)
        sums: dict[str, list] = {}
        count = 0
        for batch in _progress(loader, progress, desc=f"curvature ({hessian})", unit="batch"):
            x, y = (t.to(device) for t in pair(batch))
            factors = cf.kfac(model, x, y, lik, KRONECKER[hessian], 1, generator, sigma_noise, params,
                              product_dtype=product_dtype)  # fmt: skip
            for name, (A, G) in factors.items():
                if name in sums:
                    sums[name][0] += A * x.shape[0]
                    sums[name][1] += G
                else:
                    sums[name] = [A.to(sum_dtype(A.dtype)) * x.shape[0], G.to(sum_dtype(G.dtype), copy=True)]
            count += x.shape[0]
        layout = shared_layout({n: [(tuple(t.shape), t.dtype) for t in ts] for n, ts in sums.items()},
                               distributed)  # fmt: skip
        if not layout:  # (every rank's shard empty: all raise)
            raise ValueError("accumulate: the loader yielded no batches")
        sums = {n: sums.get(n) or [torch.zeros(s, dtype=d, device=device) for s, d in spec]
                for n, spec in layout.items()}  # (zeros on a rank whose shard was empty; one order)
        tensors = [t for pair in sums.values() for t in pair]
        (count,) = all_reduce_sums(tensors, [float(count)], distributed)
        return {name: (A / count, G) for name, (A, G) in sums.items()}
    if hessian not in DIAGONAL:
        raise ValueError(f"hessian must be one of {sorted([*DIAGONAL, *KRONECKER])}, got {hessian!r}")
    _, total, batches, _, _ = diagonal_sums(model, loader, hessian, lik, generator, params, progress,
                                            distributed, product_dtype, desc=f"curvature ({hessian})")
    if not batches:  # (counted over the ranks: a rank whose shard is empty is no error)
        raise ValueError("accumulate: the loader yielded no batches")
    return total


def residual_sums(f: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(Σ (y − f)², the number of outputs) of a regression batch, in ≥ float32."""
    f = likelihoods._wide(f)
    return float((f - y.reshape(f.shape).to(f.dtype)).pow(2).sum()), f.numel()


def diagonal_sums(model, loader, hessian, lik, generator=None, params=None, progress=False, distributed=None,
                  product_dtype=None, residuals=False, desc="laplace"):  # fmt: skip
    """The diagonal estimate ``hessian`` summed over ``loader`` (in :func:`sum_dtype`), all-reduced
    over the ranks with the number of batches and, with ``residuals`` (Gaussian regression), the
    residual sum of squares and the number of outputs. Returns ``(the parameters, the sums,
    batches, RSS, outputs)``; :func:`accumulate` and ``ef.laplace`` are made of it."""
    estimate = diagonal_estimator(hessian, product_dtype)
    theta = cf.trainable(model, params)
    total = {n: torch.zeros_like(p, dtype=sum_dtype(p.dtype)) for n, p in theta.items()}
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    batches, rss, n_out = 0, 0.0, 0
    for batch in _progress(loader, progress, desc=desc, unit="batch"):
        x, y = pair(batch)
        x, y = x.to(device), y.to(device)
        est = estimate(model, x, y, lik, generator, list(theta))
        for n in total:
            total[n] += est[n]
        batches += 1
        if residuals:
            with torch.no_grad():
                r, k = residual_sums(model(x), y)
                rss, n_out = rss + r, n_out + k
    counts = [float(batches), rss, float(n_out)]
    batches, rss, n_out = all_reduce_sums(list(total.values()), counts, distributed)
    return theta, total, int(round(batches)), rss, int(round(n_out))
