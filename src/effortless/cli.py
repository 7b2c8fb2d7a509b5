"""The ``effortless`` command line (also ``python -m effortless``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DESCRIPTION = """effortless: Bayesian deep learning at the cost of Adam.

Run `effortless COMMAND --help` for a command's options."""


def _positive(text: str) -> int:
    """argparse type: an int ≥ 1 (0 epochs, seeds or widths would run nothing, or a default)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    """argparse type: an int ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text!r}")
    return value


def _positive_list(text: str) -> list[int]:
    """argparse type: a comma list of ints ≥ 1."""
    return [_positive(v) for v in text.split(",") if v.strip()] or [_positive("")]


def _demo(args) -> int:
    import torch

    from .experiments import demo

    if args.threads:
        torch.set_num_threads(args.threads)
    demo.run(
        out=args.out,
        epochs=args.epochs,
        quick=args.quick,
        seed=args.seed,
        n_samples=args.samples,
        progress=not args.no_progress,
    )
    return 0


def _hessian_profile(args) -> int:
    import torch

    from .experiments import hessian_profile as hp

    torch.set_num_threads(args.threads)
    rows = hp.profile(widths=args.widths, batch=args.batch, reps=args.reps, progress=not args.no_progress)
    print(hp.write(rows, Path(args.out)))
    print(f"\nWrote {args.out}/results.json, results.md, profile.png")
    return 0


def _adam_hessian(args) -> int:
    import torch

    from .experiments import adam_hessian

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _, _, table = adam_hessian.run(
            task=args.task,
            epochs=args.epochs,
            every=args.every,
            probe=args.probe,
            probes=args.probes,
            seed=args.seed,
            out=args.out,
            subset=args.subset,
            keys=[k.strip() for k in args.keys.split(",") if k.strip()],
        )
    except (ValueError, FileNotFoundError) as err:  # (bad settings, data not installed)
        raise SystemExit(f"effortless adam-hessian: {err}") from None
    print(table)
    print(f"\nWrote {args.out}/results.json, results.md, correlation.png, scatter.png")
    return 0


def _bench(args) -> int:
    import torch

    from .experiments import bench

    torch.set_num_threads(args.threads) if args.threads else None
    if args.merge:
        args.out = args.out or "runs/bench"
        try:
            bench.merge(args.merge, args.out)
        except ValueError as err:  # a missing directory, shards of different runs
            raise SystemExit(f"effortless bench --merge: {err}") from None
        print(f"\nWrote {args.out}/results.json, results.md")
        return 0
    shard = None
    if args.shard:
        try:
            i, n = (int(v) for v in args.shard.split("/"))
        except ValueError:
            raise SystemExit(f"--shard must look like I/N (e.g. 0/4), got {args.shard!r}") from None
        shard = (i, n)
    try:
        cfg = bench.resolve_config(
            args.profile, args.config, task=args.task, methods=args.methods, seeds=args.seeds,
            epochs=args.epochs, subset=args.subset, out=args.out, device=args.device,
        )  # fmt: skip
    except (ValueError, OSError) as err:
        raise SystemExit(f"effortless bench: {err}") from None
    try:
        bench.run(
            tasks=cfg["task"],
            methods=cfg["methods"],
            seeds=cfg["seeds"],
            epochs=cfg["epochs"],
            out=cfg["out"],
            subset=cfg["subset"],
            progress=not args.no_progress,
            shard=shard,
            tensorboard=args.tensorboard,
            device=cfg["device"],
        )
    except ValueError as err:  # bad task/method names, a missing optional package
        raise SystemExit(f"effortless bench: {err}") from None
    args.out = cfg["out"]
    print(f"\nWrote {args.out}/results.json, results.md and plots")
    return 0


def _active(args) -> int:
    from .experiments import active

    pairs = None
    if args.pairs:
        pairs = [tuple(x.split(":")) for x in _csv(args.pairs)]
        if not all(len(p) == 2 for p in pairs):
            raise SystemExit(f"--pairs must look like bayesadam:bald,mc-dropout:bald, got {args.pairs!r}")
    try:
        _, md = _run_active(active, args, pairs)
    except ValueError as err:  # bad names or sizes: a message, not a traceback
        raise SystemExit(f"effortless active: {err}") from None
    print(md)
    print(f"\nWrote {args.out}/results.json, results.md, learning_curves.png")
    return 0


