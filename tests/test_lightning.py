"""BayesAdam inside Lightning (in-process; DDP on 2 processes runs in examples/06_lightning_ddp.py)."""

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

import effortless as ef  # noqa: E402
from effortless.integrations.lightning import PosteriorMetrics  # noqa: E402


def _data(n=256, seed=0, shuffle=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :3] @ torch.randn(3, 4, generator=g)).argmax(1)
    ds = torch.utils.data.TensorDataset(x, y)
    return (torch.utils.data.DataLoader(ds, batch_size=32, shuffle=shuffle),
            torch.utils.data.DataLoader(ds, batch_size=64))  # fmt: skip


class Auto(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        self.losses = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.losses.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        gen = torch.Generator().manual_seed(0)
        return ef.BayesAdam(self.parameters(), n_data=256, lr=1e-2, generator=gen)


class Manual(Auto):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        with opt.optimizer.sampled_params(train=True):
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.manual_backward(loss)
        opt.step()
        self.losses.append(float(loss.detach()))


def _trainer(tmp_path, epochs, **kw):
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, default_root_dir=tmp_path, **kw)  # fmt: skip


@pytest.mark.parametrize("cls", [Auto, Manual])
def test_trains_in_automatic_and_manual_optimisation(tmp_path, cls):
    train, val = _data()
    L.seed_everything(0)
    model = cls()
    trainer = _trainer(tmp_path, 15, callbacks=[PosteriorMetrics(n_samples=3)])
    trainer.fit(model, train, val)
    first, last = sum(model.losses[:8]) / 8, sum(model.losses[-8:]) / 8
    assert last < 0.6 * first
    opt = trainer.optimizers[0]
    assert opt.state[model.net[0].weight]["step"] == len(model.losses)  # one BayesAdam step per batch
    logged = trainer.callback_metrics
    for k in ("posterior/nll", "posterior/ece", "posterior/accuracy", "posterior/mean_weight_std"):
        assert k in logged and torch.isfinite(logged[k])
    assert float(logged["posterior/mean_weight_std"]) > 0


def test_the_nll_gain_is_over_the_posterior_mean_not_the_running_mean(tmp_path):
    """``posterior/nll_gain_over_mean`` compared the predictive with the network at the running
    mean μ; the posterior's mean is the averaged means, so the gain mixed in the averaging's."""
    train, val = _data()
    L.seed_everything(0)
    model = Auto()
    trainer = _trainer(tmp_path, 3, callbacks=[PosteriorMetrics(n_samples=2)])
    trainer.fit(model, train, val)
    opt = trainer.optimizers[0]
    post = opt.posterior()
    assert not torch.equal(next(iter(post.mean.values())), model.net[0].weight)  # (averaging is on)
    gen = torch.Generator().manual_seed(trainer.global_step)  # (the callback's: seed + global step)
    x, y = val.dataset.tensors
    model.eval()
    probs = torch.cat([ef.predict(model, post, xb, n_samples=2, generator=gen) for xb in x.split(64)])
    with post.mean_loaded(model), torch.no_grad():
        at_mean = model(x).softmax(-1)
    gain = ef.metrics.nll(at_mean, y) - ef.metrics.nll(probs, y)
    assert float(trainer.callback_metrics["posterior/nll_gain_over_mean"]) == pytest.approx(gain, rel=1e-4)


class WithBatchNorm(Auto):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 4))  # fmt: skip


