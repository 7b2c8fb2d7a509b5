"""Slow: BayesAdam with only ``n_data`` set against Adam (lr 1e-3) at the same epochs.

The issue's goal: accuracy within 1 point of Adam and better NLL and ECE, on several tasks.
Same initialisation, data order and epochs for both (effortless.experiments.train). Run with
``pytest -m slow``. Where the goal is not met today the test is marked xfail with the measured
numbers (not strict: these are single-seed quality measurements, and a tie can flip).
"""

import pytest
import torch

from effortless import data
from effortless.experiments.train import evaluate, train
from effortless.models import MLP, LeNet

pytestmark = pytest.mark.slow


def _compare(split, make, epochs, batch_size):
    torch.set_num_threads(2)
    rows = {}
    for method in ("map", "bayesadam"):
        run = train(method, make, split, epochs=epochs, batch_size=batch_size, progress=False)
        rows[method] = evaluate(run, split)
    return rows["map"], rows["bayesadam"]


def _assert_goal(adam, bayes):
    msg = f"Adam {adam}\nBayesAdam {bayes}"
    assert bayes["accuracy"] >= adam["accuracy"] - 0.01, msg
    assert bayes["nll"] < adam["nll"], msg
    assert bayes["ece"] < adam["ece"], msg


@pytest.mark.xfail(reason="measured: Adam 87.20 % / NLL 0.3512 / ECE 1.79 %, BayesAdam 87.33 % / 0.3518 / "
                   "1.04 %: NLL tied, not better")
def test_fashion_mnist_mlp():
    split = data.fashion_mnist()
    _assert_goal(*_compare(split, lambda: MLP(784, [512, 256], 10), epochs=5, batch_size=128))


@pytest.mark.xfail(reason="measured: Adam 86.46 % / NLL 0.3738 / ECE 0.57 %, BayesAdam 86.39 % / 0.3688 / "
                   "0.77 %: ECE not better")
def test_fashion_mnist_lenet():
    split = data.fashion_mnist()
    _assert_goal(*_compare(split, lambda: LeNet(), epochs=3, batch_size=128))


def test_mnist1d_mlp():
    split = data.mnist1d()
    _assert_goal(*_compare(split, lambda: MLP(40, [256, 256], 10), epochs=30, batch_size=128))


def test_digits_mlp():
    split = data.tabular("digits")
    _assert_goal(*_compare(split, lambda: MLP(64, [64, 64], 10), epochs=50, batch_size=32))


@pytest.mark.xfail(reason="measured: Adam NLL 0.024 / ECE 1.7 %; BayesAdam worse on both (T = 0.03)")
def test_breast_cancer_mlp():
    split = data.tabular("breast_cancer")
    _assert_goal(*_compare(split, lambda: MLP(30, [64, 64], 2), epochs=50, batch_size=32))
