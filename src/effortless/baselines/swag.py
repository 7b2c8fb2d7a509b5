"""``swag``: SWAG (Maddox et al. 2019): a Gaussian fitted to the iterates of the optimizer.

Weights are snapshotted ``snapshots`` times, evenly, during the last epoch of training (the same
epochs as MAP, so its cost is MAP's plus the snapshots). With the snapshot mean θ̄, the diagonal
variance ``diag = mean θ² − θ̄²`` and the matrix ``D`` of the last ``rank`` deviations θ_i − θ̄,
a sample is ``θ̄ + √(diag/2) z₁ + D z₂ / √(2(K − 1))`` (z₁ ~ N(0, I_P), z₂ ~ N(0, I_K)), i.e. the
covariance ``diag/2 + D Dᵀ / (2(K − 1))``. The original uses SGD with a constant learning rate;
here the iterates are Adam's (lr 1e-3), as the rest of the benchmark trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._weights import weights_changed
from ._common import Fitted, train_loop


class SWAG:
    """The SWAG posterior from weight snapshots (flat vectors over the model's parameters)."""

    def __init__(self, model: torch.nn.Module, rank: int = 20):
        if rank < 2:
            raise ValueError(f"rank must be >= 2, got {rank}")
        self.model, self.rank = model, rank
        self.n = 0
        flat = self._flat()
        self.mean = torch.zeros_like(flat, dtype=torch.float64)
        self.sq_mean = torch.zeros_like(flat, dtype=torch.float64)
        self.deviations: list[torch.Tensor] = []

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    @torch.no_grad()
    def collect(self) -> None:
        w = self._flat().double()
        self.n += 1
        self.mean += (w - self.mean) / self.n
        self.sq_mean += (w.pow(2) - self.sq_mean) / self.n
        self.deviations.append(w - self.mean)
        self.deviations = self.deviations[-self.rank :]

    @property
    def diag(self) -> torch.Tensor:
        return (self.sq_mean - self.mean.pow(2)).clamp_min(1e-30)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.n < 2:
            raise ValueError("SWAG needs at least 2 snapshots")
        dev = self.mean.device  # (drawn on the generator's device, used on the weights')
        z1 = torch.randn(self.mean.shape, generator=generator, dtype=torch.float64).to(dev)
        out = self.mean + (self.diag / 2).sqrt() * z1
        k = len(self.deviations)
        if k >= 2:
            D = torch.stack(self.deviations, 1)  # (P, K)
            z2 = torch.randn(k, generator=generator, dtype=torch.float64).to(dev)
            out = out + D @ z2 / (2 * (k - 1)) ** 0.5
        return out

    @torch.no_grad()
    def load(self, flat: torch.Tensor) -> None:
        i = 0
        for p in self.model.parameters():
            p.copy_(flat[i : i + p.numel()].view_as(p).to(p.dtype))
            i += p.numel()
        weights_changed()


def fit(task, split, seed, epochs, progress, snapshots=20, rank=20, samples=30) -> Fitted:
    torch.manual_seed(seed)
    model = task.model(0.0).to(split.x_train.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    per_epoch = -(-len(split.x_train) // task.batch_size)  # batches per epoch (the last may be short)
    every = max(1, per_epoch // snapshots)
    swag = SWAG(model, rank=rank)

    def one_step(x, y):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    def snapshot(epoch, i):  # evenly through the last epoch (inside the timing: SWAG's own cost)
        if epoch == epochs - 1 and (i + 1) % every == 0:
            swag.collect()
        if epoch == epochs - 1 and i == per_epoch - 1 and swag.n < 2:  # a very short last epoch:
            swag.collect()  # take the final weights twice at least
            swag.collect()

    model.train()
    seconds, step_ms, peak, history = train_loop(one_step, model, opt, split, task.batch_size, seed, epochs,
                                                 snapshot)  # fmt: skip
    final = swag._flat().clone()

    def predict(x):
        gen = torch.Generator().manual_seed(seed)
        model.eval()
        out = 0
        with torch.no_grad():
            for _ in range(samples):
                swag.load(swag.sample(gen))
                out = out + torch.cat([model(x[i : i + 2000]).softmax(-1) for i in range(0, len(x), 2000)])
            swag.load(final)
        return out / samples

    return Fitted(predict, seconds, step_ms, peak, history)
