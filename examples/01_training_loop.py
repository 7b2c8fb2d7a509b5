"""BayesAdam in a plain PyTorch training loop, then a calibrated predictive.

python examples/01_training_loop.py [--quick]
"""

import sys

import torch
import torch.nn.functional as F

import effortless as ef
from effortless import data, metrics
from effortless.models import MLP

quick = "--quick" in sys.argv
split = data.mnist1d(n=1000 if quick else 5000)
loader = data.loader(split.x_train, split.y_train, batch_size=128)
torch.manual_seed(0)
model = MLP(40, [256, 256], 10)
opt = ef.BayesAdam(model.named_parameters(), n_data=len(split.x_train))  # only n_data is needed

for _epoch in range(2 if quick else 30):
    for x, y in loader:
        opt.zero_grad()
        with opt.sampled_params(train=True):  # weights <- a posterior sample, restored on exit
            F.cross_entropy(model(x), y).backward()
        opt.step()

posterior = opt.posterior()
probs = ef.predict(model, posterior, split.x_test, n_samples=32, generator=torch.Generator().manual_seed(0))
print(
    f"accuracy {metrics.accuracy(probs, split.y_test):.3f}  NLL {metrics.nll(probs, split.y_test):.3f}  "
    f"ECE {metrics.ece(probs, split.y_test):.3f}"
)
