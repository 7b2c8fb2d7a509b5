"""The pool-based active-learning loop: seeded, resumable, and blind to the test labels.

Each round: fit the learner on the labelled set, evaluate it on the test set, score a random
subset of the pool (``pool_subset`` points, as in Gal et al. 2017; all of it when None) with the
acquisition function on ``n_samples`` predictive samples, and move the ``query`` best points from
the pool to the labelled set. Stops when ``budget`` labels are reached (the last round is evaluated,
not queried).

Every random choice of round r comes from generators seeded by ``(seed, r)``, so a run that is
stopped and resumed from its checkpoint (written after every round; ``torch.load(weights_only=True)``
reads it) continues exactly where it stopped. The test set enters only ``evaluate``; the pool is the
training split.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import metrics
from .._checks import is_count
from .._io import write_atomic
from .acquisition import ACQUISITIONS, select


@dataclass(frozen=True)
class ActiveConfig:
    initial: int = 20
    query: int = 10
    budget: int = 1000
    pool_subset: int | None = 2000
    n_samples: int = 20
    warm_start: bool = False
    seed: int = 0

    def __post_init__(self):  # NumPy ints kept as ints: the checkpoint loads with weights_only=True
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if is_count(v, minimum=-(2**63)):
                object.__setattr__(self, f.name, int(v))

    def check(self, n_pool: int | None, n_classes: int):
        """Raise ValueError for a bad setting; ``n_pool`` None when the pool is not known yet."""
        if not is_count(self.initial, max(n_classes, 1)):
            raise ValueError(f"initial must be an int >= the number of classes ({n_classes}) for a balanced "
                             f"start, got {self.initial!r}")  # fmt: skip
        if not is_count(self.query):
            raise ValueError(f"query must be a positive int, got {self.query!r}")
        top = float("inf") if n_pool is None else n_pool
        if not (is_count(self.budget) and self.initial <= self.budget <= top):
            bound = "" if n_pool is None else f", pool size={n_pool}"
            raise ValueError(f"budget must be an int in [initial={self.initial}{bound}], got {self.budget!r}")
        if self.pool_subset is not None and not is_count(self.pool_subset):
            raise ValueError(f"pool_subset must be None or a positive int, got {self.pool_subset!r}")
        if not is_count(self.n_samples):
            raise ValueError(f"n_samples must be a positive int, got {self.n_samples!r}")
        if not is_count(self.seed, minimum=-(2**63)):
            raise ValueError(f"seed must be an int, got {self.seed!r}")


@dataclass
class ActiveState:
    labelled: list[int]
    history: list[dict] = field(default_factory=list)  # one row per evaluated round
    queried: list[list[int]] = field(default_factory=list)  # the indices added by each round
    seconds: float | None = 0.0  # wall time of all rounds, over resumed runs (None: not recorded)

    def to_dict(self):
        return {"labelled": list(self.labelled), "history": self.history, "queried": self.queried,
                "seconds": self.seconds}  # fmt: skip


def balanced_initial(y: torch.Tensor, n: int, n_classes: int, generator: torch.Generator) -> list[int]:
    """``n`` indices with the classes as equally represented as ``n`` allows (remainder random)."""
    out: list[int] = []
    per, rest = divmod(n, n_classes)
    for c in range(n_classes):
        idx = (y == c).nonzero().reshape(-1)
        if len(idx) < per:
            raise ValueError(f"class {c} has {len(idx)} examples, fewer than the {per} a balanced start "
                             "needs")  # fmt: skip
        out += idx[torch.randperm(len(idx), generator=generator)[:per]].tolist()
    if rest:
        chosen = set(out)
        left = torch.tensor([i for i in range(len(y)) if i not in chosen])
        out += left[torch.randperm(len(left), generator=generator)[:rest]].tolist()
    return out


def _gen(seed: int, round_: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + 7919 * round_ + stream)


def evaluate(trained, x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    p = trained.probs(x_test)
    return {
        "accuracy": metrics.accuracy(p, y_test),
        "nll": metrics.nll(p, y_test),
        "ece": metrics.ece(p, y_test),
    }


def run_loop(
    learner: Callable,
    acquisition: str,
    x_pool: torch.Tensor,
    y_pool: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    n_classes: int,
    config: ActiveConfig = ActiveConfig(),
    checkpoint: str | Path | None = None,
    progress: Callable[[dict], None] | None = None,
    learner_settings: dict | None = None,
) -> ActiveState:
    """Run (or resume from ``checkpoint``) one active-learning experiment; return its state.

    ``learner(x, y, seed, warm)`` is a :mod:`effortless.active.learners` learner; ``progress`` is
    called with each round's history row. ``learner_settings`` (e.g. the learner's
    :class:`TrainConfig` as a dict) is stored in the checkpoint beside ``config``: resuming with
    other settings raises instead of mixing rounds trained two ways.
    """
    if acquisition not in ACQUISITIONS:
        raise ValueError(f"acquisition must be one of {sorted(ACQUISITIONS)}, got {acquisition!r}")
    if len(x_pool) != len(y_pool):
        raise ValueError(f"x_pool and y_pool differ in length ({len(x_pool)} vs {len(y_pool)})")
    config.check(len(x_pool), n_classes)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    settings = dict(learner_settings or {})
    state = _load(ckpt, config, acquisition, settings) if ckpt is not None and ckpt.exists() else None
    if state is None:
        state = ActiveState(balanced_initial(y_pool, config.initial, n_classes, _gen(config.seed, 0, 0)))
    if state.history and state.history[-1]["labels"] == len(state.labelled) >= config.budget:
        return state  # finished before
    warm = None  # (models are not checkpointed: a resumed warm-start run fits its first round cold)
    t0 = time.perf_counter()

    def clock():  # wall time so far, kept in the checkpoint so a resumed run reports all of it
        nonlocal t0
        now = time.perf_counter()
        if state.seconds is not None:
            state.seconds += now - t0
        t0 = now

    while True:
        r = len(state.history)
        lab = torch.tensor(state.labelled)
        seed = 1_000 * config.seed + r
        trained = learner(x_pool[lab], y_pool[lab], seed, warm if config.warm_start else None)
        row = {"round": r, "labels": len(state.labelled), **evaluate(trained, x_test, y_test)}
        state.history.append(row)
        if progress is not None:
            progress(row)
        if len(state.labelled) >= config.budget:
            clock()
            _save(ckpt, state, config, acquisition, settings)
            return state
        k = min(config.query, config.budget - len(state.labelled))
        taken = set(state.labelled)
        pool = torch.tensor([i for i in range(len(x_pool)) if i not in taken])
        g = _gen(config.seed, r + 1, 1)
        if config.pool_subset is not None and config.pool_subset < len(pool):
            pool = pool[torch.randperm(len(pool), generator=g)[: config.pool_subset]]
        lp = trained.log_probs(x_pool[pool], config.n_samples, _gen(config.seed, r + 1, 2))
        picked = pool[select(acquisition, lp, k, _gen(config.seed, r + 1, 3))].tolist()
        state.labelled += picked
        state.queried.append(picked)
        warm = trained
        clock()
        _save(ckpt, state, config, acquisition, settings)


def _save(ckpt, state, config, acquisition, settings):
    if ckpt is None:
        return
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    saved = {"config": dataclasses.asdict(config), "acquisition": acquisition, "learner": settings,
             **state.to_dict()}  # fmt: skip
    write_atomic(ckpt, lambda tmp: torch.save(saved, tmp))  # (an interrupted save: the old checkpoint)


def _load(ckpt, config, acquisition, settings):
    d = torch.load(ckpt, weights_only=True)
    old = d.get("learner", {})  # checkpoints written before the settings were stored have none
    if d["config"] != dataclasses.asdict(config) or d["acquisition"] != acquisition or old != settings:
        changed = sorted(k for k in {**old, **settings} if old.get(k) != settings.get(k))
        raise ValueError(
            f"{ckpt} was written by a different experiment ({d['acquisition']}, {d['config']}"
            + (f"; learner settings differ in {', '.join(changed)}" if changed else "")
            + "); use another output directory or delete it"
        )
    return ActiveState(d["labelled"], d["history"], d["queried"], d.get("seconds"))