def test_metrics_callback_recomputes_batchnorm_statistics_with_bn_data(tmp_path, recwarn):
    """Without bn_data the callback's predictive meets BatchNorm's running statistics and warns;
    with it, no warning, and the logged NLL is that of ef.predict with the same bn_data."""
    train, val = _data()
    bn_x = train.dataset.tensors[0][:128]
    L.seed_everything(0)
    model = WithBatchNorm()
    _trainer(tmp_path, 2, callbacks=[PosteriorMetrics(n_samples=2)]).fit(model, train, val)
    assert any("pass bn_data=" in str(w.message) for w in recwarn.list)
    recwarn.clear()
    L.seed_everything(0)
    model = WithBatchNorm()
    trainer = _trainer(tmp_path, 2, callbacks=[PosteriorMetrics(n_samples=2, bn_data=bn_x)])
    trainer.fit(model, train, val)
    assert not any("BatchNorm" in str(w.message) for w in recwarn.list)
    post = trainer.optimizers[0].posterior()
    gen = torch.Generator().manual_seed(trainer.global_step)  # (the callback's: seed + global step)
    x, y = val.dataset.tensors
    model.eval()
    probs = torch.cat([ef.predict(model, post, xb, n_samples=2, generator=gen, bn_data=bn_x)
                       for xb in x.split(64)])  # fmt: skip
    nll = float(-probs[torch.arange(len(y)), y].log().mean())
    assert float(trainer.callback_metrics["posterior/nll"]) == pytest.approx(nll, rel=1e-5)
    with pytest.raises(TypeError, match="bn_data must be a tensor"):
        PosteriorMetrics(bn_data=[bn_x])


def test_checkpoint_resume_is_exact(tmp_path):
    """Lightning restores the optimizer (means, curvature, sampler state); the data order is fixed
    here because a single-device Lightning run does not restore the global RNG that shuffles."""
    train, val = _data(shuffle=False)
    runs = []
    for resume in (False, True):
        L.seed_everything(0)
        model = Auto()
        if resume:
            ckpt = tmp_path / "half.ckpt"
            trainer = _trainer(tmp_path, 2)
            trainer.fit(model, train, val)
            trainer.save_checkpoint(ckpt)
            L.seed_everything(0)
            model = Auto()
            _trainer(tmp_path, 4).fit(model, train, val, ckpt_path=ckpt)
        else:
            _trainer(tmp_path, 4).fit(model, train, val)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_the_metrics_callback_leaves_training_as_it_was(tmp_path):
    """The callback drew its weight samples from the optimizer's sampler, so adding it changed
    every later training sample; it now samples from its own generator."""
    train, val = _data(shuffle=False)
    runs = []
    for callbacks in ([], [PosteriorMetrics(n_samples=3)]):
        L.seed_everything(0)
        model = Auto()
        _trainer(tmp_path, 3, callbacks=callbacks).fit(model, train, val)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_callback_needs_bayesadam(tmp_path):
    class Plain(Auto):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    train, val = _data()
    with pytest.raises(ValueError, match="BayesAdam"):
        _trainer(tmp_path, 1, callbacks=[PosteriorMetrics()]).fit(Plain(), train, val)


