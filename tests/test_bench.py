"""effortless bench: same protocol for every method, resumable, clear errors."""

import json
import math

import pytest
import torch

from effortless import metrics
from effortless.experiments import bench

FIELDS = {
    "task",
    "method",
    "seed",
    "accuracy",
    "nll",
    "ece",
    "brier",
    "ood_auroc",
    "train_seconds",
    "step_ms",
    "peak_mem_mb",
}


def test_bench_rows_report_and_resume(tmp_path):
    kw = dict(
        tasks=["mnist1d-mlp"], seeds=1, epochs=1, out=tmp_path, subset=400, progress=False, log=lambda s: None
    )
    rows = bench.run(methods=["map", "temperature"], **kw)
    assert [r["method"] for r in rows] == ["map", "temperature"]
    assert set(rows[0]) >= FIELDS
    # a second run with one more method only runs the new one
    rows2 = bench.run(methods=["map", "temperature", "laplace"], **kw)
    assert [r["method"] for r in rows2] == ["map", "temperature", "laplace"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved) == 3 and saved[0] == rows[0]
    md = (tmp_path / "results.md").read_text()
    assert "laplace" in md and "**" in md
    assert "±" not in md  # one seed: the means alone (a "± 0.00" read as a measured spread)
    assert (tmp_path / "reliability_mnist1d-mlp.png").stat().st_size > 0
    # shift: every row is evaluated at each noise level (the data really change: NLL moves)
    levels = bench.TASKS["mnist1d-mlp"].shifts["noise"][1]
    for r in saved:
        got = r["shift"]["noise"]
        assert [float(k) for k in got] == list(levels)
        assert got["0.0"]["accuracy"] == r["accuracy"]
        assert got[str(levels[-1])]["nll"] != pytest.approx(r["nll"], rel=1e-3)
    assert "Under shift" in md and (tmp_path / "shift_mnist1d-mlp_noise.png").stat().st_size > 0
    csv = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv) == 4 and csv[0].startswith("accuracy,") and "shift" not in csv[0]
    # rows run another way are never read back as done (nor overwritten)
    for other in ({"epochs": 2}, {"subset": 300}, {"subset": None}):
        with pytest.raises(ValueError, match="already holds mnist1d-mlp / map / seed 0"):
            bench.run(methods=["map"], **{**kw, **other})
    assert json.loads((tmp_path / "results.json").read_text()) == saved


def test_unknown_method_or_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        bench.run(tasks=["mnist1d-mlp"], methods=["sgd"], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="task"):
        bench.run(tasks=["imagenet"], methods=["map"], out=tmp_path, progress=False)


def test_peak_memory_is_measured_per_row(tmp_path):
    rows = bench.run(tasks=["mnist1d-mlp"], methods=["map", "bayesadam"], seeds=1, epochs=1, out=tmp_path,
                     subset=400, progress=False, log=lambda s: None)  # fmt: skip
    peaks = {r["method"]: r["peak_mem_mb"] for r in rows}
    # both hold parameters, gradients and state; BayesAdam also the sampled weights, noise and h
    assert 0 < peaks["map"] < peaks["bayesadam"]


def test_shards_cover_the_grid_once_and_merge(tmp_path):
    kw = dict(tasks=["mnist1d-mlp"], methods=["map", "temperature"], seeds=2, epochs=1, subset=300,
              progress=False, log=lambda s: None)  # fmt: skip
    shards = [bench.run(out=tmp_path / f"s{i}", shard=(i, 3), **kw) for i in range(3)]
    keys = [(r["method"], r["seed"]) for rows in shards for r in rows]
    assert sorted(keys) == sorted((m, s) for m in ("map", "temperature") for s in range(2))  # each once
    merged = bench.merge([tmp_path / f"s{i}" for i in range(3)], tmp_path / "all", log=lambda s: None)
    assert len(merged) == 4
    md = (tmp_path / "all" / "results.md").read_text()
    assert "| map | 2 |" in md and "| temperature | 2 |" in md and " ± " in md
    with pytest.raises(ValueError, match="shard"):
        bench.run(out=tmp_path / "x", shard=(3, 3), **kw)
    with pytest.raises(ValueError, match="does not exist"):
        bench.merge([tmp_path / "missing"], tmp_path / "all")
    bench.run(out=tmp_path / "e2", **{**kw, "epochs": 2, "seeds": 1, "methods": ["map"]})
    with pytest.raises(ValueError, match="merge only shards of the same run"):
        bench.merge([tmp_path / "s0", tmp_path / "e2"], tmp_path / "mixed")


