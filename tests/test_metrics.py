import math

import numpy as np
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


def _ood_scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(400, generator=g) * 0.7 + 0.3
    b = torch.rand(300, generator=g) * 0.8
    a[:30] = 0.5
    b[:30] = 0.5  # ties across the two sets
    return a, b


def test_aupr_matches_sklearn_average_precision():
    from sklearn.metrics import average_precision_score

    a, b = _ood_scores()
    labels = torch.cat([torch.ones(len(a)), torch.zeros(len(b))])
    ref = average_precision_score(labels.numpy(), torch.cat([a, b]).numpy())
    assert metrics.aupr(a, b) == pytest.approx(ref, abs=1e-12)


def test_fpr_at_95_tpr_by_hand():
    a = torch.arange(1, 101, dtype=torch.float64)  # in-distribution scores 1..100
    b = torch.tensor([2.0, 5.0, 6.0, 50.0])
    # the highest threshold keeping 95 of the 100 in-scores is 6: 6 and 50 pass
    assert metrics.fpr_at_tpr(a, b, 0.95) == pytest.approx(0.5)
    # keeping 3 of 4 in-scores {1, 2, 3, 4} (tpr 0.7 -> 3) takes threshold 2: b = 2 passes, 1.5 not
    assert metrics.fpr_at_tpr(a[:4], torch.tensor([1.5, 2.0]), 0.7) == 0.5


def test_fpr_at_tpr_is_the_roc_curves_lowest_fpr_at_that_tpr():
    """Small sets with ties, where a quantile of the in-scores (interpolated between two of them)
    kept fewer than ``tpr`` of them: it disagreed with the ROC curve on 15 % of these cases."""
    from sklearn.metrics import roc_curve

    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n_in, n_out, levels = (
            int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 60), (1, 60), (2, 20))
        )
        a = torch.randint(0, levels, (n_in,), generator=g).double()
        b = torch.randint(0, levels, (n_out,), generator=g).double() - 1
        tpr = 0.01 + 0.99 * float(torch.rand(1, generator=g))
        labels = torch.cat([torch.ones(n_in), torch.zeros(n_out)]).numpy()
        fpr_curve, tpr_curve, _ = roc_curve(labels, torch.cat([a, b]).numpy(), drop_intermediate=False)
        assert metrics.fpr_at_tpr(a, b, tpr) == pytest.approx(
            fpr_curve[tpr_curve >= tpr - 1e-12].min(), abs=1e-12
        )
    a = torch.arange(60, dtype=torch.float64)  # 0.95 * 60 is 57.000000000000007 in floats: still 57 kept
    assert metrics.fpr_at_tpr(a, torch.tensor([2.5, 3.0]), 0.95) == 0.5


def test_adaptive_ece_and_mce_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    # equal-mass bins of two: {0.6, 0.7} acc 1.0 conf 0.65; {0.8, 0.9} acc 0.5 conf 0.85
    assert metrics.ece(probs, labels, n_bins=2, adaptive=True) == pytest.approx((0.35 + 0.35) / 2)
    # equal-width bins of 0.1: |0.6-1|, |0.7-1|, |0.8-0|, |0.9-1| -> max 0.8
    assert metrics.mce(probs, labels, n_bins=10) == pytest.approx(0.8)


def test_aurc_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])  # correct, wrong, correct in order of confidence
    assert metrics.aurc(probs, labels) == pytest.approx((0 + 1 / 2 + 1 / 3) / 3)


