"""``ivon``, the peer from its own package (ivon-opt, ``pip install effortless-bayes[peers]``):
IVON (Shen et al. 2024) with lr 0.1 and ``hess_init`` 0.1, ``ess`` the training-set size, the
same user loop as BayesAdam's, predictions averaged over 30 posterior samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import Fitted, chunked, train_loop

PACKAGE = "ivon"  # the import name (distribution ivon-opt)


def fit(task, split, seed, epochs, progress, lr=0.1, hess_init=0.1, samples=30) -> Fitted:
    import ivon

    torch.manual_seed(seed)
    model = task.model(0.0).to(split.x_train.device)
    opt = ivon.IVON(model.parameters(), lr=lr, ess=len(split.x_train), hess_init=hess_init)

    def one_step(x, y):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        opt.step()
        return loss

    seconds, step_ms, peak, history = train_loop(one_step, model, opt, split, task.batch_size, seed, epochs)

    def predict(x):
        torch.manual_seed(seed)
        with torch.no_grad():
            outs = []
            for _ in range(samples):
                with opt.sampled_params():
                    outs.append(chunked(lambda xb: model(xb).softmax(-1), x))
            return torch.stack(outs).mean(0)

    return Fitted(predict, seconds, step_ms, peak, history)
