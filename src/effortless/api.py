"""High-level functions: train a posterior (``fit``), fit one post hoc (``laplace``), predict.

Example:
    >>> import torch, effortless as ef
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> x = torch.randn(64, 3); y = (x[:, 0] > 0).long()
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    >>> model = torch.nn.Linear(3, 2)
    >>> post = ef.fit(model, loader, likelihood="classification", epochs=2, progress=False)
    >>> ef.predict(model, post, x[:4], n_samples=8).shape
    torch.Size([4, 2])
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from . import likelihoods
from ._checks import is_count
from ._stack import outside_stacklevel
from .curvature import engine
from .curvature.data import DIAGONAL, _progress, diagonal_sums, pair, residual_sums
from .curvature.functional import keep_buffers
from .optim import BayesAdam
from .posterior import DiagGaussian, evidence, kron, predictive

__all__ = ["fit", "predict", "predict_samples", "laplace", "LAPLACE_HESSIANS"]


def _warn_active_dropout(model: nn.Module, what: str, consequence: str) -> None:
    dropouts = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    active = [n for n, m in dropouts if m.training and m.p > 0]
    if active:
        warnings.warn(
            f"{what}: dropout {active[0]!r} is active (the model is in training mode), so {consequence}; "
            "call model.eval() first",
            RuntimeWarning,
            stacklevel=outside_stacklevel(),
        )


def _running_stat_bns(model: nn.Module) -> list[nn.Module]:
    """BatchNorm modules that keep running statistics (what eval mode normalises with)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]  # fmt: skip


def _warn_stale_batchnorm(model: nn.Module, posterior, what: str, method: str) -> None:
    """Weight samples through eval-mode BatchNorm from a posterior whose curvature came from
    training passes (BayesAdam, Adam's moments): its running statistics belong to other weights.

    Training normalises every sampled network with its batch's statistics, so weights ahead of a
    BatchNorm are free to scale (flat directions: small curvature, wide posterior); with the
    statistics frozen, a sample's scale goes straight into the logits. Measured on a BatchNorm CNN
    (Fashion-MNIST): the MC predictive's ECE 4–15 %, 0.7–1 % with each sample's own statistics.
    """
    if not (isinstance(posterior, DiagGaussian) and getattr(posterior, "from_training", False)):
        return  # (a last-layer posterior leaves the features alone; ef.laplace's curvature is the
        # eval-mode network's, fixed statistics included)
    bns = [m for m in _running_stat_bns(model) if not m.training]
    if not bns:
        return
    inputs = "(a few batches of training inputs)"
    fix = (f"pass bn_data= {inputs} to recompute them for each sample" if method == "mc"
           else f"use method='mc' with bn_data= {inputs}")  # fmt: skip
    warnings.warn(
        f"{what}: the model has BatchNorm with running statistics (eval mode); if it normalised with "
        "batch statistics during training, they were collected at other weights than the posterior's "
        f"samples, which makes the predictive badly calibrated: {fix} (not needed where BatchNorm "
        "stayed frozen in eval mode during training)",
        RuntimeWarning,
        stacklevel=outside_stacklevel(),
    )


def _bn_batches(bn_data, device) -> list[torch.Tensor]:
    """``bn_data`` as a list of input batches: a tensor (split into batches of 256), or an
    iterable of batches (tensors, or ``(x, ...)`` tuples as a DataLoader yields)."""
    if isinstance(bn_data, torch.Tensor):
        batches = list(bn_data.split(256))
    else:
        try:
            batches = [b if isinstance(b, torch.Tensor) else b[0] if isinstance(b, (tuple, list)) and b
                       else None for b in bn_data]  # fmt: skip
        except TypeError:
            batches = [None]
        if any(b is None or not isinstance(b, torch.Tensor) for b in batches):
            raise TypeError(
                "bn_data must be a tensor of inputs or an iterable of batches (tensors or (x, y) tuples), "
                f"got {type(bn_data).__name__}"
            )
    if not batches or any(len(b) < 2 for b in batches):
        raise ValueError("bn_data needs at least one batch of 2 or more inputs (BatchNorm's statistics)")
    return [b.to(device) for b in batches]


@contextlib.contextmanager
def _fresh_bn_statistics(model: nn.Module, batches: list[torch.Tensor]):
    """A context giving ``refresh()``, which recomputes every running-statistics BatchNorm's
    statistics from ``batches`` (a list, to refresh more than once) at the model's current weights:
    train mode for those modules only, an equal average over the batches, as
    ``torch.optim.swa_utils.update_bn``. Modes and momenta are put back afterwards (the statistics
    themselves by the caller's ``keep_buffers``, where it wants them back)."""
    bns = _running_stat_bns(model)
    saved = [(m.training, m.momentum) for m in bns]

    def refresh():
        with torch.no_grad():
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for b in batches:
                model(b)
            for m, (mode, _) in zip(bns, saved):
                m.train(mode)

    try:
        yield refresh
    finally:
        for m, (mode, momentum) in zip(bns, saved):
            m.train(mode)
            m.momentum = momentum


def _peek(loader: Iterable):
    """(first batch or None, an iterable that still yields every batch): a re-iterable loader is
    returned as it is, a one-shot iterator is chained behind its first batch."""
    it = iter(loader)
    first = next(it, None)
    if it is loader:
        return first, itertools.chain([] if first is None else [first], it)
    return first, loader


