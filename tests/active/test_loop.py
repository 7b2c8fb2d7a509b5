"""The active-learning loop: no repeats, no test leakage, balanced start, exact resume; learners."""

import time

import pytest
import torch

from effortless.active import ActiveConfig, TrainConfig, balanced_initial, make_learner, run_loop
from effortless.active.learners import LEARNERS, Trained
from effortless.models import MLP

C = 3


def _data(n_pool=120, n_test=40, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_pool) % C
    x = torch.rand(n_pool, d, generator=g) + y[:, None]  # pool rows are >= 0
    yt = torch.arange(n_test) % C
    xt = -torch.rand(n_test, d, generator=g) - 1  # test rows are < 0: recognisable if they leak
    return x, y, xt, yt


class Spy:
    """A learner whose predictions are random (seeded by the fit seed) and that records its inputs."""

    def __init__(self, fail_at=None):
        self.fits, self.scored, self.fail_at = [], [], fail_at

    def __call__(self, x, y, seed, warm=None):
        if self.fail_at is not None and len(self.fits) == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        self.fits.append((x.clone(), y.clone()))
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(x.shape[1], C, generator=g)

        def log_probs(xq, s, generator=None):
            self.scored.append(xq.clone())
            noise = torch.randn(xq.shape[0], C, s, generator=generator)
            return ((xq @ w)[:, :, None] + noise).log_softmax(1)

        return Trained([], log_probs, lambda xq: (xq @ w).softmax(-1))


def test_balanced_initial_set():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = balanced_initial(y, 7, 3, torch.Generator().manual_seed(0))
    counts = torch.bincount(y[idx], minlength=3)
    assert len(set(idx)) == 7 and counts.min() >= 2 and counts.max() <= 3
    with pytest.raises(ValueError, match="class 2"):
        balanced_initial(torch.tensor([0] * 10 + [1] * 10 + [2]), 9, 3, torch.Generator())


@pytest.mark.parametrize("acq", ["bald", "batchbald", "random"])
def test_no_repeats_no_test_leakage_and_budget(acq):
    x, y, xt, yt = _data()
    spy = Spy()
    cfg = ActiveConfig(initial=6, query=4, budget=27, pool_subset=50, n_samples=5)
    state = run_loop(spy, acq, x, y, xt, yt, C, cfg)
    assert len(state.labelled) == 27 == len(set(state.labelled))  # never queried twice; last round partial
    assert [len(q) for q in state.queried] == [4, 4, 4, 4, 4, 1]
    assert [r["labels"] for r in state.history] == [6, 10, 14, 18, 22, 26, 27]
    for (xf, _), n in zip(spy.fits, [6, 10, 14, 18, 22, 26, 27]):
        assert xf.shape[0] == n and bool((xf >= 0).all())  # training rows are pool rows only
    for xs in spy.scored:
        assert bool((xs >= 0).all()) and xs.shape[0] == 50  # scoring sees a pool subset, never test
    # every scored row was still unlabelled when it was scored
    labelled = set(state.labelled[:6])
    for xs, q in zip(spy.scored, state.queried):
        rows = {tuple(r.tolist()) for r in xs}
        assert not rows & {tuple(x[i].tolist()) for i in labelled}
        labelled |= set(q)


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    x, y, xt, yt = _data()
    cfg = ActiveConfig(initial=6, query=5, budget=40, pool_subset=60, n_samples=4, seed=3)
    full = run_loop(Spy(), "bald", x, y, xt, yt, C, cfg)
    ckpt = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        run_loop(Spy(fail_at=3), "bald", x, y, xt, yt, C, cfg, checkpoint=ckpt)
    assert len(torch.load(ckpt, weights_only=True)["history"]) == 3
    resumed_spy = Spy()
    resumed = run_loop(resumed_spy, "bald", x, y, xt, yt, C, cfg, checkpoint=ckpt)
    assert resumed.labelled == full.labelled and resumed.history == full.history
    assert len(resumed_spy.fits) == len(full.history) - 3  # the first three rounds were not redone
    again = Spy()
    assert run_loop(again, "bald", x, y, xt, yt, C, cfg, checkpoint=ckpt).labelled == full.labelled
    assert again.fits == []  # finished: nothing to do
    with pytest.raises(ValueError, match="different experiment"):
        run_loop(Spy(), "random", x, y, xt, yt, C, cfg, checkpoint=ckpt)