def test_swag_posterior_moments_and_samples():
    from effortless.baselines.swag import SWAG

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    swag = SWAG(model, rank=4)
    snaps = []
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        snaps.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double())
        swag.collect()
    W = torch.stack(snaps)
    torch.testing.assert_close(swag.mean, W.mean(0))
    torch.testing.assert_close(swag.diag, W.var(0, unbiased=False))
    D = torch.stack(swag.deviations, 1)
    assert D.shape == (8, 4)  # the last `rank` deviations
    cov = torch.diag(swag.diag / 2) + D @ D.T / (2 * 3)
    draws = torch.stack([swag.sample(g) for _ in range(40000)])
    torch.testing.assert_close(draws.mean(0), swag.mean, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), cov, atol=0.004, rtol=0.05)


def test_swag_runs_in_the_bench(tmp_path):
    rows = bench.run(tasks=["mnist1d-mlp"], methods=["swag", "map"], seeds=1, epochs=2, out=tmp_path,
                     subset=400, progress=False, log=lambda s: None)  # fmt: skip
    assert rows[0]["method"] == "swag" and 0 < rows[0]["accuracy"] <= 1 and rows[0]["nll"] > 0
    for r in rows:  # per-epoch training curves in every row
        assert len(r["train_loss_per_epoch"]) == 2 and all(v > 0 for v in r["train_loss_per_epoch"])


def test_laplace_torch_peer_agrees_with_ours(tmp_path):
    """Same MAP, same last-layer KFAC Laplace with marglik and probit: the two libraries agree."""
    pytest.importorskip("laplace")
    rows = bench.run(tasks=["mnist1d-mlp"], methods=["laplace", "laplace-torch"], seeds=1, epochs=3,
                     out=tmp_path, subset=1000, progress=False, log=lambda s: None)  # fmt: skip
    ours, peer = rows
    assert ours["nll"] == pytest.approx(peer["nll"], rel=1e-3)
    assert ours["accuracy"] == peer["accuracy"]