def _n_data(loader) -> int:
    """The number of training examples behind a DataLoader: its dataset's length when the sampler
    walks the whole dataset (sequential, random, distributed; also inside a ``BatchSampler`` given as the
    sampler), the subset's for a
    ``SubsetRandomSampler`` (``len(dataset)`` counted the examples held out by it, silently);
    other samplers have to be told."""
    from torch.utils import data as tud

    try:
        n = len(loader.dataset)
    except (AttributeError, TypeError):
        raise ValueError("n_data: the loader has no dataset length; pass n_data=") from None
    if n == 0:  # (said "n_data must be a finite number > 0, got 0", as if the user had passed it)
        raise ValueError("fit: the loader's dataset is empty (0 examples)")
    sampler = getattr(loader, "sampler", None)
    while isinstance(sampler, tud.BatchSampler):  # batches drawn whole (effortless.data.loader): its order
        sampler = sampler.sampler
    if sampler is None or isinstance(sampler, (tud.SequentialSampler, tud.RandomSampler,
                                               tud.DistributedSampler)):  # fmt: skip
        return n
    if isinstance(sampler, tud.SubsetRandomSampler):
        return len(sampler.indices)
    raise ValueError(
        f"n_data: the loader's {type(sampler).__name__} does not say how many of the dataset's {n} "
        "examples it trains on; pass n_data= (the number of training examples)"
    )


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


_ABSENT = object()  # (a param group without the key)


def fit(
    model: nn.Module,
    loader: Iterable,
    likelihood: str = "classification",
    epochs: int = 5,
    hessian: str = "reparam",
    n_data: int | None = None,
    sigma_noise: float | None = None,
    optimizer: BayesAdam | None = None,
    scheduler: str | None = "cosine",
    progress: bool = True,
    **optimizer_kwargs,
) -> DiagGaussian:
    """Train ``model`` with :class:`BayesAdam` and return its posterior.

    Args:
        model: the network; its weights end at the posterior mean, and BatchNorm's running
            statistics are recomputed there (one more pass over ``loader``, forward only).
        loader: yields ``(x, y)`` minibatches; ``n_data`` defaults to ``len(loader.dataset)``
            (the subset's size with a ``SubsetRandomSampler``; other custom samplers need it given).
        likelihood: ``"classification"`` or ``"regression"`` (with ``sigma_noise``).
        sigma_noise: the regression noise σ (default 1), which weighs the likelihood (1/σ²) and is
            part of the predictive variance. Left unset, ``fit`` warns when the last epoch's
            residuals put the noise more than √10× away from 1 (targets standardised to unit
            variance and fitted well, say): pass an estimate, or choose σ after training by the
            evidence (``ef.laplace(..., sigma_noise="marglik")``).
        epochs: passes over the data.
        hessian: curvature estimator key.
        optimizer: continue with this optimizer instead of making a new one.
        scheduler: ``"cosine"`` (cosine decay of the learning rate to 0 over the epochs, from each
            group's ``lr``; the ``lr`` is put back afterwards) or None (constant).
        progress: show a progress bar (needs tqdm).
        **optimizer_kwargs: passed to :class:`BayesAdam` (lr, prior_precision, mc_samples, ...).
    """
    if not is_count(epochs):
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if scheduler not in ("cosine", None):
        raise ValueError(f"scheduler must be 'cosine' or None, got {scheduler!r}")
    if isinstance(sigma_noise, str):  # (ef.laplace takes "marglik"; training needs a number)
        raise ValueError(
            f"fit: sigma_noise must be a positive number (the noise the training likelihood assumes), got "
            f"{sigma_noise!r}; to choose it by the evidence, train with an estimate, then call "
            "ef.laplace(model, loader, likelihood='regression', sigma_noise='marglik', hessian='kfac', "
            "subset='last_layer')"
        )
    sigma_given = sigma_noise is not None or isinstance(likelihood, likelihoods.Likelihood)
    lik = likelihoods.get(likelihood, 1.0 if sigma_noise is None else sigma_noise)
    if optimizer is not None:  # these would be ignored: the optimizer has its own
        given = [*optimizer_kwargs, *(["n_data"] if n_data is not None else []),
                 *(["hessian"] if hessian not in ("reparam", optimizer.hessian) else [])]  # fmt: skip
        if given:
            raise ValueError(f"fit: {given} would be ignored with optimizer=; set them on the optimizer")
    if optimizer is None:
        if n_data is None:
            n_data = _n_data(loader)
        optimizer = BayesAdam(model.named_parameters(), n_data=n_data, hessian=hessian, **optimizer_kwargs)
    try:
        per_epoch = len(loader)
    except TypeError:
        per_epoch = None
    sched = None
    # the groups' learning rates as given: the cosine schedule starts from them (LambdaLR would
    # start from an 'initial_lr' another scheduler left in a group) and they are put back at the end
    # (the schedule ended at lr = 0, so a later fit(optimizer=...) with scheduler=None trained
    # nothing, silently)
    given_lrs = [(g["lr"], g.get("initial_lr", _ABSENT)) for g in optimizer.param_groups]
    if scheduler == "cosine":
        if per_epoch is None:
            raise ValueError(
                "scheduler='cosine' needs the number of batches per epoch, len(loader); pass "
                "scheduler=None for a loader without a length"
            )
        total = epochs * per_epoch
        for g in optimizer.param_groups:
            g["initial_lr"] = g["lr"]
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t / total)).item())
        )
    device = _device(model)
    model.train()
    # a bar over batches where the loader has a length (one over epochs did not move during a
    # long epoch), else over epochs
    batch_bar = _progress(None, progress and bool(per_epoch), total=epochs * (per_epoch or 0), desc="fit",
                          unit="batch")  # fmt: skip
    bar = _progress(range(epochs), progress and batch_bar is None, desc="fit", unit="epoch")
    try:
        for epoch in bar:
            total_loss, count = 0.0, 0
            for batch in loader:
                x, y = (t.to(device) for t in pair(batch))
                loss = optimizer.train_step(model, x, y, likelihood=lik)
                total_loss += float(loss) * x.shape[0]
                count += x.shape[0]
                if sched is not None:
                    sched.step()
                if batch_bar is not None:
                    batch_bar.update(1)
            if count == 0:  # an exhausted iterator trains nothing from here on, silently
                raise ValueError(
                    f"fit: the loader yielded no batches in epoch {epoch + 1} (a generator is used up "
                    "after one pass: pass a DataLoader or a list)"
                )
            shown = batch_bar if batch_bar is not None else bar
            if hasattr(shown, "set_postfix"):  # (tqdm rate-limits the refresh)
                shown.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{total_loss / count:.4f}",
                                  refresh=False)  # fmt: skip
    finally:
        if batch_bar is not None:
            batch_bar.close()
        if sched is not None:
            for g, (lr, initial) in zip(optimizer.param_groups, given_lrs):
                g["lr"] = lr
                if initial is _ABSENT:
                    g.pop("initial_lr", None)
                else:
                    g["initial_lr"] = initial
    if lik.name == "regression" and not sigma_given:
        # the residuals' mean square behind the last epoch's mean NLL (at the weight samples trained
        # on), without another pass over the data; outputs per example from its last batch
        outputs = y[0].numel() if y.dim() > 0 and len(y) else 1
        mean_sq = lik.residual_mean_square(total_loss / count, outputs)
        _check_default_noise("fit", lik.sigma_noise, mean_sq, "the last epoch's residuals")
    optimizer.load_averaged_means()  # the weights end at the posterior mean (see `averaging`)
    _refresh_bn_statistics(model, loader, device)
    return optimizer.posterior()  # (with the regression σ that train_step recorded)


