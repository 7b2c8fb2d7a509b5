import math

import pytest
import torch

from effortless import metrics


def test_hand_computed_values():
    probs = torch.tensor([[0.92, 0.08], [0.38, 0.62], [0.73, 0.27], [0.19, 0.81]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    assert metrics.accuracy(probs, labels) == 0.75
    expected_nll = -(math.log(0.92) + math.log(0.62) + math.log(0.27) + math.log(0.81)) / 4
    assert metrics.nll(probs, labels) == pytest.approx(expected_nll)
    assert metrics.brier(probs, labels) == pytest.approx((0.0128 + 0.2888 + 1.0658 + 0.0722) / 4)
    # 2 bins: all in [0.5, 1): mean confidence 0.77, accuracy 0.75
    assert metrics.ece(probs, labels, n_bins=2) == pytest.approx(0.02)
    # 10 bins: one prediction per bin; the third is wrong
    assert metrics.ece(probs, labels, n_bins=10) == pytest.approx((0.08 + 0.38 + 0.73 + 0.19) / 4)


def test_auroc_matches_sklearn_and_handles_ties():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    a = torch.rand(300, generator=g)
    b = torch.rand(200, generator=g) * 0.8
    a[:20] = 0.5
    b[:20] = 0.5  # ties
    labels = torch.cat([torch.ones(300), torch.zeros(200)])
    assert metrics.auroc(a, b) == pytest.approx(roc_auc_score(labels.numpy(), torch.cat([a, b]).numpy()))


def test_regression_metrics():
    mean = torch.tensor([0.0, 1.0])
    y = torch.tensor([1.0, 1.0])
    assert metrics.rmse(mean, y) == pytest.approx(math.sqrt(0.5))
    ref = -torch.distributions.Normal(mean, 2.0).log_prob(y).mean()
    assert metrics.gaussian_nll(mean, torch.full((2,), 4.0), y) == pytest.approx(float(ref))