def test_aurc_and_adaptive_ece_do_not_depend_on_the_order_of_tied_confidences():
    """Saturated float32 probabilities tie at exactly 1: the risk at a tie was the stable sort's
    (the inputs' order) and an equal-mass bin edge could split a tie by it. AURC is the mean over
    the ties' orderings (brute force over all permutations); both are invariant to shuffling."""
    import itertools

    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        n = int(torch.randint(1, 7, (1,), generator=g))
        conf = torch.randint(5, 9, (n,), generator=g).double() / 10
        probs, labels = torch.stack([conf, 1 - conf], 1), torch.randint(0, 2, (n,), generator=g)
        runs = []
        for perm in itertools.permutations(range(n)):
            p, y = probs[list(perm)], labels[list(perm)]
            o = torch.argsort(p.max(-1).values, descending=True, stable=True)
            wrong = (p.argmax(-1)[o] != y[o]).double()
            runs.append(float((wrong.cumsum(0) / torch.arange(1, n + 1)).mean()))
        assert metrics.aurc(probs, labels) == pytest.approx(sum(runs) / len(runs), abs=1e-12)
    conf = torch.tensor([1.0] * 6 + [0.9, 0.8, 0.7, 0.6])  # six tied at 1, half of them wrong
    probs, labels = torch.stack([conf, 1 - conf], 1), torch.tensor([0, 1, 0, 1, 0, 1, 0, 0, 1, 0])
    for _ in range(5):
        perm = torch.randperm(10, generator=g)
        assert metrics.aurc(probs[perm], labels[perm]) == pytest.approx(
            metrics.aurc(probs, labels), abs=1e-12
        )
        assert metrics.ece(probs[perm], labels[perm], n_bins=4, adaptive=True) == pytest.approx(
            metrics.ece(probs, labels, n_bins=4, adaptive=True), abs=1e-12
        )
    # ranks by rising confidence: 0.6, 0.7 (wrong), 0.8 in bin 0 (rank·4 // 10); 0.9 at rank 3 and
    # the tie from rank 4 in bin 1 (a rank-order split would have put two of the six in bin 2 and
    # two in bin 3): |3·0.7 − 2| + |6.9 − 4| over 10
    assert metrics.ece(probs, labels, n_bins=4, adaptive=True) == pytest.approx((0.1 + 2.9) / 10)


def test_entropy_and_mutual_information():
    agree = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])  # (S=2, B=1, C=2)
    disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert float(metrics.mutual_information(agree)) == pytest.approx(0.0, abs=1e-12)
    assert float(metrics.mutual_information(disagree)) == pytest.approx(math.log(2))
    assert float(metrics.entropy(torch.tensor([[0.5, 0.5]]))) == pytest.approx(math.log(2))


def test_regression_calibration_metrics():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(20000, generator=g, dtype=torch.float64)
    mean, var = torch.zeros_like(y), torch.ones_like(y)
    assert metrics.picp(mean, var, y, 0.95) == pytest.approx(0.95, abs=0.01)
    assert metrics.quantile_calibration_error(mean, var, y) < 0.01
    assert metrics.quantile_calibration_error(mean, 4 * var, y) > 0.1  # too wide: miscalibrated


