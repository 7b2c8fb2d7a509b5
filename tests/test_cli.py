import json
import re
import subprocess
import sys

import pytest
import torch

from effortless import cli


def test_help_lists_the_demo(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_top_level_help_lists_each_command_once():
    """The command list was written twice (a hand-kept copy in the description and argparse's own)."""
    text = cli.build_parser().format_help()
    for name in ("demo", "hessian-profile", "bench", "adam-hessian", "active"):
        assert len(re.findall(rf"^\s+{name}\b", text, flags=re.M)) == 1, name


@pytest.mark.parametrize("command, flag", [("demo", "--quick"), ("bench", "--device")])
def test_module_entry_point_help(command, flag):
    cmd = [sys.executable, "-m", "effortless", command, "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0 and flag in out.stdout


def test_bench_on_a_device_that_is_not_there_says_so(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is there")
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        cli.main(["bench", "--task", "mnist1d-mlp", "--methods", "map", "--device", "cuda",
                  "--out", str(tmp_path)])  # fmt: skip
    assert not (tmp_path / "results.json").exists()


def test_quick_demo_writes_results_and_plots(tmp_path):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--no-progress", "--samples", "4"]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    methods = {r["method"] for r in rows}
    assert {"Adam (MAP)", "BayesAdam (defaults)"} <= methods
    toy = {r["method"]: r for r in rows if r["task"] == "toy-regression"}
    assert set(toy) == {"Adam (MAP)", "BayesAdam (ef.fit, defaults)", "BayesAdam (ef.fit, T = 1)",
                        "Adam + ef.laplace (GLM)"}  # fmt: skip
    assert all(r["gap_std"] > 0 and r["rmse_data"] > 0 for r in toy.values())
    for r in rows:
        if "accuracy" in r:
            assert {"accuracy", "nll", "ece", "brier", "ood_auroc", "train_seconds", "step_ms"} <= set(r)
            # the first step (BayesAdam compiles in it) apart from the steps after it
            assert 0 < r["first_step_s"] < r["train_seconds"]
            steps = round(1000 * r["train_seconds"] / r["step_ms"])
            later = 1000 * (r["train_seconds"] - r["first_step_s"]) / (steps - 1)
            assert abs(r["later_step_ms"] - later) < 1e-6 * later
            # the interleaved per-step cost, against Adam (1 for Adam itself)
            assert r["step_ratio"] == 1.0 if r["method"] == "Adam (MAP)" else 0.5 < r["step_ratio"] < 20
    assert "first step" in (tmp_path / "results.md").read_text()
    assert "step × Adam (interleaved)" in (tmp_path / "results.md").read_text()
    assert "--quick checks the set-up" in (tmp_path / "results.md").read_text()  # (not a comparison)
    for name in ("results.md", "reliability.png", "confidence_hist.png", "toy_regression.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_demo_falls_back_to_mnist1d_without_fashion_mnist(tmp_path, monkeypatch):
    from effortless import data
    from effortless.experiments import demo

    monkeypatch.setenv("EFFORTLESS_FMNIST", str(tmp_path / "no-such-dir"))
    said = []
    split, ood, ood_name, make, epochs = demo._classification_task(False, said.append)
    assert split.name == "mnist1d" and ood.shape[1] == 40 and ood_name == "Gaussian noise" and epochs == 30
    assert "falling back to MNIST-1D" in said[0] and "apt-get install dataset-fashion-mnist" in said[0]
    assert make()(split.x_test[:2]).shape == (2, 10)
    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress", "--samples", "2"]) == 0
    rows = [r for r in json.loads((out / "results.json").read_text()) if "accuracy" in r]
    assert {r["method"] for r in rows} >= {"Adam (MAP)", "BayesAdam (defaults)"}
    assert all(r["task"] == "mnist1d" and 0 <= r["ood_auroc"] <= 1 for r in rows), rows
    # Fashion-MNIST without MNIST: uniform noise is the out-of-distribution set
    monkeypatch.undo()
    try:
        data.fashion_mnist()
    except FileNotFoundError:
        return

    def no_mnist(*args, **kwargs):
        raise FileNotFoundError("mnist")

    monkeypatch.setattr(data, "mnist", no_mnist)
    split, ood, ood_name, _, _ = demo._classification_task(True, said.append)
    assert ood_name == "uniform noise" and ood.shape == (1000, 784) and split.x_train.shape == (3000, 784)


def test_bench_shards_and_merge_from_the_command_line(tmp_path):
    args = ["bench", "--task", "mnist1d-mlp", "--methods", "map", "--seeds", "2", "--epochs", "1",
            "--subset", "300", "--no-progress"]  # fmt: skip
    for i in range(2):
        assert cli.main([*args, "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")]) == 0
    shards = [str(tmp_path / f"s{i}") for i in range(2)]
    assert cli.main(["bench", "--merge", *shards, "--out", str(tmp_path / "all")]) == 0
    rows = json.loads((tmp_path / "all" / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert sorted(r["seed"] for r in rows) == [0, 1]
    for bad in ("3", "a/b", "2/2"):
        with pytest.raises(SystemExit, match="shard"):
            cli.main([*args, "--shard", bad, "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="effortless bench --merge: .*does not exist"):
        cli.main(["bench", "--merge", str(tmp_path / "missing"), "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="--pairs must look like"):
        cli.main(["active", "--pairs", "bayesadam-bald", "--out", str(tmp_path / "z")])


def test_hessian_profile_writes_table_json_and_plot(tmp_path):
    args = ["hessian-profile", "--widths", "1,4", "--reps", "3", "--batch", "16", "--out", str(tmp_path),
            "--no-progress"]  # fmt: skip
    assert cli.main(args) == 0
    rows = json.loads((tmp_path / "results.json").read_text())
    quantities = {r["quantity"] for r in rows}
    assert {"fwd+bwd", "ggn+grad", "ggn-mc+grad", "efisher+grad", "kfac-mc+grad", "hvp", "gvp"} <= quantities
    assert "ggn+grad, bf16 products" in quantities
    assert all(r["ratio"] > 0 and r["ms"] > 0 for r in rows)
    assert {r["width"] for r in rows} == {1, 4}
    assert (tmp_path / "profile.png").stat().st_size > 0
    assert "ggn+grad" in (tmp_path / "results.md").read_text()
    peers = {"backpack": "BackPACK DiagGGNExact+grad", "curvlinops": "curvlinops GGN matvec",
             "laplace": "laplace-torch diag GGN fit (default backend)"}  # fmt: skip
    for module, row in peers.items():  # the peers' rows, where the package is installed
        try:
            __import__(module)
        except ImportError:
            continue
        assert row in quantities


def test_adam_hessian_runs_and_reports(tmp_path):
    args = ["adam-hessian", "--task", "mnist1d-mlp", "--epochs", "1", "--every", "5", "--subset", "640",
            "--probe", "64", "--probes", "4", "--keys", "reparam,gradsq,ggn,kfac",
            "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(args) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    estimates = {r["estimate"] for r in out["rows"]}
    keys = ("reparam", "gradsq", "ggn", "kfac")
    assert estimates == {"adam v̂", "adam F̂", *(f"bayesadam[{k}] h" for k in keys)}
    assert all(-1.0001 <= r["spearman"] <= 1.0001 for r in out["rows"])
    posts = out["posteriors"]
    assert {"MAP (Adam)", "adam-laplace: N·F̂ (marglik, probit)", "naive: N·v̂ (marglik, probit)",
            *(f"bayesadam[{k}] posterior() (probit)" for k in keys)} == set(posts)  # fmt: skip
    assert all(0 <= p["ece"] <= 1 and p["nll"] > 0 for p in posts.values())
    for name in ("results.md", "correlation.png", "scatter.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_adam_hessian_rejects_bad_keys(tmp_path):
    from effortless.experiments import adam_hessian

    with pytest.raises(ValueError, match="Hessian keys"):
        adam_hessian.run(task="mnist1d-mlp", keys=("reparam", "nope"), out=str(tmp_path))
    with pytest.raises(ValueError, match="Hessian keys"):
        adam_hessian.run(task="mnist1d-mlp", keys=("reparam", "reparam"), out=str(tmp_path))
    # --every past the run's steps was found only after the whole training run, as a traceback
    with pytest.raises(SystemExit, match="adam-hessian: every=50 is more than the 6 steps of 2 epoch"):
        cli.main(["adam-hessian", "--task", "mnist1d-mlp", "--subset", "300", "--every", "50",
                  "--out", str(tmp_path)])  # fmt: skip


def test_adam_hessian_compare_measures_rank_and_scale():
    from effortless.experiments.adam_hessian import compare

    ref = torch.rand(500, dtype=torch.float64) + 0.01
    same = compare(ref, ref)
    assert same["spearman"] == pytest.approx(1) and same["pearson_log"] == pytest.approx(1)
    assert compare(3 * ref, ref)["median_ratio"] == pytest.approx(3)
    assert compare(3 * ref, ref)["median_rel_error"] == pytest.approx(2)
    assert compare(ref, ref)["median_rel_error"] == 0
    assert compare(ref.pow(3), ref)["spearman"] == pytest.approx(1)  # monotone: rank-perfect
    assert compare(1 / ref, ref)["spearman"] == pytest.approx(-1)


def test_active_runs_writes_reports_and_resumes(tmp_path):
    args = ["active", "--task", "mnist1d-mlp", "--method", "bayesadam,map", "--acquisition", "bald,random",
            "--initial", "10", "--query", "5", "--budget", "25", "--repeats", "2", "--pool-subset", "100",
            "--samples", "4", "--epochs", "2", "--min-steps", "10", "--subset", "600", "--no-progress",
            "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(args) == 0
    out = json.loads((tmp_path / "results.json").read_text())
    assert len(out["cells"]) == 2 * 2 * 2
    for c in out["cells"]:
        assert [r["labels"] for r in c["history"]] == [10, 15, 20, 25]
        assert len(set(c["labelled"])) == 25
    md = (tmp_path / "results.md").read_text()
    assert "labels to 90 %" in md and "bayesadam | bald" in md
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    before = {(c["method"], c["acquisition"], c["repeat"]): c["history"] for c in out["cells"]}
    assert cli.main(args) == 0  # rerun: every cell is finished, read back from its checkpoint
    after = json.loads((tmp_path / "results.json").read_text())
    assert {(c["method"], c["acquisition"], c["repeat"]): c["history"] for c in after["cells"]} == before
    with pytest.raises(SystemExit, match="learner settings differ in temperature"):
        cli.main([*args, "--temperature", "0.005"])  # finished cells trained otherwise: not read back
    # explicit pairs: a sub-grid read back from the same checkpoints
    sub = [*args[:4], "bayesadam", "--pairs", "bayesadam:bald,map:random", *args[7:]]
    assert cli.main(sub) == 0
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert {(c["method"], c["acquisition"]) for c in cells} == {("bayesadam", "bald"), ("map", "random")}
    again = {(c["method"], c["acquisition"], c["repeat"]): c["history"] for c in cells}
    assert again.items() <= before.items()
    with pytest.raises(SystemExit):
        cli.main(["active", "--task", "cifar"])
    with pytest.raises(SystemExit, match="acquisition"):
        cli.main([*args[:6], "bald,nope", *args[7:]])
    with pytest.raises(SystemExit, match=r"budget must be an int in \[initial=10, pool size=600\], got 5"):
        cli.main([*args[:12], "5", *args[13:]])
    with pytest.raises(SystemExit, match=r"number of classes \(10\) for a balanced start, got 5"):
        cli.main([*args[:8], "5", *args[9:]])  # checked against the data before any work


def test_active_cells_in_worker_processes_equal_one_process(tmp_path):
    """``jobs=2`` runs the cells in spawned worker processes: the same learning curves as one
    process, and the argument checks name what is wrong before any work."""
    from effortless.experiments import active

    kw = dict(task="mnist1d-mlp", methods=("map",), acquisitions=("bald", "random"), initial=10, query=5,
              budget=20, repeats=1, pool_subset=100, n_samples=4, epochs=1, min_steps=5, subset=300,
              progress=False, log=lambda s: None)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for jobs, d in ((1, "one"), (2, "two")):
            active.run(out=tmp_path / d, jobs=jobs, threads=1, **kw)
            assert torch.get_num_threads() == 2  # the caller's setting (the cells ran with 1: it stayed 1)
    finally:
        torch.set_num_threads(threads)
    curves = [{(c["method"], c["acquisition"]): (c["history"], c["labelled"]) for c in json.loads(
        (tmp_path / d / "results.json").read_text())["cells"]} for d in ("one", "two")]  # fmt: skip
    assert len(curves[0]) == 2 and curves[0] == curves[1]
    for bad, name in (({"methods": ("sgd",)}, "method"), ({"acquisitions": ("nope",)}, "acquisition"),
                      ({"hessian": "diag"}, "hessian"), ({"jobs": 0}, "repeats, jobs and threads"),
                      ({"threads": 0}, "threads")):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            active.run(out=tmp_path / "bad", **{**kw, **bad})


def test_active_summary_numbers():
    from effortless.experiments.active import area_under_curve, labels_to_reach

    hist = [{"labels": 10, "accuracy": 0.5}, {"labels": 20, "accuracy": 0.92},
            {"labels": 30, "accuracy": 0.96}]  # fmt: skip
    assert labels_to_reach(hist, 0.9) == 20 and labels_to_reach(hist, 0.95) == 30
    assert labels_to_reach(hist, 0.99) is None
    assert area_under_curve(hist) == pytest.approx(((0.5 + 0.92) / 2 + (0.92 + 0.96) / 2) / 2)


def test_bench_reads_a_config_file_and_flags_override(tmp_path):
    cfg = tmp_path / "bench.json"
    cfg.write_text(json.dumps({"task": "mnist1d-mlp", "methods": "map", "epochs": 1, "subset": 300,
                               "out": str(tmp_path / "from-file")}))  # fmt: skip
    assert cli.main(["bench", "--config", str(cfg), "--seeds", "2", "--out", str(tmp_path / "o"),
                     "--no-progress"]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "o" / "results.json").read_text())
    got = [(r["task"], r["method"], r["seed"]) for r in rows]
    assert got == [("mnist1d-mlp", "map", 0), ("mnist1d-mlp", "map", 1)]
    with pytest.raises(SystemExit, match="unknown field"):
        cfg.write_text(json.dumps({"tasks": "wine"}))
        cli.main(["bench", "--config", str(cfg)])


@pytest.mark.parametrize("argv", [
    ["bench", "--task", "mnist1d-mlp", "--methods", "map", "--seeds", "0"],
    ["bench", "--task", "mnist1d-mlp", "--methods", "map", "--epochs", "0"],
    ["demo", "--epochs", "0"],
    ["hessian-profile", "--widths", "4,0"],
    ["hessian-profile", "--batch", "0"],
    ["hessian-profile", "--reps", "-3"],
    ["active", "--query", "0"],
    ["adam-hessian", "--every", "0"],
])
def test_zero_or_negative_counts_are_refused_before_running(argv, capsys):
    """0 epochs or seeds used to run the default (0 is falsy) or nothing at all, silently."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["active", "--min-steps", "-1"], ["active", "--pool-subset", "-5"]])
def test_negative_counts_where_zero_means_none_are_refused(argv, capsys):
    """--min-steps -1 ran as if 0, silently (type=int)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and "expected an integer ≥ 0" in capsys.readouterr().err


def test_every_option_of_every_command_says_what_it_does():
    """`--help` explains: an option listed bare (bench --no-progress, adam-hessian --seed ...) does not."""
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    bare = [f"{name} {action.option_strings[0]}" for name, parser in commands.items()
            for action in parser._actions if action.option_strings and action.help is None]  # fmt: skip
    assert not bare, bare


def test_bench_with_no_methods_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="nothing to run"):
        cli.main(["bench", "--task", "mnist1d-mlp", "--methods", ",", "--out", str(tmp_path)])


@pytest.mark.parametrize("command", [["demo", "--quick"], ["bench", "--task", "toy-regression"],
                                     ["hessian-profile"], ["active"], ["adam-hessian"]])  # fmt: skip
def test_an_out_path_that_is_a_file_is_refused_before_any_work(command, tmp_path, capsys):
    """It surfaced as a mkdir traceback, after the run (a whole bench's time) in some commands."""
    blocker = tmp_path / "results"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit):
        cli.main([*command, "--out", str(blocker)])
    err = capsys.readouterr().err
    assert "exists and is not a directory" in err
    assert f"usage: effortless {command[0]}" in err  # (the command's usage, not the top level's)
    with pytest.raises(SystemExit):
        cli.main([*command, "--out", str(blocker / "below")])
    assert "cannot create it" in capsys.readouterr().err


def test_bench_help_names_every_task_and_method():
    """The help text is static (no torch import for --help): it must not fall behind the registry."""
    from effortless.baselines import METHODS
    from effortless.experiments.bench import PROFILES
    from effortless.experiments.tasks import TASKS

    bench = cli.build_parser()._subparsers._group_actions[0].choices["bench"]
    text = re.sub(r"-\s+", "-", " ".join(bench.format_help().split()))  # undo line wrapping
    for name in TASKS:
        assert name in text, name
    for name in METHODS:
        assert name in text or name.startswith("bayesadam-"), name
    for task in PROFILES["quick"]["task"]:
        assert task in text.split("quick:")[1].split("full:")[0], task


def test_data_that_is_not_installed_is_a_message_not_a_traceback(monkeypatch, tmp_path, capsys):
    """The demo with neither Fashion-MNIST nor MNIST-1D ended in a traceback; the error names the
    package to install."""
    from effortless import data

    def no_mnist1d(*args, **kwargs):
        raise FileNotFoundError("mnist1d: install the generator with `pip install mnist1d`")

    monkeypatch.setenv("EFFORTLESS_FMNIST", str(tmp_path / "no-such-dir"))
    monkeypatch.setattr(data, "mnist1d", no_mnist1d)
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--quick", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "effortless demo: " in err and "pip install mnist1d" in err


def test_the_experiments_leave_matplotlibs_backend_alone(tmp_path):
    """plots.py (imported by bench, demo, ...) ran matplotlib.use("Agg") at import: a notebook's
    inline backend was switched off for the rest of the session. The figures are Figure objects
    now; the plots are still written."""
    import subprocess
    import sys

    code = (
        "import matplotlib; matplotlib.use('pdf')\n"
        "import torch\n"
        "from effortless.experiments import active, adam_hessian, bench, demo, hessian_profile, plots\n"
        "p = torch.softmax(torch.randn(50, 3), -1); y = torch.randint(0, 3, (50,))\n"
        f"plots.reliability_diagram({{'a': (p, y)}}, {str(tmp_path / 'r.png')!r})\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "pdf", out.stdout + out.stderr
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
