"""Memory bounds of the curvature paths, counted at the dispatcher (deterministic, not timed)."""

import pytest
import torch
import torch.nn.functional as F

from effortless.curvature import functional as cf
from effortless.experiments.memory import PeakMemory
from effortless.models import MLP


def _setup():
    torch.manual_seed(0)
    model = MLP(196, [128, 128], 10)
    x, y = torch.rand(64, 196), torch.randint(0, 10, (64,))
    base = list(model.parameters()) + [x, y]
    with PeakMemory(base) as step:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return model, x, y, base, step.peak_bytes


@pytest.mark.parametrize("name", ["efisher", "ggn", "ggn-mc"])
def test_torch_func_path_stays_within_three_training_steps(name):
    model, x, y, base, step = _setup()
    fn = {
        "efisher": lambda: cf.diag_efisher(model, x, y, backend="func"),
        "ggn": lambda: cf.diag_ggn(model, x, y, backend="func"),
        "ggn-mc": lambda: cf.diag_ggn(model, x, y, method="mc", backend="func"),
    }[name]
    with PeakMemory(base) as mem:
        fn()
    assert mem.peak_bytes <= 3 * step, mem.peak_bytes / step


def test_exact_ggn_through_hooks_needs_no_per_sample_jacobians():
    """O(C·B·width) extra, never O(B·C·P): far below one per-sample Jacobian of the batch."""
    model, x, y, base, step = _setup()
    n_params = sum(p.numel() for p in model.parameters())
    with PeakMemory(base) as mem:
        cf.diag_ggn(model, x, y, backend="hooks")
    assert mem.peak_bytes < 0.05 * (64 * 10 * n_params * 4)
    assert mem.peak_bytes <= 4 * step