def test_peers_missing_are_refused_by_name(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_peers(name, *a, **k):
        if name in ("laplace", "ivon"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_peers)
    for m, pkg in (("laplace-torch", "laplace-torch"), ("ivon", "ivon-opt")):
        with pytest.raises(ValueError, match=pkg):
            bench.run(tasks=["mnist1d-mlp"], methods=[m], out=tmp_path, progress=False)


def test_profiles_run_the_installed_peers_and_name_the_missing(monkeypatch, capsys):
    """#5: the quick profile runs *every* method; the peers are an optional extra, so a profile adds
    the installed ones and says which are left out and why."""
    import effortless.baselines as bl

    have = {"ivon": None, "laplace-torch": "laplace-torch is not installed (scripts/setup.sh --peers)"}
    monkeypatch.setattr(bl, "available", lambda m: have.get(m))
    monkeypatch.setattr(bench, "available", lambda m: have.get(m))
    cfg = bench.resolve_config("quick")
    assert cfg["methods"][-1] == "ivon" and "laplace-torch" not in cfg["methods"]
    assert cfg["methods"][:-1] == bench.PROFILES["quick"]["methods"]
    err = capsys.readouterr().err
    assert "without laplace-torch" in err and "not installed" in err
    have["laplace-torch"] = None
    assert bench.resolve_config("full")["methods"][-2:] == ["ivon", "laplace-torch"]
    assert "without" not in capsys.readouterr().err
    assert "ivon" not in bench.resolve_config(methods="map,swag")["methods"]  # no profile: as given


def test_config_layers_profile_file_and_flags(tmp_path):
    cfg = bench.resolve_config()
    assert cfg["task"] == ["fmnist-mlp"] and cfg["seeds"] == 1
    quick = bench.resolve_config("quick")
    assert quick["task"] == ["fmnist-mlp", "mnist1d-mlp", "toy-regression"] and "swag" in quick["methods"]
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"task": "mnist1d-mlp", "seeds": 3, "methods": ["map", "swag"]}))
    got = bench.resolve_config("quick", f, seeds=2, out=str(tmp_path / "o"))
    assert got["task"] == ["mnist1d-mlp"] and got["methods"] == ["map", "swag"]  # the file beats the profile
    assert got["seeds"] == 2 and got["out"] == str(tmp_path / "o")  # flags beat the file
    y = tmp_path / "c.yaml"
    y.write_text("task: [mnist1d-mlp, wine]\nepochs: 2\n")
    if pytest.importorskip("yaml"):
        assert bench.resolve_config(config=y)["task"] == ["mnist1d-mlp", "wine"]
    f.write_text(json.dumps({"task": "wine", "lr": 0.1}))
    with pytest.raises(ValueError, match="unknown field"):
        bench.resolve_config(config=f)
    with pytest.raises(ValueError, match="profile"):
        bench.resolve_config("huge")
    # unreadable or malformed files: one line naming the file, not a parser traceback
    bad = {"a.json": '{"task": ', "b.json": "[1, 2]", "c.yaml": "task: [wine\n"}
    why = {"a.json": "not valid JSON", "b.json": "must be a mapping", "c.yaml": "not valid YAML"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=why[name]):
            bench.resolve_config(config=tmp_path / name)
    with pytest.raises(ValueError, match="cannot read"):
        bench.resolve_config(config=tmp_path / "missing.json")
    assert set(bench.PROFILES["full"]["task"]) == set(bench.TASKS)
    for p in bench.PROFILES.values():
        assert all(bench.available(m) is None for m in p["methods"])


def test_image_tasks_get_rotation_translation_and_a_noise_ood_set(tmp_path):
    rows = bench.run(tasks=["fmnist-mlp"], methods=["map"], seeds=1, epochs=1, out=tmp_path, subset=500,
                     progress=False, log=lambda s: None)  # fmt: skip
    r = rows[0]
    assert set(r["shift"]) == {"rotation", "translation"}
    assert r["shift"]["translation"]["26.0"]["accuracy"] < r["accuracy"]  # nearly off the image
    assert 0.5 < r["ood_auroc_uniform_noise"] <= 1.0
    for name in ("rotation", "translation"):
        assert (tmp_path / f"shift_fmnist-mlp_{name}.png").stat().st_size > 0


def test_regression_tasks_report_original_units_and_plot_the_band(tmp_path):
    methods = ["map", "bayesadam", "laplace", "temperature"]
    rows = bench.run(tasks=["toy-regression", "diabetes"], methods=methods, seeds=2, epochs=5, out=tmp_path,
                     progress=False, log=lambda s: None)  # fmt: skip
    assert {r["method"] for r in rows} == {"map", "bayesadam", "laplace"}  # no regression temperature scaling
    diabetes = [r for r in rows if r["task"] == "diabetes"]
    assert {r["seed"] for r in diabetes} == {0, 1}
    for r in rows:
        assert r["rmse"] > 0 and 0 <= r["picp"] <= 1 and math.isfinite(r["nll"])
    # original units: the diabetes target's std is ~77, so RMSE is tens, not ~1
    assert all(r["rmse"] > 20 for r in diabetes)
    md = (tmp_path / "results.md").read_text()
    assert "## diabetes (regression" in md and "| laplace | 2 |" in md
    assert (tmp_path / "band_toy-regression.png").stat().st_size > 0
    with pytest.raises(ValueError, match="regression"):
        bench.run(tasks=["diabetes"], methods=["temperature"], out=tmp_path / "x", progress=False)