def _check_default_noise(caller: str, sigma: float, mean_sq: float | None, whose: str) -> None:
    """Warn when the default regression σ is more than √10× away from the noise the residuals'
    mean square ``mean_sq`` shows: σ = 1 on targets with noise 0.1 weighs the data 100× too little
    and puts 1 into every predictive variance, silently (laplace-torch's users meet the same
    default)."""
    s2 = sigma**2
    if mean_sq is None or not (math.isfinite(mean_sq) and mean_sq > 0) or 0.1 <= mean_sq / s2 <= 10:
        return
    warnings.warn(
        f"{caller}: regression with the default sigma_noise={sigma:g}, but {whose} have RMS "
        f"{math.sqrt(mean_sq):.3g}: the likelihood's weight 1/σ² and the predictive variance (which "
        "includes σ²) assume noise of another size. Pass sigma_noise= (an estimate of the targets' "
        "noise), or choose it by the evidence: ef.laplace(model, loader, likelihood='regression', "
        "sigma_noise='marglik', hessian='kfac', subset='last_layer')",
        RuntimeWarning,
        stacklevel=outside_stacklevel(),
    )


@torch.no_grad()
@keep_buffers
def _residual_mean_square(model: nn.Module, loader: Iterable, lik) -> float | None:
    """The mean square of the regression residuals over ``loader`` at the model's weights (one
    forward pass; BatchNorm's buffers as they were), or None when the loader yields nothing again
    (a one-shot iterator, used up by the fit)."""
    device = _device(model)
    total, n = 0.0, 0
    for batch in loader:
        x, y = (t.to(device) for t in pair(batch))
        r, k = residual_sums(*lik.check(likelihoods.output(model(x)), y))
        total, n = total + r, n + k
    return total / n if n else None


def _refresh_bn_statistics(model: nn.Module, loader: Iterable, device) -> None:
    """BatchNorm's running statistics recomputed at the model's weights with one pass over
    ``loader`` (an equal average over its batches, as ``torch.optim.swa_utils.update_bn``):
    those collected during training belong to the weight samples, not to the averaged mean."""
    bns = _running_stat_bns(model)
    if not bns:
        return
    saved = [(b, b.clone()) for m in bns for b in m.buffers()]
    seen = []

    def batches():
        for batch in loader:
            seen.append(1)
            yield pair(batch)[0].to(device)

    with _fresh_bn_statistics(model, batches()) as refresh:
        refresh()
    if not seen:  # a one-shot iterator, used up by training: keep the statistics it had
        with torch.no_grad():
            for b, old in saved:
                b.copy_(old)
        warnings.warn(
            "fit: BatchNorm's running statistics were not recomputed at the posterior mean: the loader "
            "yielded nothing on a second pass (pass a DataLoader or a list); they are the training "
            "samples' (torch.optim.swa_utils.update_bn(loader, model) recomputes them)",
            RuntimeWarning,
            stacklevel=outside_stacklevel(),
        )


