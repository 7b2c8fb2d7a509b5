"""Acquisition functions against hand-computed cases and brute-force enumeration."""

import itertools
import math

import pytest
import torch

from effortless.active import acquisition as acq


def _lp(probs):
    """(N, S, C) probabilities -> (N, C, S) log-probs."""
    return torch.as_tensor(probs, dtype=torch.float64).permute(0, 2, 1).log()


def _random_lp(n, c, s, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, c, s, generator=g, dtype=torch.float64)).log_softmax(1)


def test_hand_computed_scores():
    agree = [[0.7, 0.3]] * 4
    disagree = [[1.0, 0.0], [0.0, 1.0]] * 2  # each sample certain, half say each class
    uniform = [[0.5, 0.5]] * 4
    lp = _lp([agree, disagree, uniform])
    h = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    f64 = torch.float64
    torch.testing.assert_close(acq.max_entropy(lp), torch.tensor([h, math.log(2), math.log(2)], dtype=f64))
    # BALD: zero when all samples agree, log 2 (its maximum for two classes) when confident samples disagree
    torch.testing.assert_close(acq.bald(lp), torch.tensor([0.0, math.log(2), 0.0], dtype=torch.float64))
    torch.testing.assert_close(acq.variation_ratios(lp), torch.tensor([0.3, 0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(acq.mean_std(lp), torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64))


def test_bald_is_predictive_minus_expected_entropy_and_nonnegative():
    lp = _random_lp(50, 4, 8)
    p = lp.exp()
    pbar = p.mean(-1)
    ref = -(pbar * pbar.log()).sum(-1) + (p * lp).sum(1).mean(-1)
    torch.testing.assert_close(acq.bald(lp), ref.clamp_min(0))
    assert bool((acq.bald(lp) >= 0).all())


def _joint_mi_brute_force(lp, idx):
    """I(y_idx; θ) by enumerating every label configuration (uniform over the S samples)."""
    p = lp.exp()
    c, s = p.shape[1], p.shape[2]
    h = 0.0
    for config in itertools.product(range(c), repeat=len(idx)):
        q = torch.ones(s, dtype=torch.float64)
        for i, y in zip(idx, config):
            q = q * p[i, y]
        pj = float(q.mean())
        h -= pj * math.log(pj) if pj > 0 else 0.0
    return h - float(acq.expected_entropy(lp)[list(idx)].sum())


def test_batchbald_with_one_point_is_bald():
    lp = _random_lp(40, 5, 10, seed=1)
    idx, scores = acq.batchbald(lp, 1)
    b = acq.bald(lp)
    assert int(idx[0]) == int(b.argmax())
    assert float(scores[0]) == pytest.approx(float(b.max()), rel=1e-10)


def test_batchbald_exact_scores_are_the_joint_mutual_information():
    lp = _random_lp(12, 3, 6, seed=2)
    idx, scores = acq.batchbald(lp, 3)
    for j in range(3):
        assert float(scores[j]) == pytest.approx(_joint_mi_brute_force(lp, idx[: j + 1].tolist()), rel=1e-9)
    # greedy: the second pick maximises the pair's mutual information given the first
    first = int(idx[0])
    best = max((i for i in range(12) if i != first), key=lambda i: _joint_mi_brute_force(lp, [first, i]))
    assert int(idx[1]) == best


def test_batchbald_sampled_configurations_converge_to_exact():
    lp = _random_lp(10, 3, 8, seed=3)
    exact_idx, exact_scores = acq.batchbald(lp, 4)
    g = torch.Generator().manual_seed(0)
    idx, scores = acq.batchbald(lp, 4, max_configs=1, n_configs=40000, generator=g)
    assert idx.tolist()[:2] == exact_idx.tolist()[:2]  # the first two picks do not depend on sampling
    ref = _joint_mi_brute_force(lp, idx.tolist())
    assert float(scores[-1]) == pytest.approx(ref, rel=0.03)
    # and the sampled path is really taken: with 3 configurations the estimate is off
    g = torch.Generator().manual_seed(0)
    few_idx, few = acq.batchbald(lp, 4, max_configs=1, n_configs=3, generator=g)
    assert abs(float(few[-1]) - _joint_mi_brute_force(lp, few_idx.tolist())) > 1e-3


@pytest.mark.parametrize("sampled", [False, True])
def test_batchbald_in_chunks_of_the_pool_is_the_same(sampled):
    """The pool is scored in chunks of at most ``chunk_numbers`` joint probabilities: one point at a
    time, or a few, gives the same picks and scores as all at once."""
    lp = _random_lp(30, 4, 6, seed=4)
    kw = dict(max_configs=1, n_configs=50) if sampled else {}
    ref = acq.batchbald(lp, 4, generator=torch.Generator().manual_seed(0), **kw)
    for chunk in (1, 4 * 7):
        got = acq.batchbald(lp, 4, generator=torch.Generator().manual_seed(0), chunk_numbers=chunk, **kw)
        assert got[0].tolist() == ref[0].tolist()
        torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=0)


def test_batchbald_avoids_duplicates_that_top_k_bald_picks():
    """Two copies of the most informative point: BALD's top-2 takes both, BatchBALD takes one copy and
    the next most informative *different* point (the copy adds no information)."""
    a = [[0.95, 0.05], [0.05, 0.95]] * 3
    b = [[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]]
    lp = _lp([a, a, b])
    assert sorted(acq.select("bald", lp, 2, torch.Generator().manual_seed(0)).tolist()) == [0, 1]
    picked = acq.batchbald(lp, 2)[0].tolist()
    assert picked[1] == 2 and picked[0] in (0, 1)


def test_select_never_repeats_and_random_is_seeded():
    lp = _random_lp(30, 4, 5)
    for name in acq.ACQUISITIONS:
        idx = acq.select(name, lp, 7, torch.Generator().manual_seed(1))
        assert len(set(idx.tolist())) == 7 and int(idx.max()) < 30
    a = acq.select("random", lp, 5, torch.Generator().manual_seed(1))
    b = acq.select("random", lp, 5, torch.Generator().manual_seed(1))
    assert a.tolist() == b.tolist()


def test_select_ties_are_broken_at_random():
    lp = torch.full((20, 2, 3), math.log(0.5), dtype=torch.float64)  # every point has BALD 0
    picks = {tuple(acq.select("bald", lp, 3, torch.Generator().manual_seed(s)).tolist()) for s in range(5)}
    assert len(picks) > 1


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"\(N, C, S\)"):
        acq.bald(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="log-probabilities"):
        acq.bald(torch.rand(3, 4, 2) + 1)  # probabilities or logits, not log-probs
    lp = _random_lp(5, 3, 4)  # (N, C, S)
    for f in (acq.bald, acq.max_entropy, acq.variation_ratios, acq.mean_std):
        with pytest.raises(ValueError, match="permute"):  # batchbald_redux's (N, S, C) layout, silently wrong
            f(lp.permute(0, 2, 1))
    with pytest.raises(ValueError, match="normalised"):
        acq.bald(-torch.rand(3, 4, 2))  # negative but not log-probabilities
    with pytest.raises(ValueError, match="acquisition"):
        acq.select("nope", _random_lp(3, 2, 2), 1)
    with pytest.raises(ValueError, match="k must be"):
        acq.select("bald", _random_lp(3, 2, 2), 4)