def test_regression_report_units():
    mean = torch.zeros(1000, 1, dtype=torch.float64)
    y = torch.randn(1000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    var = torch.ones_like(mean)
    one, ten = metrics.regression_report(mean, var, y), metrics.regression_report(mean, var, y, y_scale=10.0)
    assert ten["rmse"] == pytest.approx(10 * one["rmse"])
    assert ten["nll"] == pytest.approx(one["nll"] + math.log(10.0))
    assert ten["picp"] == one["picp"] and abs(one["picp"] - 0.95) < 0.03


def test_boston_loader_when_the_data_is_there():
    from effortless import data

    try:
        s = data.boston(seed=3)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert s.x_train.shape == (455, 13) and s.x_test.shape == (51, 13) and s.n_classes == 0
    assert abs(s.y_scale - 9.2) < 0.3  # the median value's std in $1000s
    other = data.boston(seed=4)
    assert not torch.equal(s.y_test, other.y_test)  # a different split per seed


def test_tabular_tasks_split_anew_per_seed_and_the_studies_use_it(monkeypatch):
    """The small tabular sets (18–180 test rows in one split) get a new 90/10 split per seed, the
    same for the same seed; tasks without per-seed splits ignore the seed; the defaults study
    trains and evaluates each seed on that seed's split."""
    pytest.importorskip("sklearn")
    from effortless.experiments import defaults_study

    wine = bench.TASKS["wine"]
    a, b, a2 = wine.split(0), wine.split(1), wine.split(0)
    assert torch.equal(a.y_test, a2.y_test) and torch.equal(a.x_train, a2.x_train)
    assert not torch.equal(a.x_test, b.x_test) and a.x_test.shape == b.x_test.shape == (18, 13)
    assert not bench.TASKS["mnist1d-mlp"].split_per_seed
    seen = []

    def fake_train(method, model, split, seed, **kw):
        seen.append((method, seed, split.x_test.clone()))
        return method

    monkeypatch.setattr(defaults_study, "train", fake_train)
    monkeypatch.setattr(defaults_study, "evaluate", lambda run, split: {"method": run})
    defaults_study.run_task("wine", seeds=2)
    assert [(m, s) for m, s, _ in seen] == [("map", 0), ("bayesadam", 0), ("map", 1), ("bayesadam", 1)]
    assert torch.equal(seen[0][2], seen[1][2]) and torch.equal(seen[0][2], a.x_test)  # paired per seed
    assert torch.equal(seen[2][2], b.x_test)


def test_bench_rows_of_the_old_fixed_tabular_split_are_not_resumed(tmp_path):
    """Rows record their split; a results.json from before the tabular sets split per seed (rows
    without "split": the fixed split) is refused, not mixed with per-seed rows."""
    pytest.importorskip("sklearn")
    kw = dict(tasks=["wine"], methods=["map"], seeds=2, epochs=1, out=tmp_path, progress=False,
              log=lambda s: None)  # fmt: skip
    rows = bench.run(**kw)
    assert [r["split"] for r in rows] == ["a split per seed"] * 2
    assert bench.run(**kw) == rows  # (resumed: nothing new to run)
    path = tmp_path / "results.json"
    old = json.loads(path.read_text())
    for r in old:
        del r["split"]
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="'split': 'one split'"):
        bench.run(**kw)