@torch.no_grad()
@keep_buffers
def predict(
    model: nn.Module,
    posterior: DiagGaussian | kron.KronLastLayer,
    x: torch.Tensor,
    n_samples: int = 32,
    likelihood: str | None = None,
    method: str = "mc",
    generator: torch.Generator | None = None,
    sigma_noise: float | None = None,
    bn_data=None,
):
    """Posterior predictive at ``x``.

    Classification returns the averaged probabilities (B, C); regression returns the predictive
    ``(mean, variance)``, the variance including ``sigma_noise²`` (default: the σ the posterior
    was fitted with, ``posterior.sigma_noise``, which ``ef.laplace``, ``ef.fit`` and a regression
    ``BayesAdam.train_step`` record; else 1). ``likelihood`` defaults to the one the posterior
    was fitted with (``posterior.likelihood``, recorded by the same calls), else classification;
    naming a different one raises ``ValueError``.

    * ``method="mc"``: average over ``n_samples`` weight samples;
    * ``method="glm"``: the linearised predictive, sampled in output space (``n_samples`` draws of
      ``f(μ) + J δθ`` from its exact Gaussian; no Jacobian matrices are built);
    * ``method="probit"``: its closed-form probit approximation (deterministic).

    For regression the linearised predictive is Gaussian, so ``"glm"`` and ``"probit"`` both
    return its exact mean and variance (no sampling).

    The model's train/eval mode is left as the caller set it (training-mode BatchNorm then
    normalises with each batch's statistics), and its buffers are as they were afterwards.

    BatchNorm in eval mode normalises with running statistics collected at other weights than a
    sample's; for a posterior trained with BatchNorm normalising each batch (BayesAdam, Adam's
    moments), whose curvature is small where BatchNorm rescales, this miscalibrates the predictive
    badly (a warning says so): ``bn_data`` (a tensor
    of training inputs, or an iterable of ``(x, y)`` batches; a few thousand inputs suffice)
    recomputes them for each weight sample before it predicts, as SWAG does (``method="mc"`` only;
    each sample costs a forward pass over ``bn_data``).
    """
    if method not in ("mc", "glm", "probit"):
        raise ValueError(f"method must be one of ('mc', 'glm', 'probit'), got {method!r}")
    _check_inputs(x, "ef.predict")
    bn_batches = _bn_argument(bn_data, method, model, posterior, x, "ef.predict")
    _warn_active_dropout(model, "ef.predict", "the predictive mixes dropout masks with the weight samples")
    if not is_count(n_samples):
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if sigma_noise is None:
        sigma_noise = getattr(posterior, "sigma_noise", 1.0)
    lik = likelihoods.get(_fitted_likelihood(posterior, likelihood, "ef.predict"), sigma_noise)
    if method in ("glm", "probit"):
        if isinstance(posterior, kron.KronLastLayer):
            mean, cov = posterior.predictive_moments(model, x)
        else:
            with torch.enable_grad():
                mean, cov = predictive.linearised_moments(model, posterior, x)
        if lik.name != "classification":  # in the model's output shape, as the MC predictive's
            var = torch.diagonal(cov, dim1=-2, dim2=-1) + lik.sigma_noise**2
            return mean, var.reshape(mean.shape)
        likelihoods._check_logits(mean)
        if method == "probit":
            return predictive.probit_probs(mean, cov)
        return predictive.glm_probs(mean, cov, n_samples, generator)
    # (S, B, C); in float32 at least: under bf16 autocast the draws run one at a time (a last-layer
    # posterior, a large model) came in bf16, and so did their softmax and variance
    f = likelihoods._wide(_mc_outputs(model, posterior, x, n_samples, generator, bn_batches))
    if lik.name == "classification":
        likelihoods._check_logits(f[0])
        return f.softmax(-1).mean(0)
    return f.mean(0), f.var(0, unbiased=False) + lik.sigma_noise**2


MC_BATCH_NUMBERS = 2**24  # weight-sample numbers held at once by the batched MC predictive
# On CPU, batching pays only for small models: measured (1 thread, batch 128, 32 samples) 24 vs 32 ms
# at 79k weights, 81 vs 76 ms at 204k, 208 vs 150 ms at 536k (vmap vs one sample at a time); and
# not for sampled convolutions at all (see _samples_conv).
MC_VMAP_MAX_CPU = 2**17
# Inputs × samples run at once by the batched path: each sample's activations are held together, so
# ef.predict on 60,000 inputs of a 79k-weight MLP took 1.5 GB more than one sample at a time, and was
# no faster (4.5 s either way at 2 threads); batching pays for small batches (128 inputs: 32 samples).
MC_VMAP_INPUTS = 2**14
# Above this many input numbers (a proxy for the work of one draw) a posterior that samples a
# convolution runs its draws one at a time on CPU (see _samples_conv). vmap against one at a time,
# 20 draws: the MNIST-1D CNN (40 numbers an input) 1.8-3.6x faster at 32 inputs (1,280 numbers;
# 1-2 threads), a tie at 128 (5,120); LeNet (784) 1.3-2.3x slower at 32 (25,088).
MC_CONV_VMAP_NUMBERS = 4096


def _bn_argument(bn_data, method, model, posterior, x, what):
    """``bn_data`` checked and as device batches, or None (not given: then the stale-statistics
    warning where it applies; or no BatchNorm to refresh)."""
    if bn_data is None:
        _warn_stale_batchnorm(model, posterior, what, method)
        return None
    if method != "mc":
        raise ValueError(f"{what}: bn_data recomputes BatchNorm's statistics per sample: method='mc' only")
    if not _running_stat_bns(model):
        warnings.warn(f"{what}: bn_data is ignored: no BatchNorm of the model uses running statistics "
                      "(none there, or in training mode, where it normalises with each batch's own)",
                      RuntimeWarning, stacklevel=outside_stacklevel())  # fmt: skip
        return None
    return _bn_batches(bn_data, x.device)


