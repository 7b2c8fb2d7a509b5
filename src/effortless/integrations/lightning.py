"""Lightning integration: BayesAdam works as is; this adds a callback that logs the posterior.

BayesAdam is a plain ``torch.optim.Optimizer``: return it from ``configure_optimizers``. In
automatic optimisation Lightning calls ``optimizer.step(closure)`` and BayesAdam runs the closure
(forward, ``zero_grad``, backward) inside :meth:`~effortless.BayesAdam.sampled_params`; in manual
optimisation, wrap ``self.manual_backward(loss)`` in ``with opt.optimizer.sampled_params():``.
Under ``strategy="ddp"`` each rank draws its own weight sample and the curvature is all-reduced
(see ``distributed=`` in BayesAdam); Lightning's checkpoints hold the full optimizer state, so a
resumed run continues exactly (set ``num_sanity_val_steps=0`` when you need bitwise resumption:
the sanity check's posterior samples would otherwise advance the sampler).
"""

from __future__ import annotations

import lightning as L
import torch

from .. import metrics
from ..optim import BayesAdam

__all__ = ["PosteriorMetrics"]


class PosteriorMetrics(L.Callback):
    """Log, after each validation epoch, the posterior predictive's NLL, ECE and accuracy (``n_samples``
    weight samples from the BayesAdam optimizer), the mean weight standard deviation, and the gain
    in NLL over the mean weights (``posterior/…`` keys; reduced over ranks under DDP).

    The module's ``forward`` must return logits; batches are ``(x, y)``.
    """

    def __init__(self, n_samples: int = 8):
        if not (isinstance(n_samples, int) and n_samples >= 1):
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        self.n_samples = n_samples
        self._probs, self._mean_probs, self._labels = [], [], []

    @staticmethod
    def _optimizer(trainer) -> BayesAdam:
        opts = [o for o in trainer.optimizers if isinstance(o, BayesAdam)]
        if not opts:
            raise ValueError("PosteriorMetrics needs a BayesAdam optimizer in configure_optimizers")
        return opts[0]

    def on_validation_epoch_start(self, trainer, pl_module):
        self._probs, self._mean_probs, self._labels = [], [], []

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.sanity_checking:
            return
        opt = self._optimizer(trainer)
        x, y = batch
        samples = []
        for _ in range(self.n_samples):
            with opt.sampled_params(train=False):
                samples.append(pl_module(x).softmax(-1))
        self._probs.append(torch.stack(samples).mean(0))
        self._mean_probs.append(pl_module(x).softmax(-1))
        self._labels.append(y)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not self._probs:
            return
        probs, mean_probs = torch.cat(self._probs), torch.cat(self._mean_probs)
        labels = torch.cat(self._labels)
        opt = self._optimizer(trainer)
        sd = torch.cat([v.reshape(-1) for v in opt.posterior().std.values()])
        nll = metrics.nll(probs, labels)
        logs = {
            "posterior/nll": nll,
            "posterior/ece": metrics.ece(probs, labels),
            "posterior/accuracy": metrics.accuracy(probs, labels),
            "posterior/nll_gain_over_mean": metrics.nll(mean_probs, labels) - nll,
            "posterior/mean_weight_std": float(sd.mean()),
        }
        pl_module.log_dict(logs, sync_dist=True)