class SlowSpy(Spy):
    def __call__(self, *args, **kw):
        time.sleep(0.05)
        return super().__call__(*args, **kw)


def test_wall_time_adds_up_over_resumed_runs(tmp_path):
    x, y, xt, yt = _data()
    cfg = ActiveConfig(initial=6, query=5, budget=40, pool_subset=60, n_samples=4, seed=3)
    ckpt = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        run_loop(SlowSpy(fail_at=3), "bald", x, y, xt, yt, C, cfg, checkpoint=ckpt)
    before = torch.load(ckpt, weights_only=True)["seconds"]
    assert before >= 3 * 0.05  # the three finished rounds
    t0 = time.perf_counter()
    resumed = run_loop(SlowSpy(), "bald", x, y, xt, yt, C, cfg, checkpoint=ckpt)
    wall = time.perf_counter() - t0
    assert resumed.seconds > wall  # the interrupted run's rounds count too
    assert resumed.seconds <= before + wall
    assert run_loop(Spy(), "bald", x, y, xt, yt, C, cfg, checkpoint=ckpt).seconds == resumed.seconds


def test_resume_refuses_other_learner_settings(tmp_path):
    """Rounds trained with one learning rate are never continued (or read back) with another."""
    x, y, xt, yt = _data()
    cfg = ActiveConfig(initial=6, query=5, budget=40, pool_subset=60, n_samples=4, seed=3)
    ckpt = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        run_loop(Spy(fail_at=3), "bald", x, y, xt, yt, C, cfg, checkpoint=ckpt, learner_settings={"lr": 1e-3})
    with pytest.raises(ValueError, match="learner settings differ in lr"):
        run_loop(Spy(), "bald", x, y, xt, yt, C, cfg, checkpoint=ckpt, learner_settings={"lr": 2e-3})
    assert len(torch.load(ckpt, weights_only=True)["history"]) == 3  # the checkpoint is untouched
    done = run_loop(Spy(), "bald", x, y, xt, yt, C, cfg, checkpoint=ckpt, learner_settings={"lr": 1e-3})
    assert done.labelled == run_loop(Spy(), "bald", x, y, xt, yt, C, cfg).labelled


def test_config_validation():
    x, y, xt, yt = _data()
    for bad, match in [
        (ActiveConfig(initial=2), "initial"),
        (ActiveConfig(initial=6, query=0), "query"),
        (ActiveConfig(initial=6, budget=10_000), "budget"),
        (ActiveConfig(initial=6, budget=20, n_samples=0), "n_samples"),
    ]:
        with pytest.raises(ValueError, match=match):
            run_loop(Spy(), "bald", x, y, xt, yt, C, bad)
    with pytest.raises(ValueError, match="acquisition"):
        run_loop(Spy(), "nope", x, y, xt, yt, C, ActiveConfig(initial=6, budget=20))
    for bad, match in [(ActiveConfig(initial=6, query=True, budget=20), "query"),  # True ran as 1
                       (ActiveConfig(initial=6, budget=20, seed=1.5), "seed")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            run_loop(Spy(), "bald", x, y, xt, yt, C, bad)


def test_numpy_ints_are_taken_and_the_checkpoint_still_loads_weights_only(tmp_path):
    """Counts from NumPy arithmetic were refused (isinstance int); taken now, kept as plain ints so
    the checkpoint (which stores the config) loads with weights_only=True, and resuming with the
    same numbers as Python ints is the same experiment."""
    import numpy as np

    x, y, xt, yt = _data()
    cfg = ActiveConfig(initial=np.int64(6), query=np.int32(5), budget=np.int64(16), pool_subset=np.int64(50),
                       n_samples=np.int64(4), seed=np.int64(2))  # fmt: skip
    assert all(type(v) is int for k, v in vars(cfg).items() if k != "warm_start")
    first = run_loop(Spy(), "bald", x, y, xt, yt, C, cfg, checkpoint=tmp_path / "al.pt")
    assert len(first.labelled) == 16
    torch.load(tmp_path / "al.pt", weights_only=True)
    again = run_loop(Spy(), "bald", x, y, xt, yt, C, ActiveConfig(6, 5, 16, 50, 4, seed=2),
                     checkpoint=tmp_path / "al.pt")  # fmt: skip
    assert again.labelled == first.labelled


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_learners_give_log_probs_and_warm_start(name):
    x, y, xt, _ = _data()
    cfg = TrainConfig(epochs=2, min_steps=5, batch=16, members=2)
    learner = make_learner(name, lambda p: MLP(5, [8], C, dropout=p), cfg)
    first = learner(x[:30], y[:30], seed=0)
    lp = first.log_probs(xt, 6, torch.Generator().manual_seed(0))
    s = 1 if name == "map" else 2 if name == "ensemble" else 6
    assert lp.shape == (len(xt), C, s)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(len(xt), s))
    if s > 1:
        assert float(lp.exp().std(-1).max()) > 1e-4  # the samples differ
    again = first.log_probs(xt, 6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, lp)  # seeded by the generator
    p = first.probs(xt)
    assert p.shape == (len(xt), C)
    warm = learner(x[:40], y[:40], seed=1, warm=first)
    assert warm.log_probs(xt, 3, None).shape[:2] == (len(xt), C)