def _mc_outputs(model, posterior, x, n_samples, generator=None, bn_batches=None):
    """Network outputs at ``n_samples`` posterior weight samples, (S, B, ...): batched over the
    samples with ``torch.func.vmap`` in chunks of at most ``MC_BATCH_NUMBERS`` sampled numbers
    and ``MC_VMAP_INPUTS`` inputs × samples (on CPU only up to ``MC_VMAP_MAX_CPU`` weights), else
    one sample at a time, as also where
    vmap cannot run the model; the same draws either way. With ``bn_batches``, one sample at a
    time, each with BatchNorm statistics recomputed from them at its weights."""
    if bn_batches is not None:
        with torch.no_grad(), _fresh_bn_statistics(model, bn_batches) as refresh:
            outs = []
            for _ in range(n_samples):
                with posterior.sampled(model, generator):
                    refresh()
                    outs.append(likelihoods.output(model(x)))
            return torch.stack(outs)
    if isinstance(posterior, kron.KronLastLayer):  # one forward pass, a matmul per draw
        with torch.no_grad():
            out = posterior.draws(model, x, n_samples, generator)
        if out is not None:
            return out
    if not isinstance(posterior, DiagGaussian):  # e.g. KronLastLayer: its own sampling context
        with torch.no_grad():
            outs = []
            for _ in range(n_samples):
                with posterior.sampled(model, generator):
                    outs.append(likelihoods.output(model(x)))
            return torch.stack(outs)
    params = posterior._match(model)  # posterior key -> parameter
    with torch.no_grad():
        out = _diag_last_layer_draws(model, posterior, params, x, n_samples, generator)
    if out is not None:
        return out
    names = {id(p): n for n, p in model.named_parameters()}
    per_sample = sum(p.numel() for p in params.values())
    chunk = max(1, min(n_samples, MC_BATCH_NUMBERS // max(per_sample, 1), MC_VMAP_INPUTS))
    if x.device.type == "cpu" and (per_sample > MC_VMAP_MAX_CPU
                                   or (x.numel() > MC_CONV_VMAP_NUMBERS and _samples_conv(model, params))):
        chunk = 1
    # a chunk of samples runs on inputs in pieces of at most MC_VMAP_INPUTS inputs × samples (the
    # inputs were not split before: 10,000 of them sent every sample through the whole network
    # alone, where under vmap the layers outside the posterior, e.g. a frozen backbone, run once)
    rows = max(1, MC_VMAP_INPUTS // chunk)
    if engine.coupled_modules(model):  # (BatchNorm normalising with the batch's statistics: x whole)
        rows = max(len(x), 1)
    outs, done, batched = [], 0, True
    with torch.no_grad():
        while done < n_samples:
            c = min(chunk, n_samples - done)
            draws = [posterior.sample(generator) for _ in range(c)]
            parts = None
            if c > 1 and batched:
                parts = []
                for i in range(0, max(len(x), 1), rows):
                    out = _vmapped(model, params, names, draws, x[i : i + rows])
                    if out is None:  # vmap cannot run this model: one draw at a time from here on
                        parts, batched = None, False
                        break
                    parts.append(out)
            if parts is None:
                outs.append(_one_at_a_time(model, posterior, draws, x))
            else:
                outs.append(torch.cat(parts, 1))
            done += c
    return torch.cat(outs)


def _samples_conv(model: nn.Module, params: dict) -> bool:
    """Whether the posterior samples a convolution's weight or bias. vmap runs a convolution whose
    weights differ per sample as one grouped convolution, which on CPU is slower than running the
    samples one at a time (``benchmarks/conv_mc_predictive.py``, 20 draws, one thread;
    docs/results/conv-mc-predictive.md): LeNet 1.3–2.3× at 32–2,000 inputs (512: 1.35 against
    0.63 s), the MNIST-1D CNN 3.7–4.1× from 512 inputs (2,000: 836 against 198 ms), though at 32
    inputs vmap is faster there (6 against 12 ms; at two threads 6 against 20 ms), so inputs of up
    to ``MC_CONV_VMAP_NUMBERS`` numbers in all stay batched. A frozen convolutional backbone under a sampled
    head keeps the batched path, where the backbone runs once (LeNet, 512 inputs: 62 against
    778 ms)."""
    ids = {id(p) for p in params.values()}
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    return any(id(p) in ids for m in convs for p in m.parameters())  # (a parametrized weight too)


def _diag_last_layer_draws(model, posterior, params, x, n_samples, generator):
    """A diagonal posterior over the weight and/or bias of one ``nn.Linear`` only (``ef.laplace(...,
    subset="last_layer")``): when that layer makes the model's output, the network runs once and
    each draw is one ``F.linear`` (:func:`effortless.posterior.kron.last_layer_draws`), the same
    draws as the batched path. None otherwise."""
    keys = {id(p): k for k, p in params.items()}
    if not keys:
        return None
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and set(keys) <= {id(m.weight), id(m.bias)}]  # fmt: skip
    if not found:
        return None
    name, module = found[0]
    wk, bk = keys.get(id(module.weight)), keys.get(id(module.bias))

    def draw():
        d = posterior.sample(generator)
        return (None if wk is None else d[wk]), (None if bk is None else d[bk])

    return kron.last_layer_draws(model, name, x, n_samples, draw)


def _vmapped(model, params, names, draws, x):
    """The outputs at ``draws`` (S, B, ...) through ``torch.func.vmap``; None where vmap cannot run
    the model (dropout in training mode, in-place ops, data-dependent control flow)."""
    from torch.func import functional_call, vmap

    stacked = {names[id(p)]: torch.stack([d[k] for d in draws]).to(p) for k, p in params.items()}
    fixed = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in stacked}
    try:
        return likelihoods.output(vmap(lambda th: functional_call(model, {**fixed, **th}, (x,)))(stacked))
    except (RuntimeError, ValueError, NotImplementedError):
        return None


def _one_at_a_time(model, posterior, draws, x):
    """The outputs at ``draws`` (S, B, ...): each loaded into the model, run, and restored."""
    outs = []
    for d in draws:
        with posterior.sampled(model, sample=d):
            outs.append(likelihoods.output(model(x)))
    return torch.stack(outs)


def _check_inputs(x, caller: str) -> None:
    """``x`` is one tensor of inputs: a DataLoader, a list of batches or a NumPy array failed with
    "'DataLoader' object has no attribute 'device'" or similar."""
    if not isinstance(x, torch.Tensor):
        hint = (" (for a loader, predict each batch and torch.cat the results)"
                if not hasattr(x, "__array__") else " (convert it with torch.as_tensor)")  # fmt: skip
        raise TypeError(f"{caller}: x must be a tensor of inputs, got {type(x).__name__}{hint}")


def _fitted_likelihood(posterior, likelihood, caller: str):
    """``likelihood``, or the posterior's recorded one when None; a mismatch is an error (a
    classification posterior's logits read as regression means, or softmax taken of a multi-output
    regression, gives numbers without complaint)."""
    fitted = getattr(posterior, "likelihood", None)
    if likelihood is None:
        return fitted or "classification"
    name = likelihoods.get(likelihood).name
    if fitted is not None and name != fitted:
        raise ValueError(
            f"{caller}: likelihood={name!r}, but the posterior was fitted with likelihood={fitted!r}; "
            "leave likelihood= out to use the posterior's"
        )
    return likelihood


@keep_buffers
def predict_samples(
    model: nn.Module,
    posterior: DiagGaussian | kron.KronLastLayer,
    x: torch.Tensor,
    n_samples: int = 32,
    method: str = "mc",
    generator: torch.Generator | None = None,
    bn_data=None,
) -> torch.Tensor:
    """Per-sample predictive log-probabilities, shape (N, C, S) (classification).

    The tensor acquisition functions (:mod:`effortless.active`), baal and batchbald_redux consume:
    ``log_probs[n, c, s] = log p(y = c | x_n, θ_s)``. ``method="mc"`` draws weights θ_s from the
    posterior, ``method="glm"`` the linearised network's outputs from their exact Gaussian (either
    for a ``DiagGaussian`` or a ``KronLastLayer``). With the same ``generator`` state,
    ``predict_samples(...).exp().mean(-1)`` equals :func:`predict` with the same method (and
    ``bn_data``, which recomputes BatchNorm's statistics for each sample, as there).

    Example:
        >>> import torch
        >>> import effortless as ef
        >>> model = torch.nn.Linear(4, 3)
        >>> q = ef.DiagGaussian.from_model(model, precision=100.0)
        >>> ef.predict_samples(model, q, torch.randn(5, 4), n_samples=7).shape
        torch.Size([5, 3, 7])
    """
    if method not in ("mc", "glm"):
        raise ValueError(f"method must be 'mc' or 'glm' (per-sample draws), got {method!r}")
    _check_inputs(x, "ef.predict_samples")
    if getattr(posterior, "likelihood", None) == "regression":
        raise ValueError(
            "ef.predict_samples gives classification log-probabilities; this posterior was fitted with "
            "likelihood='regression' (use ef.predict for its predictive mean and variance)"
        )
    _warn_active_dropout(model, "ef.predict_samples", "each draw also has its own dropout mask")
    bn_batches = _bn_argument(bn_data, method, model, posterior, x, "ef.predict_samples")
    if not is_count(n_samples):
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if method == "glm":
        if isinstance(posterior, kron.KronLastLayer):
            mean, cov = posterior.predictive_moments(model, x)
        else:
            with torch.enable_grad():
                mean, cov = predictive.linearised_moments(model, posterior, x)
        mean = likelihoods.as_2d(mean)  # (a (B,) output: refused below as one output)
        f = predictive.glm_logits(mean.detach(), cov.detach(), n_samples, generator)
    else:
        f = likelihoods._wide(_mc_outputs(model, posterior, x, n_samples, generator, bn_batches))
    if f.dim() == 3 and f.shape[-1] < 2:  # (the general message suggests a likelihood= it has not)
        raise ValueError(
            f"ef.predict_samples gives classification log-probabilities and needs at least 2 outputs "
            f"(one logit per class), got {f.shape[-1]}; for a regression model use ef.predict"
        )
    likelihoods._check_logits(f[0])
    return f.log_softmax(-1).permute(1, 2, 0)


# Curvature sources for the post-hoc Laplace fit: every model-side estimator, plus the exact
# Hessian diagonal. Each returns a batch sum per parameter name.
LAPLACE_HESSIANS = DIAGONAL  # hessian key -> per-batch diagonal estimator


def _check_finite(total: dict) -> None:
    bad = [n for n, t in total.items() if not bool(torch.isfinite(t).all())]
    if bad:  # (DiagGaussian would say "precision must be positive", which hides the cause)
        raise FloatingPointError(
            f"laplace: the curvature summed over the loader is not finite for {bad[0]!r}"
            f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}: NaN or inf in the model's "
            "weights, the inputs or the outputs"
        )