def test_vi_layer_kl_and_local_reparameterisation():
    from effortless.baselines.vi import BayesLinear, bayesianize, kl

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    b = BayesLinear(lin, sigma_init=0.3, prior_precision=2.0)
    # KL against torch.distributions, summed over weights and biases
    ref = 0.0
    for mu in (lin.weight, lin.bias):
        q = torch.distributions.Normal(mu.detach(), torch.full_like(mu, 0.3))
        p = torch.distributions.Normal(torch.zeros_like(mu), torch.full_like(mu, 2.0**-0.5))
        ref = ref + torch.distributions.kl_divergence(q, p).sum()
    torch.testing.assert_close(b.kl().detach(), ref)
    # pre-activation moments equal those of sampled weights
    x = torch.randn(4, 3, dtype=torch.float64)
    draws = torch.stack([b(x) for _ in range(40000)]).detach()
    torch.testing.assert_close(draws.mean(0), lin(x).detach(), atol=0.01, rtol=0)
    var = x.pow(2) @ torch.full((3, 2), 0.09, dtype=torch.float64) + 0.09
    torch.testing.assert_close(draws.var(0), var, rtol=0.05, atol=0)
    net = bayesianize(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    assert sum(isinstance(m, BayesLinear) for m in net.modules()) == 2 and float(kl(net)) > 0


def test_vi_runs_in_the_bench_and_refuses_convolutions(tmp_path):
    rows = bench.run(tasks=["mnist1d-mlp"], methods=["vi"], seeds=1, epochs=2, out=tmp_path, subset=400,
                     progress=False, log=lambda s: None)  # fmt: skip
    assert 0 < rows[0]["accuracy"] <= 1 and rows[0]["nll"] > 0
    with pytest.raises(ValueError, match="Linear"):
        bench.run(tasks=["mnist1d-cnn"], methods=["vi"], seeds=1, epochs=1, out=tmp_path / "c", subset=200,
                  progress=False, log=lambda s: None)  # fmt: skip


def test_tensorboard_logging_writes_the_rows_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = bench.run(tasks=["mnist1d-mlp"], methods=["map"], seeds=1, epochs=2, out=tmp_path, subset=300,
                     progress=False, log=lambda s: None, tensorboard=True)  # fmt: skip
    row = rows[0]
    runs = list((tmp_path / "tensorboard" / "mnist1d-mlp" / "map" / "seed0").glob("events.out.tfevents.*"))
    assert len(runs) == 1
    acc = EventAccumulator(str(runs[0].parent))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx(row["train_loss_per_epoch"], rel=1e-6)
    for k in ("accuracy", "nll", "ece"):
        (ev,) = acc.Scalars(f"test/{k}")
        assert ev.value == pytest.approx(row[k], rel=1e-6) and ev.step == 2
    assert row["shift"]  # mnist1d-mlp has an input-noise suite: intensity as the step
    levels = row["shift"]["noise"]  # fractional intensities (0.25, 0.5, …): step = 100 × intensity
    events = acc.Scalars("shift/noise_x100/accuracy")
    steps = [e.step for e in events]
    assert steps == [round(100 * float(lv)) for lv in levels] == sorted(set(steps))
    assert [e.value for e in events] == pytest.approx([v["accuracy"] for v in levels.values()], rel=1e-6)


def test_tensorboard_missing_is_a_clear_error_before_training(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ValueError, match="pip install"):
        bench.run(tasks=["mnist1d-mlp"], methods=["map"], out=tmp_path, progress=False, tensorboard=True)
    assert not (tmp_path / "results.json").exists()


def test_every_bayesadam_key_runs_in_the_bench_for_both_kinds_of_task(tmp_path):
    """`bayesadam-gradsq` stopped the bench with "needs the minibatch size" (the user loop did not
    pass it), and no `bayesadam-KEY` had a regression version (skipped)."""
    keys = ["bayesadam-gradsq", "bayesadam-ggn", "bayesadam-efisher"]
    rows = bench.run(tasks=["mnist1d-mlp", "toy-regression"], methods=keys, seeds=1, epochs=1, subset=300,
                     out=tmp_path, progress=False, log=lambda s: None)  # fmt: skip
    assert sorted((r["task"], r["method"]) for r in rows) == sorted(
        (t, m) for t in ("mnist1d-mlp", "toy-regression") for m in keys
    )
    assert all(math.isfinite(r["nll"]) for r in rows)


def test_regression_model_side_keys_train_on_the_squared_error_like_the_other_paths():
    """train_step's Gaussian NLL with σ² = ½ is the squared error the user loop (and Adam) train on:
    with the noise switched off (T = 0), `gradsq` through train_step equals the plain loop step."""
    from effortless.experiments import tasks as task_registry
    from effortless.experiments.train import train

    task = task_registry.TASKS["toy-regression"]
    split = task.load()
    kw = dict(epochs=1, batch_size=32, seed=0, progress=False, temperature=0.0)
    make = lambda: task.model(0.0)  # noqa: E731
    runs = [train("bayesadam", make, split, hessian=k, **kw) for k in ("gradsq", "reparam")]
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(a, b)


def test_laplace_diag_is_the_all_weights_diagonal_laplace_of_the_map_network():
    import effortless as ef
    from effortless.baselines import METHODS, _common
    from effortless.data import loader
    from effortless.experiments.tasks import TASKS

    task = TASKS["mnist1d-mlp"]
    split = task.load().subset(400, 100)
    fitted = METHODS["laplace-diag"](task, split, 0, 1, False)
    run = _common.run(task, split, 0, 1, False)  # the same seed: the same MAP network
    post = ef.laplace(run.model, loader(split.x_train, split.y_train, 512, shuffle=False), hessian="ggn",
                      prior_precision="marglik")  # fmt: skip
    assert isinstance(post, ef.DiagGaussian) and len(post.mean) == len(list(run.model.parameters()))
    ref = ef.predict(run.model, post, split.x_test, method="probit")
    torch.testing.assert_close(fitted.predict(split.x_test), ref)
    assert not torch.allclose(ref, run.model(split.x_test).softmax(-1))  # the posterior moves it


def test_every_registered_method_runs_on_a_tiny_task(tmp_path):
    """Each method of the registry (the peers where installed) trains, predicts and gets a row with
    finite metrics: MC dropout, the ensemble, every bayesadam-<key> and the regression versions
    had no test that ran them."""
    from effortless import baselines as bm
    from effortless.baselines import REGRESSION_METHODS

    names = [m for m in bm.METHODS if bm.available(m) is None]
    # (2 epochs of 2 steps: the memory is measured at the fourth step)
    rows = bench.run(tasks=["mnist1d-mlp"], methods=names, seeds=1, epochs=2, out=tmp_path / "c", subset=200,
                     progress=False)  # fmt: skip
    assert sorted(r["method"] for r in rows) == sorted(names)
    for r in rows:
        assert 0 <= r["accuracy"] <= 100 and math.isfinite(r["nll"]) and 0 <= r["ece"] <= 100, r["method"]
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] > 0, r["method"]  # every method measured
    rows = bench.run(tasks=["toy-regression"], methods=list(REGRESSION_METHODS), seeds=1, epochs=2,
                     out=tmp_path / "r", subset=100, progress=False)  # fmt: skip
    assert sorted(r["method"] for r in rows) == sorted(REGRESSION_METHODS)
    for r in rows:
        assert math.isfinite(r["rmse"]) and math.isfinite(r["nll"]) and r["rmse"] > 0, r["method"]