def test_bayesadam_learner_trains_the_dropout_network_and_predicts_without_dropout():
    """Same network as mc-dropout: its dropout regularises training (different weights from the
    network without it) and is off for the test predictions and the weight samples."""
    x, y, xt, _ = _data()
    make = lambda cfg: make_learner("bayesadam", lambda p: MLP(5, [8], C, dropout=p), cfg)  # noqa: E731
    with_dropout = make(TrainConfig(epochs=2, min_steps=5, batch=16))(x[:30], y[:30], seed=0)
    without = make(TrainConfig(epochs=2, min_steps=5, batch=16, dropout=0.0))(x[:30], y[:30], seed=0)
    w1, w0 = (t.models[0][1].weight for t in (with_dropout, without))
    assert not torch.equal(w1, w0)
    torch.testing.assert_close(with_dropout.probs(xt), with_dropout.probs(xt), rtol=0, atol=0)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    torch.testing.assert_close(with_dropout.log_probs(xt, 4, g()), with_dropout.log_probs(xt, 4, g()))


def test_unknown_learner():
    with pytest.raises(ValueError, match="method"):
        make_learner("sgld", lambda p: MLP(5, [8], C))


def test_training_batches_are_full_and_cover_the_data():
    from effortless.active.learners import _batches

    x, y = torch.arange(130.0)[:, None], torch.arange(130)
    stream = _batches(x, y, TrainConfig(batch=64), seed=0)
    seen = [next(stream)[1] for _ in range(20)]
    assert {len(b) for b in seen} == {64}  # no 2-example remainder batch
    assert set(torch.cat(seen).tolist()) == set(range(130))  # reshuffled passes reach every example
    small = _batches(x[:10], y[:10], TrainConfig(batch=64), seed=0)
    assert len(next(small)[1]) == 10


def test_train_config_refuses_settings_that_failed_only_inside_a_fit():
    """Nothing was checked: batch=0 failed in range() inside the first round ("arg 3 must not be
    zero"), members=0 in an ensemble of nothing, a bad hessian after the data had loaded."""
    import numpy as np

    for kw, match in [({"batch": 0}, "batch must be an int >= 1"), ({"members": 0}, "members"),
                      ({"epochs": -1}, "epochs"), ({"epochs": 0, "min_steps": 0}, "no training step"),
                      ({"eval_samples": True}, "eval_samples"), ({"lr": 0.0}, "lr must be"),
                      ({"prior_precision": float("nan")}, "prior_precision"),
                      ({"temperature": -1e-3}, "temperature"), ({"dropout": 1.0}, "dropout"),
                      ({"hessian": "fisher"}, "hessian must be one of")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw)
    cfg = TrainConfig(epochs=np.int64(3), batch=np.int32(16))
    assert type(cfg.epochs) is int and type(cfg.batch) is int and cfg.batch == 16