def _check_positive(prec: dict, hessian: str, delta) -> None:
    """A Gaussian needs a positive precision; the Hessian diagonal (and Hutchinson's estimate of
    it) can be negative where the loss is not convex (DiagGaussian said only "precision must be
    positive")."""
    bad = {n: p for n, p in prec.items() if not bool((p > 0).all())}
    if not bad:
        return
    n, p = next(iter(bad.items()))
    count = sum(int((p <= 0).sum()) for p in bad.values())
    d = f"{float(delta):.3g}" if isinstance(delta, (int, float)) else "δ"
    raise ValueError(
        f"laplace: the posterior precision (curvature + prior precision) is not positive in {count} "
        f"entries ({n!r}: down to {float(p.min()):.3g}): hessian={hessian!r} has negative diagonal "
        f"entries that the prior precision {d} does not outweigh (the Hessian is indefinite away from "
        "a minimum; Hutchinson's estimate is noisy too). Use hessian='ggn' (positive semi-definite by "
        "construction) or a larger prior_precision"
    )


def _laplace_tune_noise(model, loader, hessian, prior_precision, generator, params, progress, distributed,
                        product_dtype=None):  # fmt: skip
    """Diagonal Laplace for Gaussian regression with σ (and δ if "marglik") chosen by the evidence:
    the curvature is accumulated once at σ = 1 and rescaled (1/σ², or 1/σ⁴ for the empirical
    Fisher) inside the evidence, with the residual sum of squares from one forward pass."""
    lik1 = likelihoods.get("regression", 1.0)
    theta, total, _, rss, n_out = diagonal_sums(model, loader, hessian, lik1, generator, params, progress,
                                                distributed, product_dtype, residuals=True)  # fmt: skip
    if n_out == 0:
        raise ValueError("laplace: the loader yielded no data (on any rank)")
    _check_finite(total)
    mean = {n: p.detach().clone() for n, p in theta.items()}
    power = 4 if hessian == "efisher" else 2
    delta, sigma = evidence.tune_prior_and_noise(
        rss, n_out, mean, total, prior_precision, power, per_tensor=prior_precision == "marglik-layer"
    )
    prec = {n: t / sigma**power + (delta[n] if isinstance(delta, dict) else delta) for n, t in total.items()}
    _check_positive(prec, hessian, delta)
    prec = {n: t.to(mean[n].dtype) for n, t in prec.items()}  # (summed in float32 for 16-bit weights)
    if rss > 0 and sigma**2 > NOISE_INFLATION_WARN * rss / n_out:
        gamma = sum(float((t / sigma**power / p).sum()) for t, p in zip(total.values(), prec.values()))
        warnings.warn(
            f"laplace: the evidence's sigma_noise {sigma:.3g} is {sigma / (rss / n_out) ** 0.5:.1f}x the "
            f"residuals' root mean square: the diagonal curvature counts {gamma:.0f} effective parameters "
            f"for {n_out} outputs (it treats every weight's entry as if the GGN were diagonal), and "
            "sigma² = RSS/(n − γ) grows with them; the predictive is then too wide. The last-layer "
            "Kronecker fit (hessian='kfac', subset='last_layer') does not overcount; or pass sigma_noise",
            RuntimeWarning,
            stacklevel=outside_stacklevel(),
        )
    post = DiagGaussian(mean, prec)
    post.prior_precision = delta
    post.sigma_noise = sigma
    post.likelihood = "regression"
    return post


