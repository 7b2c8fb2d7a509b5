"""A network with BatchNorm: ef.fit, then the MC predictive with each weight sample's own
BatchNorm statistics (bn_data=) against the running statistics of training.

Training normalises every sampled network with its batch's statistics; eval-mode BatchNorm uses
running statistics collected at other weights, which miscalibrates the MC predictive (ef.predict
warns). bn_data recomputes them for each sample from a few batches of training inputs.

    python examples/07_batchnorm.py [--quick]
"""

import sys
import warnings

import torch
from torch import nn

import effortless as ef
from effortless import data, metrics

quick = "--quick" in sys.argv
split = data.mnist1d(n=1000 if quick else 5000)
torch.manual_seed(0)
model = nn.Sequential(
    nn.Unflatten(1, (1, 40)),
    nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
    nn.Conv1d(16, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(2),
    nn.Flatten(), nn.Linear(32 * 10, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10),
)  # fmt: skip
loader = data.loader(split.x_train, split.y_train, batch_size=128)
# (ef.fit ends at the posterior mean and recomputes BatchNorm's statistics there)
posterior = ef.fit(model, loader, epochs=3 if quick else 30, progress=not quick)
model.eval()
x, y = split.x_test, split.y_test
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # the BatchNorm warning: shown side by side here
    stale = ef.predict(model, posterior, x, n_samples=16, generator=torch.Generator().manual_seed(0))
fresh = ef.predict(model, posterior, x, n_samples=16, generator=torch.Generator().manual_seed(0),
                   bn_data=split.x_train[:2048])  # fmt: skip
with torch.no_grad():
    mean = model(x).softmax(-1)
for name, p in (("MC, running statistics", stale), ("MC, bn_data", fresh), ("network at the mean", mean)):
    acc, nll, ece = metrics.accuracy(p, y), metrics.nll(p, y), metrics.ece(p, y)
    print(f"{name:24s} acc {acc:.3f}  NLL {nll:.3f}  ECE {ece:.3f}")