def test_accumulate_grad_batches_in_automatic_optimisation_is_refused(tmp_path):
    """Lightning runs the backward of all but the last micro-batch outside optimizer.step, so
    outside the sampled weights: those gradients were taken at the means and mixed in silently."""
    train, _ = _data()
    L.seed_everything(0)
    model = Auto()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="accumulate_grad_batches"):
        _trainer(tmp_path, 1, accumulate_grad_batches=2).fit(model, train)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_manual_optimisation_steps_like_the_plain_loop(tmp_path):
    """Lightning's manual opt.step() passes a do-nothing closure; BayesAdam ran it as a second
    weight sample, so every step averaged the user's gradient with an empty one (half of it, and
    the curvature over two samples). Now the weights match the plain loop bitwise."""
    train, _ = _data(n=96, shuffle=False)
    L.seed_everything(0)
    model = Manual()
    _trainer(tmp_path, 1).fit(model, train)
    L.seed_everything(0)
    ref = Manual()
    opt = ref.configure_optimizers()
    for x, y in train:
        opt.zero_grad()
        with opt.sampled_params(train=True):
            F.cross_entropy(ref(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_several_validation_dataloaders_get_metrics_of_their_own(tmp_path):
    """All validation dataloaders' predictions were pooled into one NLL (an in-distribution set and
    a shifted one gave one number); each now has its own, keyed as Lightning keys them."""
    train, val = _data()
    g = torch.Generator().manual_seed(5)
    other = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(3 * torch.randn(96, 6, generator=g),
                                        torch.randint(0, 4, (96,), generator=g)), batch_size=48)  # fmt: skip
    class TwoLoaders(Auto):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            pass

    L.seed_everything(0)
    model = TwoLoaders()
    trainer = _trainer(tmp_path, 2, callbacks=[PosteriorMetrics(n_samples=2)])
    trainer.fit(model, train, [val, other])
    logged = trainer.callback_metrics
    post = trainer.optimizers[0].posterior()
    model.eval()
    for idx, loader in enumerate((val, other)):
        gen = torch.Generator().manual_seed(trainer.global_step)
        if idx == 1:  # (one generator for the epoch: the first loader's batches drew before)
            for xb, _ in val:
                ef.predict(model, post, xb, n_samples=2, generator=gen)
        x, y = loader.dataset.tensors
        probs = torch.cat([ef.predict(model, post, xb, n_samples=2, generator=gen) for xb, _ in loader])
        key = f"posterior/nll/dataloader_idx_{idx}"
        assert float(logged[key]) == pytest.approx(ef.metrics.nll(probs, y), rel=1e-5), key
    assert "posterior/nll" not in logged


def test_under_ddp_the_logged_metrics_are_the_whole_validation_set(tmp_path, monkeypatch):
    """Each rank's sums are added over the ranks (one collective, ``strategy.reduce``). Before, each
    rank logged its shard's NLL, ECE and accuracy and Lightning averaged them (the ECE of the whole
    set is not the mean of the shards' ECEs). The other rank is simulated: reduce adds its sums."""
    from effortless.integrations import lightning as integration

    train, val = _data()
    g = torch.Generator().manual_seed(9)
    other_probs = torch.softmax(3 * torch.randn(80, 4, generator=g), -1)
    other_at_mean = torch.softmax(3 * torch.randn(80, 4, generator=g), -1)
    other_y = torch.randint(0, 4, (80,), generator=g)
    calls = []

    L.seed_everything(0)
    model = Auto()
    trainer = _trainer(tmp_path, 1, callbacks=[PosteriorMetrics(n_samples=2)])

    def reduce(tensor, reduce_op="mean"):
        if tensor.shape != (1, 4 + 2 * integration.N_BINS):  # (Lightning's own, e.g. loader lengths)
            return tensor
        calls.append(reduce_op)
        return tensor + integration._sums([other_probs], [other_at_mean], [other_y]).to(tensor)[None]

    monkeypatch.setattr(trainer.strategy, "reduce", reduce)
    trainer.fit(model, train, val)
    assert calls == ["sum"]
    post = trainer.optimizers[0].posterior()
    model.eval()
    gen = torch.Generator().manual_seed(trainer.global_step)
    x, y = val.dataset.tensors
    probs = torch.cat([ef.predict(model, post, xb, n_samples=2, generator=gen) for xb, _ in val])
    with post.mean_loaded(model), torch.no_grad():
        at_mean = model(x).softmax(-1)
    probs, at_mean = torch.cat([probs, other_probs]), torch.cat([at_mean, other_at_mean])
    y = torch.cat([y, other_y])
    logged = trainer.callback_metrics
    assert float(logged["posterior/ece"]) == pytest.approx(ef.metrics.ece(probs, y), rel=1e-5)
    assert float(logged["posterior/nll"]) == pytest.approx(ef.metrics.nll(probs, y), rel=1e-5)
    assert float(logged["posterior/accuracy"]) == pytest.approx(ef.metrics.accuracy(probs, y), rel=1e-6)
    gain = ef.metrics.nll(at_mean, y) - ef.metrics.nll(probs, y)
    assert float(logged["posterior/nll_gain_over_mean"]) == pytest.approx(gain, rel=1e-4, abs=1e-6)
