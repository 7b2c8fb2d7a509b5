"""Lightning integration: BayesAdam works as is; this adds a callback that logs the posterior.

BayesAdam is a plain ``torch.optim.Optimizer``: return it from ``configure_optimizers``. In
automatic optimisation Lightning calls ``optimizer.step(closure)`` and BayesAdam runs the closure
(forward, ``zero_grad``, backward) inside :meth:`~effortless.BayesAdam.sampled_params`; in manual
optimisation, wrap ``self.manual_backward(loss)`` in ``with opt.optimizer.sampled_params():``.
Under ``strategy="ddp"`` each rank draws its own weight sample and the curvature is all-reduced
(see ``distributed=`` in BayesAdam); Lightning's checkpoints hold the full optimizer state, so a
resumed run continues exactly.
"""

from __future__ import annotations

import lightning as L
import torch

from .. import metrics
from .._checks import is_count
from ..api import predict
from ..optim import BayesAdam

__all__ = ["PosteriorMetrics"]


class PosteriorMetrics(L.Callback):
    """Log, after each validation epoch, the posterior predictive's NLL, ECE and accuracy (``n_samples``
    weight samples from the BayesAdam optimizer's posterior), the mean weight standard deviation,
    and the gain in NLL over the network at the posterior's mean (the averaged means; ``posterior/…``
    keys). Under DDP each rank predicts its shard and the ranks' sums (NLL, correct, count, the ECE's
    per-bin confidence and accuracy sums) are added in one collective, so the logged numbers are
    those of the whole validation set (shards of any size; before, the ranks' ECEs were averaged,
    which is above the pooled ECE).

    The samples come from the callback's own generator (seeded by ``seed``), not the optimizer's:
    adding the callback leaves training bitwise as it was (it drew from the optimizer's sampler
    before, which changed every later training sample).

    With several validation dataloaders each gets its own metrics, keyed as Lightning keys
    ``self.log`` there (``posterior/nll/dataloader_idx_1``, …; before, all were pooled into one).

    The module's ``forward`` must return logits; batches are ``(x, y)``. For a network with
    BatchNorm pass ``bn_data`` (a tensor of a few hundred to a few thousand training inputs): each
    weight sample then predicts with BatchNorm statistics recomputed at its weights (see
    :func:`effortless.predict`; it costs a forward pass over ``bn_data`` per sample and validation
    batch), without it the logged predictive uses statistics of other weights.
    """

    def __init__(self, n_samples: int = 8, seed: int = 0, bn_data: torch.Tensor | None = None):
        if not is_count(n_samples):
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        if bn_data is not None and not isinstance(bn_data, torch.Tensor):
            raise TypeError(f"bn_data must be a tensor of training inputs, got {type(bn_data).__name__}")
        self.n_samples = n_samples
        self.seed = seed
        self.bn_data = bn_data
        self._seen: dict[int, tuple[list, list, list]] = {}  # dataloader → (probs, probs at the mean, labels)
        self._post, self._gen, self._bn = None, None, None

    @staticmethod
    def _optimizer(trainer) -> BayesAdam:
        opts = [o for o in trainer.optimizers if isinstance(o, BayesAdam)]
        if not opts:
            raise ValueError("PosteriorMetrics needs a BayesAdam optimizer in configure_optimizers")
        return opts[0]

    def on_validation_epoch_start(self, trainer, pl_module):
        self._seen = {}
        if trainer.sanity_checking:
            return
        self._post = self._optimizer(trainer).posterior()
        self._gen = torch.Generator().manual_seed(self.seed + trainer.global_step)
        self._bn = None if self.bn_data is None else self.bn_data.to(pl_module.device)  # (once an epoch)

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        x, y = batch
        probs, at_mean, labels = self._seen.setdefault(dataloader_idx, ([], [], []))
        probs.append(predict(pl_module, self._post, x, n_samples=self.n_samples, generator=self._gen,
                             bn_data=self._bn))  # fmt: skip
        with self._post.mean_loaded(pl_module):  # the posterior's mean: the averaged means, not μ
            at_mean.append(pl_module(x).softmax(-1))
        labels.append(y)

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self._post is None:
            return
        sd = torch.cat([v.reshape(-1) for v in self._post.std.values()])
        self._post = None
        loaders = max(len(trainer.num_val_batches), 1)
        # each loader's sums over this rank's batches, summed over the ranks: the pooled metrics
        # (a rank with no batches of a loader adds zeros; every rank joins the one collective)
        sums = torch.stack([_sums(*self._seen.get(idx, ([], [], []))) for idx in range(loaders)])
        if trainer.world_size > 1:  # (the collective's device: NCCL's is the GPU; float64 stays off MPS)
            sums = sums.to(pl_module.device)
        sums = trainer.strategy.reduce(sums, reduce_op="sum").double().cpu()
        self._seen = {}
        logs = {"posterior/mean_weight_std": float(sd.mean())}
        for idx, row in enumerate(sums):
            nll, nll_at_mean, correct, n = row[:4].tolist()
            if n == 0:
                continue
            conf, acc = row[4 : 4 + N_BINS], row[4 + N_BINS :]
            suffix = f"/dataloader_idx_{idx}" if loaders > 1 else ""
            logs |= {
                f"posterior/nll{suffix}": nll / n,
                f"posterior/ece{suffix}": float((conf - acc).abs().sum()) / n,
                f"posterior/accuracy{suffix}": correct / n,
                f"posterior/nll_gain_over_mean{suffix}": (nll_at_mean - nll) / n,
            }
        # (the values are already the same on every rank; sync_dist averages equal numbers and
        # keeps Lightning from warning about unsynced epoch-level logs)
        pl_module.log_dict(logs, sync_dist=True, add_dataloader_idx=False)  # (the keys carry it)


N_BINS = 15  # the callback's ECE bins (metrics.ece's default)


def _sums(probs: list, at_mean: list, labels: list) -> torch.Tensor:
    """One loader's statistics over this rank's batches, in float64 sums that add over ranks:
    Σ NLL, Σ NLL at the mean, number correct, count, then per equal-width bin Σ confidence and Σ
    correct (the ECE of the union is Σ_b |Σ conf − Σ correct| / N)."""
    if not labels:
        return torch.zeros(4 + 2 * N_BINS, dtype=torch.float64)
    probs, at_mean, labels = torch.cat(probs), torch.cat(at_mean), torch.cat(labels)
    n = len(labels)
    conf, acc, _ = metrics.calibration_sums(probs, labels, N_BINS)
    head = [metrics.nll(probs, labels) * n, metrics.nll(at_mean, labels) * n,
            metrics.accuracy(probs, labels) * n, float(n)]  # fmt: skip
    return torch.cat([torch.tensor(head, dtype=torch.float64), conf, acc])
