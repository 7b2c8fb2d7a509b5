"""Random sequences of what users do between steps, run in lockstep on four optimizers that must
agree: a reference (eager kernels); a twin that goes through a checkpoint (``torch.save``,
``torch.load(weights_only=True)``, a fresh model and optimizer) at random points, bit-identical;
a twin that skips the evaluation samples, bit-identical (evaluating must leave training alone);
and a twin on the fused (compiled) kernels, equal to float64 round-off.

The operations: one to three samples per step, a block that raises, evaluation samples between
training samples, learning-rate changes, freezing and unfreezing a parameter, a parameter group
added mid-run, another group's hyperparameters edited, ``load_averaged_means``; and the same
with ``train_step`` for the model-side curvature keys. Such sequences found that ``train_step``
kept the hook engine's plan from before a parameter was unfrozen (its curvature never moved);
the evaluation twin fails where ``sampled_params(train=False)`` draws from the training samples'
generator, as it did until it got its own.
"""

from __future__ import annotations

import contextlib
import io
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effortless as ef

X = torch.randn(64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
Y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(3))
SECOND_GROUP = [
    {},
    {"temperature": 0.0},
    {"n_data": 50, "prior_precision": 3.0},
    {"averaging": None, "lr": 3e-3},
    {"hess_init": 1.0, "hess_beta": 0.9, "temperature": 0.5},
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


class _Run:
    """A model and its optimizer; the optimizer covers the first layer, and the second layer too
    once ``add_group`` has run (with the hyperparameters ``second``)."""

    def __init__(self, second: dict | None, checkpoints: bool = False, looks: bool = True, **kw):
        self.second, self.checkpoints, self.looks, self.kw = second, checkpoints, looks, kw
        self.grouped = second is None  # (no second group: one group with every parameter)
        self.model = _model()
        self.opt = self._optimizer()

    def _groups(self):
        params = list(self.model.parameters())
        if self.second is None:
            return [{"params": params}]
        groups = [{"params": params[:2]}]
        if self.grouped:
            groups.append(dict(self.second, params=params[2:]))
        return groups

    def _optimizer(self):
        gen = torch.Generator().manual_seed(1)
        return ef.BayesAdam(self._groups(), n_data=200, lr=1e-2, generator=gen, **self.kw)

    def add_group(self):
        self.opt.add_param_group(dict(self.second, params=list(self.model.parameters())[2:]))
        self.grouped = True
        self.opt.zero_grad()  # (the new parameters' gradients piled up while nobody cleared them)

    def through_checkpoint(self):
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict()}, buf)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        frozen = [not p.requires_grad for p in self.model.parameters()]
        self.model = _model()
        for p, f in zip(self.model.parameters(), frozen):
            p.requires_grad_(not f)
        self.model.load_state_dict(saved["model"])
        self.opt = self._optimizer()
        self.opt.load_state_dict(saved["opt"])

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {f"param {i}": p.detach().clone() for i, p in enumerate(self.model.parameters())}
        for i, st in self.opt.state_dict()["state"].items():
            for k, v in st.items():
                out[f"state {i} {k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(float(v))
        post = self.opt.posterior()
        for k in post.mean:
            out[f"posterior {k}"] = torch.cat([post.mean[k].flatten(), post.precision[k].flatten()])
        return out


def _apply(run: _Run, op: tuple) -> None:
    kind = op[0]
    if kind == "sample":
        with run.opt.sampled_params():
            F.cross_entropy(run.model(X[op[1] : op[1] + 16]), Y[op[1] : op[1] + 16]).backward()
    elif kind == "raise":
        with pytest.raises(KeyError), run.opt.sampled_params():
            F.cross_entropy(run.model(X[:16]), Y[:16]).backward()
            raise KeyError("a failing batch")
    elif kind == "look" and run.looks:  # a posterior sample between training samples: weights restored
        before = [p.detach().clone() for p in run.model.parameters()]
        with run.opt.sampled_params(train=False):
            run.model(X[:4])
        assert all(torch.equal(a, p) for a, p in zip(before, run.model.parameters()))
    elif kind == "train_step":
        run.opt.train_step(run.model, X[op[1] : op[1] + 16], Y[op[1] : op[1] + 16])
    elif kind == "lr":
        for g in run.opt.param_groups:
            g["lr"] *= 0.8
    elif kind == "freeze":
        p = list(run.model.parameters())[op[1]]
        p.requires_grad_(not p.requires_grad)
    elif kind == "add_group":
        run.add_group()
    elif kind == "edit":
        run.opt.param_groups[-1][op[1]] = op[2]
    elif kind == "step":
        run.opt.step()
        run.opt.zero_grad()
    elif kind == "load_averaged_means":
        run.opt.load_averaged_means()
    elif kind == "checkpoint" and run.checkpoints:
        run.through_checkpoint()


def _ops(rng: random.Random, t: int, add_at: int | None, model_side: bool) -> list[tuple]:
    ops = [("add_group",)] if t == add_at else []
    if model_side:
        ops.append(("train_step", rng.randrange(48)))
    else:
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            ops.append(("sample", rng.randrange(48)))
            if rng.random() < 0.1:
                ops.append(("look",))
            if rng.random() < 0.08:
                ops.append(("raise",))
    if rng.random() < 0.1:
        ops.append(("lr",))
    if rng.random() < 0.1:
        ops.append(("freeze", rng.choice([1, 3])))  # a bias: the other weights keep training
    if add_at is not None and rng.random() < 0.1:
        key = rng.choice(["temperature", "lr", "averaging"])
        value = {"temperature": rng.choice([0.0, 0.02, 0.1]), "lr": rng.choice([1e-3, 5e-3]),
                 "averaging": rng.choice([None, 0.1, 0.3])}[key]  # fmt: skip
        ops.append(("edit", key, value))
    if not model_side:
        ops.append(("step",))
    if rng.random() < 0.1:
        ops.append(("load_averaged_means",))
    if rng.random() < 0.2:
        ops.append(("checkpoint",))
    return ops


def _lockstep(seed: int, steps: int, grouped: bool, model_side: bool = False, **kw) -> None:
    rng = random.Random(seed)
    second = rng.choice(SECOND_GROUP) if grouped else None
    add_at = rng.randrange(steps // 2) if grouped else None
    if model_side:
        kw["mc_samples"] = rng.choice([1, 2])
    ref = _Run(second, fused=False, **kw)
    resumed = _Run(second, checkpoints=True, fused=False, **kw)
    fused = _Run(second, fused=True, **kw)
    blind = _Run(second, looks=False, fused=False, **kw)  # (evaluating must not change training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (e.g. n_data smaller than ... : not what is tested)
        for t in range(steps):
            ops = _ops(rng, t, add_at, model_side)
            for run in (ref, resumed, fused, blind):
                for op in ops:
                    _apply(run, op)
            a, b, c, d = ref.snapshot(), resumed.snapshot(), fused.snapshot(), blind.snapshot()
            where = f"seed {seed}, step {t}, after {ops}"
            assert a.keys() == b.keys() == c.keys() == d.keys(), where
            for k in a:
                assert torch.equal(a[k], b[k]), f"{k} differs after a checkpoint; {where}"
                assert torch.equal(a[k], d[k]), f"{k} differs from the run without evaluations; {where}"
                torch.testing.assert_close(c[k], a[k], rtol=1e-9, atol=1e-12, msg=f"{k} fused; {where}")


@pytest.mark.parametrize("seed", range(3))
def test_manual_loop_sequences_agree_across_checkpoints_and_kernels(seed):
    _lockstep(seed, steps=30, grouped=False)


@pytest.mark.parametrize("seed", range(3))
def test_sequences_with_a_group_added_and_edited_agree(seed):
    _lockstep(seed, steps=30, grouped=True)


@pytest.mark.parametrize("hessian", ["ggn", "efisher", "ggn-mc", "kfac"])
def test_train_step_sequences_agree_across_checkpoints_and_kernels(hessian):
    _lockstep(7, steps=25, grouped=False, model_side=True, hessian=hessian)


SEEDS = 6


def _unit_noise(run: _Run, mus: dict, hs: dict, thetas: dict) -> dict[int, torch.Tensor]:
    """sign · ε = (θ − μ) / σ of each sampled tensor, σ from the state before the draw."""
    out = {}
    params = list(run.model.parameters())
    for i in thetas.keys() & hs.keys():  # (only the optimizer's parameters are sampled)
        group = next(g for g in run.opt.param_groups if any(q is params[i] for q in g["params"]))
        if group["temperature"] > 0:
            var = group["temperature"] / (group["n_data"] * hs[i] + group["prior_precision"])
            out[i] = (thetas[i] - mus[i]) / var.sqrt()
    return out


@pytest.mark.parametrize("seed", range(SEEDS))
def test_every_second_training_sample_is_the_mirror_of_the_one_before(seed):
    """An oracle the twins cannot be: whatever happens between the draws (freezing and
    unfreezing, a parameter group added, N, δ or T edited, a failing block, evaluation samples,
    a checkpoint), the two draws of an antithetic pair have unit noise ε and −ε. It failed when a
    parameter frozen between its sample and step() kept θ in its noise buffer (its mirror was
    μ − σθ), and when N, δ or T edited there made the step recover ε with the new σ."""
    rng = random.Random(seed)
    run = _Run(rng.choice(SECOND_GROUP), checkpoints=True, fused=bool(seed % 2))
    add_at = rng.randrange(15)
    draws = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(40):
            ops = [("add_group",)] if t == add_at else []
            if rng.random() < 0.3:
                ops.append(("freeze", rng.choice([1, 3])))
            ops += rng.choice([[], [], [], [("raise",)], [("look",)], [("sample", rng.randrange(48))]])
            ops.append(("sample", rng.randrange(48)))  # (a step needs one sample that did not fail)
            if rng.random() < 0.3:  # (between the sample and the step)
                ops.append(("freeze", rng.choice([1, 3])))
            if rng.random() < 0.2:  # (so is an edit of σ's ingredients: the pair's σ is as drawn)
                key = rng.choice(["n_data", "prior_precision", "temperature"])
                values = {"n_data": [100, 200, 400], "prior_precision": [0.5, 1.0, 3.0],
                          "temperature": [0.005, 0.01, 0.05]}  # fmt: skip
                ops.append(("edit", key, rng.choice(values[key])))
            ops += [("step",), ("checkpoint",)] if rng.random() < 0.2 else [("step",)]
            for op in ops:
                if op[0] not in ("sample", "raise"):
                    _apply(run, op)
                    continue
                params = list(run.model.parameters())
                mus = {i: p.detach().clone() for i, p in enumerate(params)}
                hs = {i: run.opt.state[p]["hess"].clone() for i, p in enumerate(params) if p in run.opt.state}
                failing = pytest.raises(KeyError) if op[0] == "raise" else contextlib.nullcontext()
                with failing, run.opt.sampled_params():
                    thetas = {i: p.detach().clone() for i, p in enumerate(params)
                              if p.requires_grad and not torch.equal(p, mus[i])}  # fmt: skip
                    F.cross_entropy(run.model(X[:16]), Y[:16]).backward()
                    if op[0] == "raise":
                        raise KeyError("a failing batch")
                hs.update({i: run.opt.state[params[i]]["hess"] for i in thetas if i not in hs})  # (new state)
                draws.append(_unit_noise(run, mus, hs, thetas))
    pairs = 0
    for first, second in zip(draws[0::2], draws[1::2]):
        for i in first.keys() & second.keys():
            torch.testing.assert_close(second[i], -first[i], rtol=1e-7, atol=1e-9)
            pairs += 1
    assert pairs > 20