# _laplace_tune_noise warns when the evidence's σ² exceeds this multiple of the residuals' mean square
NOISE_INFLATION_WARN = 2.0


def laplace(
    model: nn.Module,
    loader: Iterable,
    likelihood: str = "classification",
    hessian: str = "ggn",
    prior_precision: float | str = 1.0,
    sigma_noise: float | str | None = None,
    generator: torch.Generator | None = None,
    params: Iterable[str] | None = None,
    progress: bool = False,
    subset: str | None = None,
    distributed: bool | None = None,
    product_dtype: torch.dtype | None = None,
):
    """Post-hoc Laplace approximation around the model's current weights.

    Diagonal: ``precision = Σ_data diag-curvature + prior_precision``, keyed like
    ``named_parameters()``.

    Args:
        hessian: one of ``LAPLACE_HESSIANS`` (``"ggn"``, ``"ggn-mc"``, ``"efisher"``,
            ``"hutchinson"``, ``"hessian"``).
        prior_precision: δ (float), or ``"marglik"`` / ``"marglik-layer"`` to choose a scalar /
            per-tensor δ by maximising the Laplace evidence (:mod:`effortless.posterior.evidence`;
            no extra pass over the data; ``"auto"``, BayesAdam's name for it, means ``"marglik"``).
            The value used is ``posterior.prior_precision``.
        sigma_noise: the regression noise σ (float; default 1), or ``"marglik"`` to choose it by
            the evidence together with δ (diagonal posteriors, and the last-layer KFAC one;
            ``posterior.sigma_noise`` is the value chosen, which :func:`predict` uses unless given
            another). Left unset for regression, one more forward pass over the loader measures the
            residuals, and a warning says when they put the noise more than √10× away from 1.
        params: restrict to these parameter names (others stay fixed at their values).
        subset: ``"last_layer"`` restricts to the output ``nn.Linear``, found by a forward pass on
            the first batch (the Linear whose output is the model's, else the last one called);
            with ``hessian="kfac"`` it returns a :class:`~effortless.posterior.kron.KronLastLayer`
            (Kronecker-factored precision, closed-form GLM predictive) instead of a
            ``DiagGaussian``.
        distributed: the loader is this rank's shard (e.g. with a ``DistributedSampler``): the
            curvature (diagonal sums, or the last-layer Kronecker factors) and data counts are
            all-reduced (one collective), so every rank gets the posterior of the whole data.
            ``None`` (default): when a process group of size > 1 is initialised.
        product_dtype: precision of the hook engine's extra products for ``"ggn"``,
            ``"ggn-mc"`` and ``"efisher"`` (e.g. ``torch.bfloat16``: each diagonal entry within
            about 1.5 % of the exact one, faster on CPUs with bf16 units; see
            :func:`~effortless.curvature.diag_ggn`). None (default): exact. Not for the
            last-layer KFAC fit, whose products are small.
    """
    sigma_given = sigma_noise is not None or isinstance(likelihood, likelihoods.Likelihood)
    sigma = 1.0 if sigma_noise is None else sigma_noise
    post = _laplace(model, loader, likelihood, hessian, prior_precision, sigma, generator, params, progress,
                    subset, distributed, product_dtype)  # fmt: skip
    if not sigma_given and post.likelihood == "regression":
        mean_sq = _residual_mean_square(model, loader, likelihoods.get("regression"))
        _check_default_noise("laplace", post.sigma_noise, mean_sq, "the residuals over the loader")
    return post