def _run_active(active, args, pairs):
    return active.run(
        pairs=pairs,
        task=args.task,
        methods=_csv(args.method),
        acquisitions=_csv(args.acquisition),
        initial=args.initial,
        query=args.query,
        budget=args.budget,
        repeats=args.repeats,
        pool_subset=args.pool_subset or None,
        n_samples=args.samples,
        warm_start=args.warm_start,
        epochs=args.epochs,
        min_steps=args.min_steps,
        temperature=args.temperature,
        prior_precision=args.prior_precision,
        hessian=args.hessian,
        out=args.out,
        jobs=args.jobs,
        threads=args.threads,
        progress=not args.no_progress,
        subset=args.subset,
    )


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effortless", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    d = sub.add_parser(
        "demo",
        help=(
            "train Adam and BayesAdam on Fashion-MNIST (MNIST-1D if absent), compare accuracy, NLL, "
            "calibration and out-of-distribution detection, and plot them"
        ),
        description=(
            "Train the same MLP with Adam (MAP) and with BayesAdam (defaults: only n_data set) on "
            "Fashion-MNIST; report accuracy, NLL, ECE, Brier score, OOD AUROC against the MNIST test "
            "set, training time and BayesAdam's per-step cost against Adam's (timed interleaved on "
            "one batch after training, ~7 s); write results.json, results.md, reliability.png, "
            "confidence_hist.png and "
            "toy_regression.png (BayesAdam's predictive band on 1-D data with a gap) into --out. "
            "Falls back to MNIST-1D when Fashion-MNIST is not installed."
        ),
    )
    d.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    d.add_argument("--epochs", type=_positive, default=None, help="epochs (default 5; 30 for MNIST-1D)")
    d.add_argument("--samples", type=_positive, default=32,
                   help="posterior samples per prediction (default 32)")  # fmt: skip
    d.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order, noise")
    d.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)")
    d.add_argument("--quick", action="store_true", help="tiny run (1 epoch, 3,000 examples) to check setup")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)
    h = sub.add_parser(
        "hessian-profile",
        help=(
            "time every curvature estimator and operator against model size, as a multiple of one "
            "forward+backward, with memory; table and log-log plot"
        ),
        description=(
            "Time the curvature quantities (diagonal GGN exact and Monte-Carlo, empirical Fisher, "
            "KFAC factors, each with the gradient; the torch.func paths; Hutchinson; HVP, GVP, CG) "
            "on MLPs 784-w-w-10 for each width, interleaved with a plain forward+backward, and report "
            "the median paired ratio and peak memory. Writes results.json, results.md and profile.png "
            "(log-log) into --out. BackPACK rows appear when backpack-for-pytorch is installed."
        ),
    )
    h.add_argument("--out", default="runs/hessian-profile", help="output directory")
    h.add_argument(
        "--widths",
        type=_positive_list,
        default="1,8,32,128,256,512,1024",
        help="hidden widths (default 1,8,32,128,256,512,1024: ~800 to 1.9M weights)",
    )
    h.add_argument("--batch", type=_positive, default=128, help="batch size (default 128)")
    h.add_argument("--reps", type=_positive, default=30,
                   help="interleaved repetitions per width (default 30)")  # fmt: skip
    h.add_argument("--threads", type=_positive, default=1, help="torch CPU threads (default 1)")
    h.add_argument("--no-progress", action="store_true", help="no progress bar")
    h.set_defaults(func=_hessian_profile)
    b = sub.add_parser(
        "bench",
        help=(
            "methods side by side (MAP, BayesAdam, MC dropout, ensembles, temperature scaling, "
            "last-layer Laplace, adam-laplace, IVON) on the same tasks; resumable"
        ),
        description=(
            "Train and evaluate each method on each task and seed with the same network, data order, "
            "epochs and evaluation (accuracy, NLL, ECE, Brier, OOD AUROC, time). Rows already in "
            "--out/results.json are skipped, so a killed run resumes. Writes results.json, results.md "
            "(mean ± std over seeds, best in bold), reliability and confidence plots. Methods: "
            "map, bayesadam, bayesadam-<hessian key>, bayesadam-bf16 (m, v, h in bf16), "
            "bayesadam-lowmem (no averaged mean, h in bf16), mc-dropout, ensemble, temperature, laplace "
            "(last-layer KFAC, marglik, probit), laplace-diag (all weights, diagonal GGN, marglik, probit), "
            "adam-laplace, swag, vi (MLPs), and the peers ivon and laplace-torch (if installed: "
            "scripts/setup.sh --peers). Regression tasks run map, the bayesadam variants, mc-dropout, "
            "ensemble, laplace and laplace-diag (the GLM predictive, sigma chosen by the evidence)."
        ),
    )
    b.add_argument(
        "--task",
        default=None,
        help="comma list of classification tasks (fmnist-mlp, fmnist-cnn, mnist1d-mlp, mnist1d-cnn; digits, "
        "breast_cancer, wine: 90/10 split per seed) and regression tasks (toy-regression; diabetes, boston: "
        "90/10 split per seed; methods without a regression version skip them) (default fmnist-mlp)",
    )
    b.add_argument("--methods", default=None,
                   help="comma list (default map,bayesadam,mc-dropout,temperature,laplace,adam-laplace)")
    b.add_argument("--seeds", type=_positive, default=None, help="seeds per task × method (default 1)")
    b.add_argument("--epochs", type=_positive, default=None, help="override the task's epochs")
    b.add_argument("--profile", choices=["quick", "full"], default=None,
                   help="quick: every method of ≤5x training cost on fmnist-mlp, mnist1d-mlp and "
                   "toy-regression, 1 seed (~20 min on 2 cores); full: every task, 5 seeds. Both add "
                   "the installed peers (ivon, laplace-torch). Flags given next to it win")
    b.add_argument("--config", default=None,
                   help="JSON (or YAML) file with any of task, methods, seeds, epochs, subset, out, "
                   "device; command-line flags override it")
    b.add_argument("--device", default=None,
                   help="where the networks train and predict: auto (default: CUDA if available, else "
                   "CPU), cpu, cuda or cuda:N; rows record it, and an --out holding rows from another "
                   "device type is refused")
    b.add_argument(
        "--subset", type=_positive, default=None, help="first N training / N/5 test examples (quick runs)"
    )
    b.add_argument("--threads", type=_positive, default=None,
                   help="torch CPU threads (default: torch's)")
    b.add_argument("--shard", default=None,
                   help="I/N: run only slice I (counted from 0: 0 <= I < N) of N interleaved slices of the "
                   "task × method × seed grid (job arrays: one --out per shard, then --merge)")  # fmt: skip
    b.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="combine the results.json of these bench directories into --out (no training)")
    b.add_argument("--tensorboard", action="store_true",
                   help="also write each run's training curve and metrics as TensorBoard scalars under "
                   "OUT/tensorboard (needs: pip install 'effortless-bayes[tensorboard]')")  # fmt: skip
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--out", default=None, help="output directory (default runs/bench)")
    b.set_defaults(func=_bench)
    a = sub.add_parser(
        "adam-hessian",
        help=(
            "how well Adam's state (and BayesAdam's curvature) matches the exact diagonal GGN / "
            "empirical Fisher / Hessian during training; adam-laplace vs MAP"
        ),
        description=(
            "Train with Adam and BayesAdam side by side; every --every steps compare Adam's raw "
            "second moment, the empirical Fisher it implies (posterior_from_adam) and BayesAdam's "
            "curvature (one run per --keys entry) against the exact diagonal GGN, empirical "
            "Fisher and (Hutchinson) Hessian on a probe set, per layer (Spearman/Pearson of logs, "
            "median ratio). Then evaluate every estimate used as a posterior (adam-laplace = MAP + "
            "posterior_from_adam, the naive N·v̂, each BayesAdam's posterior(); probit) against MAP "
            "on the test set. Writes "
            "results.json, results.md, correlation.png, scatter.png into --out."
        ),
    )
    a.add_argument("--task", default="fmnist-mlp", choices=["fmnist-mlp", "fmnist-cnn", "mnist1d-mlp"],
                   help="network and data (default fmnist-mlp)")
    a.add_argument("--epochs", type=_positive, default=2, help="training epochs (default 2)")
    a.add_argument("--every", type=_positive, default=200, help="steps between comparisons")
    a.add_argument("--probe", type=_positive, default=512, help="training examples in the probe set")
    a.add_argument("--probes", type=_positive, default=32, help="Hutchinson probes for the Hessian diagonal")
    a.add_argument("--subset", type=_positive, default=None, help="use only the first N training examples")
    a.add_argument("--keys", default="reparam,ggn-mc",
                   help="comma list of BayesAdam Hessian keys to train side by side, one run each "
                   "(reparam, gradsq, efisher, ggn-mc, ggn, hutchinson, kfac; default reparam,ggn-mc)")
    a.add_argument("--seed", type=int, default=0, help="seed of the data order, initialisation and probes")
    a.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's)")
    a.add_argument("--out", default="runs/adam-hessian", help="output directory (default runs/adam-hessian)")
    a.set_defaults(func=_adam_hessian)

    from .active import ACQUISITIONS, LEARNERS
    from .experiments.active import TASKS as ACTIVE_TASKS

    al = sub.add_parser(
        "active",
        help=(
            "pool-based active learning: labels needed to reach 90/95 %% test accuracy for each "
            "method × acquisition function (BALD, BatchBALD, entropy, random...)"
        ),
        description=(
            "Active learning, Gal et al. (2017) protocol by default: a balanced start of --initial "
            "labels, --query points per round chosen from a random subset of --pool-subset pool "
            "points by each acquisition function on --samples predictive samples, until --budget "
            "labels; the network is retrained from scratch every round (--warm-start keeps the "
            "weights) and evaluated on the whole test set. Every method × acquisition × repeat "
            "cell checkpoints after each round: rerun the same command to resume. Writes "
            "results.json, results.md (labels to reach 90 % and 95 % test accuracy, area under "
            "the learning curve) and learning_curves.png into --out. Methods: "
            + ", ".join(LEARNERS) + ". Acquisitions: " + ", ".join(ACQUISITIONS) + "."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    al.add_argument("--task", default="mnist", choices=sorted(ACTIVE_TASKS),
                    help="mnist/fmnist: LeNet; mnist1d: 1-D CNN; mnist1d-mlp: MLP")  # fmt: skip
    al.add_argument("--method", default="bayesadam,mc-dropout", help="comma list of methods")
    al.add_argument("--acquisition", default="bald,random", help="comma list of acquisition functions")
    al.add_argument("--pairs", default=None,
                    help="instead of every method × acquisition: a comma list of method:acquisition "
                    "pairs, e.g. bayesadam:bald,bayesadam:random,mc-dropout:bald%(default).0s")  # fmt: skip
    al.add_argument("--initial", type=_positive, default=20, help="balanced initial labelled set")
    al.add_argument("--query", type=_positive, default=10, help="labels acquired per round")
    al.add_argument("--budget", type=_positive, default=1000, help="stop at this many labels")
    al.add_argument("--repeats", type=_positive, default=3, help="repeats (seeds) per method × acquisition")
    al.add_argument("--pool-subset", type=_non_negative, default=2000,
                    help="score a random subset of this many pool points per round (0: all)")  # fmt: skip
    al.add_argument("--samples", type=_positive, default=20, help="predictive samples S per pool point")
    al.add_argument("--warm-start", action="store_true", help="start each round from the last weights")
    al.add_argument("--epochs", type=_positive, default=30, help="passes over the labelled set per round")
    al.add_argument("--min-steps", type=_non_negative, default=200, help="at least this many steps per round")
    al.add_argument("--temperature", type=float, default=None,
                    help="the bayesadam learner's temperature (default: 5e-4, see effortless.active.learners)"
                    "%(default).0s")
    al.add_argument("--prior-precision", type=float, default=None,
                    help="the bayesadam learner's prior precision (default: 0.01)%(default).0s")
    al.add_argument("--hessian", default=None,
                    help="the bayesadam learner's curvature estimator (default: reparam, see "
                    "effortless.active.learners)%(default).0s")
    al.add_argument("--jobs", type=_positive, default=1, help="grid cells run in parallel processes")
    al.add_argument("--threads", type=_positive, default=1, help="torch threads per job")
    al.add_argument("--subset", type=_positive, default=None,
                    help="use only the first N training examples (default: all)%(default).0s")
    al.add_argument("--no-progress", action="store_true", help="no progress bars")
    al.add_argument("--out", default="runs/active", help="output directory (rerun with it to resume)")
    al.set_defaults(func=_active)
    for command in sub.choices.values():  # (errors found after parsing print the command's usage)
        command.set_defaults(parser=command)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    command = args.parser
    out = getattr(args, "out", None)
    if out:  # before any work: a file in the way surfaced as a mkdir traceback at the end of a run
        path = Path(out)
        if path.exists() and not path.is_dir():
            command.error(f"--out {path}: exists and is not a directory")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            command.error(f"--out {path}: cannot create it ({e.strerror or e})")
    try:
        return args.func(args)
    except FileNotFoundError as err:  # data not installed: the message names what to install
        parser.exit(2, f"effortless {args.command}: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
