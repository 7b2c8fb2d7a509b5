"""Active learning by hand: BayesAdam's posterior → (N, C, S) log-probs → BALD / BatchBALD picks.

The (N, C, S) tensor from `ef.predict_samples` is all an acquisition function needs. It is the
layout baal's heuristics score (as probabilities, `log_probs.exp()`) and, transposed to (N, S, C),
what batchbald_redux's `get_batchbald_batch` takes; both are used below when installed.
`effortless active` runs whole experiments (see the README).

    python examples/05_active_learning.py [--quick]
"""

import sys

import torch
import torch.nn.functional as F

import effortless as ef
from effortless import active, data
from effortless.models import MLP

quick = "--quick" in sys.argv
split = data.mnist1d(n=2000 if quick else 5000)
g = torch.Generator().manual_seed(0)
labelled = active.balanced_initial(split.y_train, 50, 10, g)
pool = torch.tensor(sorted(set(range(len(split.y_train))) - set(labelled)))

for rnd in range(2 if quick else 5):
    torch.manual_seed(rnd)
    model = MLP(40, [128, 128], 10)
    x, y = split.x_train[labelled], split.y_train[labelled]
    opt = ef.BayesAdam(model.named_parameters(), n_data=len(x), temperature=1e-3)
    for _ in range(100 if quick else 400):
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(split.x_test).argmax(-1) == split.y_test).float().mean()
    log_probs = ef.predict_samples(model, opt.posterior(), split.x_train[pool], n_samples=16, generator=g)
    picks = active.select("bald", log_probs, 10, g)
    joint, mi = active.batchbald(log_probs, 10, generator=g)
    overlap = len(set(picks.tolist()) & set(joint.tolist()))
    print(f"round {rnd}: {len(labelled)} labels, test accuracy {acc:.3f}; log_probs "
          f"{tuple(log_probs.shape)}; BALD top-10 and BatchBALD share {overlap}/10 points; joint mutual "
          f"information of the batch {mi[-1]:.3f} nats")  # fmt: skip
    labelled += pool[joint].tolist()
    keep = torch.ones(len(pool), dtype=torch.bool)
    keep[joint] = False
    pool = pool[keep]

try:  # the same tensor, scored by the peers
    from batchbald_redux.batchbald import get_batchbald_batch

    print("batchbald_redux:", get_batchbald_batch(log_probs.permute(0, 2, 1).double(), 10, 10_000).indices)
except ImportError:
    print("(batchbald_redux not installed: it would take log_probs.permute(0, 2, 1), shape (N, S, C))")
try:
    from baal.active.heuristics import BALD

    print("baal BALD ranking, top 10:", BALD().get_ranks(log_probs.exp().numpy())[0][:10])
except ImportError:
    print("(baal not installed: its heuristics take log_probs.exp(), shape (N, C, S))")