def _laplace(model, loader, likelihood, hessian, prior_precision, sigma_noise, generator, params, progress,
             subset, distributed, product_dtype):  # fmt: skip
    """:func:`laplace` with ``sigma_noise`` given (a float or "marglik")."""
    if subset not in (None, "all", "last_layer"):
        raise ValueError(f"subset must be None, 'all' or 'last_layer', got {subset!r}")
    _warn_active_dropout(model, "ef.laplace", "the curvature is that of randomly thinned networks")
    if hessian not in LAPLACE_HESSIANS:
        raise ValueError(f"hessian must be one of {sorted(LAPLACE_HESSIANS)}, got {hessian!r}")
    prior_precision = evidence.prior_choice(prior_precision)  # (every fit below)
    tune = prior_precision in evidence.TUNED
    if sigma_noise == "marglik":  # (before the fits)
        if likelihoods.get(likelihood).name != "regression":
            raise ValueError("sigma_noise='marglik' needs likelihood='regression'")
        if hessian == "kfac" and subset != "last_layer":
            raise ValueError("sigma_noise='marglik' with hessian='kfac' needs subset='last_layer' (for all "
                             "weights use a diagonal hessian such as 'ggn')")  # fmt: skip
    if subset == "last_layer":
        if params is not None:  # one of them would be ignored
            raise ValueError("pass either params= or subset='last_layer', not both")
        if hessian == "kfac":
            if product_dtype is not None:
                raise ValueError("product_dtype is not used by the last-layer KFAC fit (small products)")
            tune_noise = sigma_noise == "marglik"
            lik = likelihoods.get(likelihood, 1.0 if tune_noise else sigma_noise)
            post = kron.fit_last_layer(model, loader, lik, prior_precision, generator=generator,
                                       distributed=distributed, tune_noise=tune_noise)  # fmt: skip
            if lik.name == "regression" and not tune_noise:  # ef.predict's default σ (tuned: recorded)
                post.sigma_noise = lik.sigma_noise
            post.likelihood = lik.name
            return post
        first, loader = _peek(loader)
        if first is None:
            raise ValueError("laplace: the loader yielded no batches")
        name, layer = kron.last_linear(model, pair(first)[0].to(_device(model)))
        params = kron.param_names(name, layer)
    if sigma_noise == "marglik":
        return _laplace_tune_noise(model, loader, hessian, prior_precision, generator, params, progress,
                                   distributed, product_dtype)  # fmt: skip
    lik = likelihoods.get(likelihood, sigma_noise)
    theta, total, batches, _, _ = diagonal_sums(model, loader, hessian, lik, generator, params, progress,
                                                distributed, product_dtype)  # fmt: skip
    mean = {n: p.detach().clone() for n, p in theta.items()}
    if batches == 0:  # the precision would be the prior's alone, silently
        raise ValueError("laplace: the loader yielded no batches (on any rank)")
    _check_finite(total)
    if tune:
        per_tensor = prior_precision == "marglik-layer"
        # the NLL at the mode is a constant of δ: the evidence's maximiser does not need it (a
        # pass over the data fewer, and a one-shot iterator has no second pass)
        delta = evidence.tune_prior_precision(0.0, mean, total, per_tensor=per_tensor)
    else:
        delta = prior_precision
    prec = {n: t + (delta[n] if isinstance(delta, dict) else delta) for n, t in total.items()}
    _check_positive(prec, hessian, delta)
    prec = {n: t.to(mean[n].dtype) for n, t in prec.items()}  # (summed in float32 for 16-bit weights)
    post = DiagGaussian(mean, prec)
    post.prior_precision = delta  # the value used (tuned with "marglik")
    if lik.name == "regression":  # ef.predict's default σ (it used σ = 1 whatever the fit's)
        post.sigma_noise = lik.sigma_noise
    post.likelihood = lik.name  # ef.predict's default likelihood, and its check
    return post