def _classification_case(n=3000, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    probs = logits.softmax(-1)
    # labels drawn from a sharpened version: the model is miscalibrated, so ECE is far from 0
    labels = torch.multinomial((3 * logits).softmax(-1), 1, generator=g).squeeze(-1)
    return probs, labels


def test_classification_metrics_match_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, labels = _classification_case()
    c = probs.shape[1]
    assert metrics.accuracy(probs, labels) == pytest.approx(
        float(tm.multiclass_accuracy(probs, labels, num_classes=c, average="micro")), abs=1e-6)  # fmt: skip
    for n_bins in (10, 15):
        ref = float(tm.multiclass_calibration_error(probs, labels, num_classes=c, n_bins=n_bins, norm="l1"))
        assert metrics.ece(probs, labels, n_bins=n_bins) == pytest.approx(ref, rel=1e-6)
        ref_max = float(tm.multiclass_calibration_error(probs, labels, num_classes=c, n_bins=n_bins,
                                                        norm="max"))  # fmt: skip
        assert metrics.mce(probs, labels, n_bins=n_bins) == pytest.approx(ref_max, rel=1e-6)
    assert metrics.ece(probs, labels) > 0.05  # the case is miscalibrated: a real comparison
    nll = torch.nn.functional.nll_loss(probs.log(), labels)
    assert metrics.nll(probs, labels) == pytest.approx(float(nll), rel=1e-9)


def test_ood_metrics_match_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.classification")
    a, b = _ood_scores()
    scores = torch.cat([a, b])
    target = torch.cat([torch.ones_like(a), torch.zeros_like(b)]).long()  # in-distribution is positive
    assert metrics.auroc(a, b) == pytest.approx(float(tm.binary_auroc(scores, target)), rel=1e-6)
    assert metrics.aupr(a, b) == pytest.approx(float(tm.binary_average_precision(scores, target)), rel=1e-6)
    fpr, tpr, _ = tm.binary_roc(scores, target)
    ref = float(fpr[tpr >= 0.95].min())
    assert metrics.fpr_at_tpr(a, b, 0.95) == pytest.approx(ref, abs=1e-7)


def test_classification_report_ood_scores():
    probs_in = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.6, 0.3, 0.1]], dtype=torch.float64)
    probs_out = torch.tensor([[0.4, 0.3, 0.3], [0.7, 0.2, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    r = metrics.classification_report(probs_in, labels, probs_out)
    # max-prob in: .9 .8 .6, out: .4 .7 -> pairs won 3 + 2 + 1 of 6
    assert r["ood_auroc"] == pytest.approx(5 / 6)
    ent = lambda p: -(p * p.log()).sum(-1)  # noqa: E731
    won = sum(float(a < b) for a in ent(probs_in) for b in ent(probs_out))
    assert r["ood_auroc_entropy"] == pytest.approx(won / 6)
    assert r["ood_fpr95"] == pytest.approx(0.5)  # keeping all in-distribution (>= .6) admits 0.7
    assert 0 < r["ood_aupr"] <= 1
    assert "ood_auroc" not in metrics.classification_report(probs_in, labels)


def test_inputs_that_would_broadcast_or_are_not_probabilities_are_refused():
    """(N, 1) labels against (N,) predictions compare as an (N, N) matrix, a (N, 1) regression
    mean against (N,) targets too, and logits pass for probabilities: each gave a number, silently
    wrong (accuracy 0.5 for a perfect classifier below)."""
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    labels = torch.tensor([0, 1])
    assert metrics.accuracy(probs, labels) == 1.0
    assert float((probs.argmax(-1) == labels[:, None]).double().mean()) == 0.5  # what broadcasting gave
    for f in (metrics.accuracy, metrics.nll, metrics.ece, metrics.brier, metrics.aurc):
        with pytest.raises(ValueError, match="labels must have shape"):
            f(probs, labels[:, None])
        with pytest.raises(ValueError, match="logits"):
            f(torch.tensor([[2.0, -1.0], [0.5, 1.5]]), labels)
        with pytest.raises(ValueError, match="integer"):
            f(probs, labels.float())
        with pytest.raises(ValueError, match="lie in"):
            f(probs, torch.tensor([0, 2]))
        with pytest.raises(ValueError, match="NaN"):
            f(torch.tensor([[float("nan"), 1.0], [0.2, 0.8]]), labels)
    assert metrics.nll(probs.half(), labels) == pytest.approx(metrics.nll(probs, labels), rel=3e-3)
    mean, y, var = torch.zeros(4, 1), torch.tensor([0.0, 1.0, 2.0, 3.0]), torch.ones(4, 1)
    assert metrics.rmse(mean.reshape(-1), y) == pytest.approx(math.sqrt(3.5))
    with_var = (metrics.gaussian_nll, metrics.picp, metrics.quantile_calibration_error)
    for f in (metrics.rmse, *(lambda m, t, g=g: g(m, var, t) for g in with_var)):
        with pytest.raises(ValueError, match="same shape"):
            f(mean, y)
    with pytest.raises(ValueError, match="positive"):
        metrics.gaussian_nll(y, torch.tensor([1.0, 0.0, 1.0, 1.0]), y)
    with pytest.raises(ValueError, match="var"):
        metrics.picp(y, torch.ones(2), y)
    for f in (metrics.auroc, metrics.aupr, metrics.fpr_at_tpr):
        with pytest.raises(ValueError, match="NaN"):
            f(torch.tensor([0.9, float("nan")]), torch.tensor([0.1]))
        with pytest.raises(ValueError, match="1-D"):
            f(torch.rand(3, 1), torch.rand(3))
        with pytest.raises(ValueError, match="empty"):
            f(torch.rand(3), torch.rand(0))
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="n_bins"):
            metrics.ece(probs, labels, n_bins=bad)
    with pytest.raises(ValueError, match="tpr"):
        metrics.fpr_at_tpr(torch.rand(5), torch.rand(5), tpr=1.5)


def test_ece_floor_is_the_ece_of_labels_drawn_from_the_predictions():
    """The floor is E[ECE] when labels come from the predictive itself (a calibrated predictor):
    it matches the mean ECE over label sets drawn from the probabilities, shrinks like 1/√N with
    the test set, and is zero for certain predictions."""
    g = torch.Generator().manual_seed(0)

    def probs_for(n):
        return (2.0 * torch.randn(n, 4, generator=g, dtype=torch.float64)).softmax(-1)

    p = probs_for(200)
    draws = [metrics.ece(p, torch.multinomial(p, 1, generator=g).squeeze(1)) for _ in range(2000)]
    mean, se = sum(draws) / len(draws), torch.tensor(draws).std().item() / math.sqrt(len(draws))
    floor = metrics.ece_floor(p, n_draws=2000, generator=torch.Generator().manual_seed(1))
    assert abs(floor - mean) < 4 * se * math.sqrt(2)  # two independent estimates of one expectation
    assert floor > 0.03  # 200 points in 15 bins: a few points of ECE from the bins' noise alone
    small = metrics.ece_floor(probs_for(250), n_draws=300, generator=g)
    large = metrics.ece_floor(probs_for(4000), n_draws=300, generator=g)
    assert 2.5 < small / large < 6  # √16 = 4
    for adaptive in (False, True):  # exactly ECE's mean over the same draws, made into labels
        conf, pred = p.max(-1)
        right = torch.rand(50, 200, generator=torch.Generator().manual_seed(7), dtype=torch.float64) < conf
        by_hand = sum(metrics.ece(p, torch.where(r, pred, (pred + 1) % 4), adaptive=adaptive) for r in right)
        got = metrics.ece_floor(p, adaptive=adaptive, n_draws=50, generator=torch.Generator().manual_seed(7))
        assert got == pytest.approx(by_hand / 50, rel=1e-12)
    certain = torch.nn.functional.one_hot(torch.arange(5) % 3, 3).double()
    assert metrics.ece_floor(certain, n_draws=10) == 0.0
    with pytest.raises(ValueError, match="n_draws"):
        metrics.ece_floor(p, n_draws=0)
    with pytest.raises(ValueError, match="probs"):
        metrics.ece_floor(p.log())


def test_regression_metric_settings_out_of_range_are_refused():
    mean, var, y = torch.zeros(50), torch.ones(50), torch.linspace(-3, 3, 50)
    for level in (95, 0, 1.0, -0.5, True):  # 95 (meaning 95 %) gave a coverage of 0.0
        with pytest.raises(ValueError, match="level must be a fraction"):
            metrics.picp(mean, var, y, level)
    for n in (0, 2.5, True):  # 0 gave NaN
        with pytest.raises(ValueError, match="n_levels must be"):
            metrics.quantile_calibration_error(mean, var, y, n_levels=n)
    for scale in (0.0, -1.0, float("inf")):  # were "math domain error"
        with pytest.raises(ValueError, match="y_scale must be"):
            metrics.regression_report(mean, var, y, y_scale=scale)
    assert metrics.picp(mean, var, y, np.float32(0.5)) == pytest.approx(metrics.picp(mean, var, y, 0.5))


def test_labels_of_every_integer_width_give_the_int64_values():
    """uint8 labels (as IDX files and torchvision's MNIST hold them), int16 and int8 failed in
    gather ("Expected dtype int32/int64 for index"); every integer width is taken as int64."""
    g = torch.Generator().manual_seed(0)
    probs = (2 * torch.randn(50, 4, generator=g, dtype=torch.float64)).softmax(-1)
    labels = torch.randint(0, 4, (50,), generator=g)
    want = metrics.classification_report(probs, labels)
    for dtype in (torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16):
        assert metrics.classification_report(probs, labels.to(dtype)) == want, dtype
        assert metrics.aurc(probs, labels.to(dtype)) == metrics.aurc(probs, labels)
    for bad in (labels.double(), labels.bool()):
        with pytest.raises(ValueError, match="integer class indices"):
            metrics.nll(probs, bad)


def test_calibration_sums_add_over_parts_of_a_test_set():
    """The ECE of a whole test set from its parts' summed bins (a distributed evaluation's shards)."""
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(300, 5, generator=g, dtype=torch.float64), -1)
    y = torch.randint(0, 5, (300,), generator=g)
    parts = [metrics.calibration_sums(probs[a:b], y[a:b]) for a, b in ((0, 37), (37, 200), (200, 300))]
    conf, acc, count = (sum(p[i] for p in parts) for i in range(3))
    assert float(count.sum()) == 300
    assert float((conf - acc).abs().sum() / 300) == pytest.approx(metrics.ece(probs, y), rel=1e-12)
    mean_of_parts = sum(metrics.ece(probs[a:b], y[a:b]) for a, b in ((0, 37), (37, 200), (200, 300))) / 3
    assert abs(mean_of_parts - metrics.ece(probs, y)) > 1e-3  # (averaging the parts' ECEs is not it)