def _row(task, method, seed=0, **kw):
    from effortless.experiments.tasks import TASKS

    return {"task": task, "method": method, "seed": seed, "epochs": TASKS[task].epochs, "subset": None, **kw}


def test_goal_checks_state_what_issue_5_asks_and_whether_it_is_met():
    fm = dict(accuracy=0.8785, nll=0.343, ece=0.0173, ood_auroc=0.802, train_seconds=10.0)
    rows = [
        _row("fmnist-mlp", "map", **fm),
        _row("fmnist-mlp", "swag", **{**fm, "nll": 0.314}),
        _row("fmnist-mlp", "ensemble", **{**fm, "nll": 0.312, "train_seconds": 50.0}),
        _row("fmnist-mlp", "bayesadam", accuracy=0.8861, nll=0.318, ece=0.0106, ood_auroc=0.819,
             train_seconds=15.0),  # fmt: skip
        _row("fmnist-mlp", "bayesadam", seed=1, accuracy=0.8861, nll=0.318, ece=0.0106, ood_auroc=0.819,
             train_seconds=15.0),  # fmt: skip
        _row("mnist1d-mlp", "map", accuracy=0.62, nll=1.05, ece=0.12, train_seconds=1.0),
        _row("mnist1d-mlp", "bayesadam", accuracy=0.63, nll=0.97, ece=0.13, train_seconds=1.2),
        _row("mnist1d-cnn", "bayesadam", accuracy=0.8, nll=0.5, ece=0.03, train_seconds=1.0),  # no MAP row
        _row("boston", "bayesadam", nll=2.65, rmse=3.0),
    ]
    tasks = ["fmnist-mlp", "mnist1d-mlp", "mnist1d-cnn", "boston"]
    methods = ["map", "bayesadam", "swag", "ensemble"]
    got = {(c["task"], c["goal"].split(" (")[0]): c for c in bench.goal_checks(rows, tasks, methods)}
    verdict = {k: c["met"] for k, c in got.items()}
    assert verdict == {
        ("fmnist-mlp", "accuracy ≥ MAP − 0.3 points"): True,
        ("fmnist-mlp", "NLL below every method of 1× training cost"): False,  # swag's 0.314
        ("fmnist-mlp", "NLL no worse than the ensemble's"): False,
        ("fmnist-mlp", "ECE ≤ 0.7 %"): False,
        ("fmnist-mlp", "OOD AUROC ≥ 88 %"): False,
        ("fmnist-mlp", "training time ≤ 1.3× MAP's"): False,  # 1.5x
        ("mnist1d-mlp", "accuracy ≥ MAP − 0.3 points"): True,
        ("mnist1d-mlp", "NLL below MAP's"): True,
        ("mnist1d-mlp", "ECE below MAP's"): False,
        ("boston", "NLL ≤ the deep ensemble's published 2.41"): False,
    }
    nll = got[("fmnist-mlp", "NLL below every method of 1× training cost")]
    assert "(map, swag)" in nll["goal"] and nll["target"] == "< 0.314 (swag)" and nll["value"] == "0.318"
    assert got[("fmnist-mlp", "training time ≤ 1.3× MAP's")]["value"] == "1.50×"
    timed = [dict(r, first_step_s={"map": 0.5, "bayesadam": 4.0}.get(r["method"])) for r in rows]
    checks = bench.goal_checks(timed, tasks, methods)
    value = {c["goal"]: c["value"] for c in checks if c["task"] == "fmnist-mlp"}
    # (15 − 4) / (10 − 0.5): the ratio after each run's first step, beside the verdict's total
    assert value["training time ≤ 1.3× MAP's"] == "1.50× (1.16× after the first step, which compiles)"
    table = "\n".join(bench.goals_table(rows, tasks, methods))
    assert "| fmnist-mlp | ECE ≤ 0.7 % | 1.06 % | ≤ 0.70 % | **no** |" in table
    assert "3 of 10 goals met." in table and "in this run only" in table
    assert "other epochs or a subset" not in table

    better = dict(accuracy=0.884, nll=0.30, ece=0.006, ood_auroc=0.90, train_seconds=12.0)
    rows2 = [r for r in rows if not (r["task"] == "fmnist-mlp" and r["method"] == "bayesadam")]
    rows2 += [_row("fmnist-mlp", "bayesadam", **better), _row("boston", "bayesadam", seed=1, nll=2.0)]
    rows2 = [r for r in rows2 if not (r["task"] == "boston" and r["seed"] == 0)]
    checks = bench.goal_checks(rows2, tasks, methods)
    assert all(c["met"] for c in checks if c["task"] in ("fmnist-mlp", "boston")), checks
    rows2[0]["subset"] = 500  # (a map row: the note names only bayesadam's protocol)
    rows2[-2]["subset"] = 500
    assert "other epochs or a subset on fmnist-mlp" in "\n".join(bench.goals_table(rows2, tasks, methods))
    assert bench.goal_checks(rows, tasks, ["map", "swag"]) == []  # no bayesadam: nothing to check


