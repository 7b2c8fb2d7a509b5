"""Regression with uncertainty bands: BayesAdam through `ef.fit` on 1-D data with a gap, and the
predictive mean ± 2 std plotted to regression_bands.png.

    python examples/04_regression_bands.py [--quick]
"""

import sys

import torch

import effortless as ef
from effortless import data
from effortless.experiments import plots

quick = "--quick" in sys.argv
split = data.toy_regression()
loader = data.loader(split.x_train, split.y_train, batch_size=32)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(1, 50), torch.nn.Tanh(), torch.nn.Linear(50, 50), torch.nn.Tanh(), torch.nn.Linear(50, 1)
)
posterior = ef.fit(
    model,
    loader,
    likelihood="regression",
    sigma_noise=0.1,
    epochs=20 if quick else 400,
    temperature=1.0,
    lr=1e-2,
    progress=not quick,
)
mean, var = ef.predict(model, posterior, split.x_test, likelihood="regression", sigma_noise=0.1, method="glm")
plots.regression_band(
    split.x_train,
    split.y_train,
    split.x_test,
    {"BayesAdam (GLM predictive)": (mean, var.sqrt())},
    "regression_bands.png",
    truth=split.y_test,
)
gap = split.x_test[:, 0].abs() < 0.8
print(
    f"predictive std: in the gap {float(var[gap].sqrt().mean()):.3f}, near data "
    f"{float(var[(split.x_test[:, 0].abs() > 1.2) & (split.x_test[:, 0].abs() < 2.8)].sqrt().mean()):.3f}"
)
print("wrote regression_bands.png")
