"""Post-hoc Laplace on a model trained with plain Adam: last-layer KFAC with the prior chosen by
the evidence, and the closed-form probit predictive; plus the free posterior from Adam's state.

    python examples/03_posthoc_laplace.py [--quick]
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
adam = torch.optim.Adam(model.parameters(), lr=1e-3)
for _epoch in range(2 if quick else 30):
    for x, y in loader:
        adam.zero_grad()
        F.cross_entropy(model(x), y).backward()
        adam.step()

with torch.no_grad():
    p_map = model(split.x_test).softmax(-1)
la = ef.laplace(
    model,
    data.loader(split.x_train, split.y_train, 512, shuffle=False),
    hessian="kfac",
    subset="last_layer",
    prior_precision="marglik",
)
p_la = ef.predict(model, la, split.x_test, method="probit")
q = ef.posterior_from_adam(model, adam, n_data=len(split.x_train), batch_size=128, prior_precision="marglik")
p_adam = ef.predict(model, q, split.x_test, method="probit")
for name, p in (("MAP", p_map), ("last-layer KFAC Laplace", p_la), ("posterior from Adam", p_adam)):
    print(f"{name:24s} NLL {metrics.nll(p, split.y_test):.3f}  ECE {metrics.ece(p, split.y_test):.3f}")
print(f"evidence-tuned prior precision: {la.prior_precision:.2f}")