def test_devices_are_resolved_or_refused_by_name():
    assert bench.resolve_device("cpu") == torch.device("cpu")
    assert bench.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", 3):
        with pytest.raises(ValueError, match="device must be"):
            bench.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            bench.resolve_device("cuda:0")


def test_rows_record_their_device_and_another_devices_rows_are_not_mixed_in(tmp_path):
    rows = bench.run(tasks=["mnist1d-mlp"], methods=["map"], seeds=1, epochs=1, out=tmp_path, subset=200,
                     progress=False, device="cpu")  # fmt: skip
    assert rows[0]["device"] == "cpu"
    assert len(bench.run(tasks=["mnist1d-mlp"], methods=["map"], seeds=1, epochs=1, out=tmp_path, subset=200,
                         progress=False, device="cpu")) == 1  # fmt: skip  (resumed: nothing new)
    path = tmp_path / "results.json"
    old = json.loads(path.read_text())
    old[0]["device"] = "cuda"
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="'device': 'cuda'"):
        bench.run(tasks=["mnist1d-mlp"], methods=["map"], seeds=1, epochs=1, out=tmp_path, subset=200,
                  progress=False, device="cpu")  # fmt: skip
    del old[0]["device"]  # a row from before devices were recorded: it ran on the CPU
    path.write_text(json.dumps(old))
    assert len(bench.run(tasks=["mnist1d-mlp"], methods=["map"], seeds=1, epochs=1, out=tmp_path, subset=200,
                         progress=False, device="cpu")) == 1  # fmt: skip


