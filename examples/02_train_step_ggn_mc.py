"""BayesAdam with a curvature estimator that needs the model's outputs (the Monte-Carlo GGN),
through `train_step`, which shares the training forward/backward with the curvature engine.

    python examples/02_train_step_ggn_mc.py [--quick]
"""

import sys

import torch

import effortless as ef
from effortless import data, metrics
from effortless.models import MLP

quick = "--quick" in sys.argv
split = data.mnist1d(n=1000 if quick else 5000)
loader = data.loader(split.x_train, split.y_train, batch_size=128)
torch.manual_seed(0)
model = MLP(40, [256, 256], 10)
print("curvature path:", ef.curvature.plan(model))
opt = ef.BayesAdam(model.named_parameters(), n_data=len(split.x_train), hessian="ggn-mc")
for _epoch in range(2 if quick else 30):
    for x, y in loader:
        loss = opt.train_step(model, x, y, likelihood="classification")

probs = ef.predict(model, opt.posterior(), split.x_test, method="probit")  # linearised, closed form
print(
    f"last loss {float(loss):.3f}  accuracy {metrics.accuracy(probs, split.y_test):.3f}  "
    f"NLL {metrics.nll(probs, split.y_test):.3f}"
)