def test_a_run_killed_while_writing_its_results_keeps_the_earlier_rows(tmp_path, monkeypatch):
    """results.json was rewritten in place after every run: a kill in that write left a truncated
    file, every row lost to a JSON error at the resume (a traceback). It is written aside and
    renamed now; a file that is not a results file is named."""
    from pathlib import Path

    kw = dict(tasks=["mnist1d-mlp"], seeds=1, epochs=1, out=tmp_path, subset=200, progress=False,
              log=lambda s: None)  # fmt: skip
    bench.run(methods=["map"], **kw)
    saved = (tmp_path / "results.json").read_text()
    real = Path.write_text

    def killed(self, text, *a, **k):  # half the file written, then the process dies
        if self.name.startswith("results.json"):
            real(self, text[: len(text) // 2], *a, **k)
            raise KeyboardInterrupt
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        bench.run(methods=["map", "temperature"], **kw)
    monkeypatch.undo()
    assert (tmp_path / "results.json").read_text() == saved
    assert not list(tmp_path.glob("*.tmp"))  # (the half-written file is removed)
    rows = bench.run(methods=["map", "temperature"], **kw)  # resumes: map read back, temperature run
    assert [r["method"] for r in rows] == ["map", "temperature"]
    (tmp_path / "results.json").write_text(saved[: len(saved) // 2])
    with pytest.raises(ValueError, match="is not a bench results file"):
        bench.run(methods=["map"], **kw)
    (tmp_path / "results.json").write_text('{"task": "x"}')
    with pytest.raises(ValueError, match="a list of rows with task, method and seed"):
        bench.merge([tmp_path], tmp_path / "merged")


def test_regression_laplace_is_the_last_layer_kfac_and_rows_say_how_they_were_run(tmp_path):
    """Regression's ``laplace`` is the last-layer KFAC posterior (σ and δ by the evidence), as for
    classification; the all-weights diagonal, underconfident there (its γ counts every weight's
    diagonal entry, so σ² = RSS/(n − γ) comes out several times the residuals' variance), is
    ``laplace-diag``. Regression rows did not record ``subset``: a resume without --subset took
    rows trained on 150 examples as done; nor can an old ``laplace`` row pass for the new one."""
    kw = dict(tasks=["diabetes"], seeds=1, epochs=30, out=tmp_path, progress=False, log=lambda s: None)
    rows = bench.run(methods=["map", "laplace", "laplace-diag"], **kw)
    by = {r["method"]: r for r in rows}
    assert by["laplace"]["variant"] == "last-layer kfac" and "variant" not in by["laplace-diag"]
    assert by["laplace-diag"]["picp"] > by["laplace"]["picp"]  # the diagonal's wider intervals
    assert by["laplace"]["nll"] < by["laplace-diag"]["nll"]
    with pytest.raises(ValueError, match="already holds diabetes / map / seed 0"):
        bench.run(methods=["map"], **{**kw, "out": tmp_path, "epochs": 30, "subset": 150})
    small = tmp_path / "small"
    bench.run(methods=["map"], **{**kw, "out": small, "subset": 150})
    with pytest.raises(ValueError, match="already holds diabetes / map / seed 0"):
        bench.run(methods=["map"], **{**kw, "out": small})  # (the subset's rows were taken as done)
    saved = json.loads((tmp_path / "results.json").read_text())
    for r in saved:
        r.pop("variant", None)  # a results file from before the change
    (tmp_path / "results.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="already holds diabetes / laplace / seed 0"):
        bench.run(methods=["laplace"], **kw)
    bench.run(methods=["laplace-diag"], **kw)  # (unchanged: read back)
